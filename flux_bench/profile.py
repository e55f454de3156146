"""Where the time of one edit goes, by kind of work and kernel by kernel.

    # the tiny random model on a CPU (seconds)
    .venv/bin/python -m flux_bench.profile --preset tiny
    # real widths, one block of each kind, on a CPU (a few minutes)
    .venv/bin/python -m flux_bench.profile --preset real --device cpu --depth 1 --single-depth 1 --steps 2 --lora random-moe
    # the real shape on a GPU: 512x1024 diptych, 28 steps, bf16, the MoE LoRA
    .venv/bin/python -m flux_bench.profile --preset real --device cuda --lora random-moe --trace flux_trace.json

One edit (text encoders, VAE encode, the denoising steps, VAE decode) of random weights at the
chosen shape runs once to warm up, then once under torch.profiler. It writes a Chrome trace (open
it in https://ui.perfetto.dev or chrome://tracing) and prints:

1. A table per kind of work: attention, the DiT's linears (QKV, MLP, projections), modulation
   (adaLN and the embedders), norms and RoPE, LoRA-MoE layers (base GEMM included), VAE, text
   encoders, and the rest (gates, residuals, GELU, copies): time (device time on a GPU, CPU time
   otherwise), share of the edit, FLOPs and achieved TFLOP/s. Kinds are profiler ranges opened by
   forward hooks on the modules, and around rotary embedding and attention in flux_minimal.ops;
   FLOPs are counted from the shapes each range saw (2 M K N per linear, 4 B H Lq Lk D per
   attention, 2 B Cout Hout Wout Cin k^2 per convolution; the text encoders' and VAE's own
   attention products are not counted). With --compile the blocks are fused by Inductor and the
   hooks cannot see inside them: only the kernel table is printed.
2. The kernels that took the most time, with the kernel torch chose for attention among them.
3. Each LoRA-MoE layer shape of this model against its base GEMM alone (F.linear).

Nothing here needs diffusers: the models are our own, with random weights (flux_bench/edit.py).
"""

import argparse
import tempfile
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import flux_minimal.ops as ops
from flux_minimal.lora import LoRALinear, merge_lora
from flux_minimal.lora_files import load_lora
from flux_minimal.moe import LoRAMoELinear
from flux_minimal.timing import timed
from flux_minimal.mmdit import MLPEmbedder, Modulation, RMSNorm
from flux_bench.common import (Inputs, Models, bench_preset, lora_path, make_inputs, our_models, run_ours, shape_args,
                               shape_defaults)
from infer.fast import compile_blocks

KINDS = ("attention", "linears", "modulation", "norms, RoPE", "LoRA-MoE", "VAE", "text encoders")
LABEL = "kind: "  # profiler range names are LABEL + kind


class Kinds:
    """Forward hooks that open a profiler range per kind of work and count its FLOPs."""

    def __init__(self):
        self.flops: dict[str, float] = defaultdict(float)
        self.handles = []

    def watch(self, module: nn.Module, kind: str, flops=None) -> None:
        ranges = []

        def pre(m, args):
            r = record_function(LABEL + kind)
            r.__enter__()
            ranges.append(r)

        def post(m, args, out):
            ranges.pop().__exit__(None, None, None)
            if flops is not None:
                self.flops[kind] += flops(m, args, out)
        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def count(self, module: nn.Module, kind: str, flops) -> None:
        """Only count FLOPs (inside a range that another hook opens)."""
        def post(m, args, out):
            self.flops[kind] += flops(m, args, out)
        self.handles.append(module.register_forward_hook(post))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def linear_flops(m: nn.Linear, args, out) -> float:
    rows = args[0].numel() // args[0].shape[-1]
    flops = 2.0 * rows * m.in_features * m.out_features
    if isinstance(m, LoRAMoELinear):  # one expert per token, and the router
        E, r, _ = m.lora_A["experts"].shape
        flops += 2.0 * rows * (r * (m.in_features + m.out_features) + E * m.in_features)
    elif isinstance(m, LoRALinear) and not m.merged:
        flops += sum(2.0 * rows * A.shape[0] * (m.in_features + (m.rows[int(p)][1] - m.rows[int(p)][0]))
                     for p, A in m.lora_A.items())
    return flops


def conv_flops(m: nn.Conv2d, args, out) -> float:
    kh, kw = m.kernel_size
    return 2.0 * out.numel() * m.in_channels // m.groups * kh * kw


def watch_models(kinds: Kinds, flux: nn.Module, vae: nn.Module, text: list[nn.Module]) -> None:
    """Ranges on the DiT's leaf kinds, on the VAE halves and the text encoders; FLOP counters inside."""
    modulation = {n for n, m in flux.named_modules()
                  if isinstance(m, (Modulation, MLPEmbedder)) or n.endswith("adaLN_modulation")}
    for name, m in flux.named_modules():
        if name in modulation:
            kinds.watch(m, "modulation", modulation_flops)
        elif any(name.startswith(n + ".") for n in modulation):
            continue  # inside an adaLN or embedder module: counted there
        elif isinstance(m, LoRAMoELinear):
            kinds.watch(m, "LoRA-MoE", linear_flops)
        elif isinstance(m, nn.Linear):
            kinds.watch(m, "linears", linear_flops)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            kinds.watch(m, "norms, RoPE")
    for part in (vae.encoder, vae.decoder):
        kinds.watch(part, "VAE")
    for m in vae.modules():
        if isinstance(m, nn.Conv2d):
            kinds.count(m, "VAE", conv_flops)
    for enc in text:
        kinds.watch(enc, "text encoders")
        for m in enc.modules():
            if isinstance(m, nn.Linear):
                kinds.count(m, "text encoders", linear_flops)


def modulation_flops(m: nn.Module, args, out) -> float:
    """Every linear inside an adaLN or embedder module, for its batch of rows."""
    rows = args[0].numel() // args[0].shape[-1]
    return sum(2.0 * rows * lin.in_features * lin.out_features for lin in m.modules() if isinstance(lin, nn.Linear))


@contextmanager
def labelled_ops(kinds: Kinds):
    """Ranges around rotary embedding and the attention backend (functions in flux_minimal.ops,
    looked up there at call time), restored afterwards."""
    rope, name = ops.apply_rope, ops.attention_backend()
    backend = ops._BACKENDS[name]

    def apply_rope(q, k, pe):
        with record_function(LABEL + "norms, RoPE"):
            return rope(q, k, pe)

    def attend(q, k, v):
        with record_function(LABEL + "attention"):
            B, Hh, L, D = q.shape
            kinds.flops["attention"] += 4.0 * B * Hh * L * k.shape[2] * D
            return backend(q, k, v)
    ops.apply_rope, ops._BACKENDS[name] = apply_rope, attend
    try:
        yield
    finally:
        ops.apply_rope, ops._BACKENDS[name] = rope, backend


def event_time(e, cuda: bool) -> float:
    """Microseconds of a host-side event: on a GPU the device time of the kernels launched inside it
    (its children's included), else its CPU time."""
    return e.device_time_total if cuda else e.cpu_time_total


def host_side(e) -> bool:
    """An event of the host's timeline: an op or a range as the CPU saw it. On CUDA, each
    record_function range has a second, device-side twin (a user annotation spanning its kernels):
    adding both would count each kind twice."""
    return e.device_type == DeviceType.CPU


def is_kernel(e) -> bool:
    """A kernel (or memcpy / memset) on the device's timeline, not a user annotation."""
    return e.device_type != DeviceType.CPU and not e.is_user_annotation


def kind_table(events, kinds: Kinds, cuda: bool, total_us: float) -> list[str]:
    """events: `prof.key_averages()`; each kind's time from its host-side range only."""
    spent = defaultdict(float)
    for e in events:
        if host_side(e) and e.key.startswith(LABEL):
            spent[e.key[len(LABEL):]] += event_time(e, cuda)
    rows = ["| kind | ms | share | GFLOP | TFLOP/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in KINDS:
        us, fl = spent.get(k, 0.0), kinds.flops.get(k, 0.0)
        rate = f"{fl / (us * 1e-6) / 1e12:.2f}" if fl and us else "-"
        rows.append(f"| {k} | {us / 1e3:.1f} | {100 * us / total_us:.1f}% | {fl / 1e9:.1f} | {rate} |")
    rest = total_us - sum(spent.get(k, 0.0) for k in KINDS)
    rows.append(f"| other (gates, residuals, GELU, copies, launch gaps) | {rest / 1e3:.1f} | {100 * rest / total_us:.1f}% | - | - |")
    fl = sum(kinds.flops.values())
    rows.append(f"| **edit** | {total_us / 1e3:.1f} | 100% | {fl / 1e9:.1f} | {fl / (total_us * 1e-6) / 1e12:.2f} |")
    return rows


def kernel_table(events, cuda: bool, top: int) -> list[str]:
    """events: `prof.key_averages()`. On a GPU the kernels themselves (an aten op's self device time
    is its kernels' again); on a CPU the ops, by self CPU time, without our ranges."""
    if cuda:
        evs, key = [e for e in events if is_kernel(e)], (lambda e: e.device_time_total)
    else:
        evs = [e for e in events if host_side(e) and not e.key.startswith(LABEL) and e.key != "edit"]
        key = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(key(e) for e in evs) or 1.0
    rows = ["| kernel / op | calls | ms (self) | share |", "| --- | ---: | ---: | ---: |"]
    for e in sorted((e for e in evs if key(e) > 0), key=key, reverse=True)[:top]:
        rows.append(f"| `{e.key[:90]}` | {e.count} | {key(e) / 1e3:.1f} | {100 * key(e) / total:.1f}% |")
    return rows


def edit_time(events, cuda: bool) -> float:
    """Microseconds of the whole profiled edit (its host-side range)."""
    return event_time(next(e for e in events if host_side(e) and e.key == "edit"), cuda)


def attention_kernels(prof) -> list[str]:
    """What ran inside the DiT's attention ranges (ops and, on a GPU, kernels); without ranges
    (--compile), every op or kernel whose name says attention."""
    names, ranges = set(), [e for e in prof.events() if e.name == LABEL + "attention"]

    def attention_op(name: str) -> bool:
        return any(w in name.lower() for w in ("scaled_dot_product", "flash", "fmha", "cudnn", "attention"))

    def walk(e):
        names.update(k.name for k in getattr(e, "kernels", []))  # GPU kernels launched in the range
        for c in e.cpu_children:
            if attention_op(c.name):
                names.add(c.name)
            walk(c)
    for e in ranges:
        walk(e)
    if not ranges:
        names = {e.key for e in prof.key_averages() if attention_op(e.key)}
    return sorted(n for n in names if not n.startswith(LABEL) and n != "aten::scaled_dot_product_attention")


def moe_vs_base(flux: nn.Module, tokens: dict[int, int], dev, repeat: int) -> list[str]:
    """Each LoRA-MoE layer shape of the model alone against its base GEMM."""
    from flux_kernels.lora_moe import lora_moe_linear
    rows = ["| layer shape (T x K -> N) | base GEMM ms | LoRA-MoE ms | ratio |", "| --- | ---: | ---: | ---: |"]
    seen = set()
    for name, m in flux.named_modules():
        if not isinstance(m, LoRAMoELinear):
            continue
        T = tokens[m.in_features]
        if (T, m.in_features) in seen:
            continue
        seen.add((T, m.in_features))
        x = torch.randn(T, m.in_features, device=dev, dtype=m.weight.dtype)
        A, B, R = (t.to(x.dtype) for t in (m.lora_A["experts"], m.lora_B["experts"], m.lora_route))

        def clock(fn):  # milliseconds per call, after one untimed call
            fn()
            return timed(fn, dev, repeat)[1] * 1e3
        with torch.no_grad():
            base = clock(lambda: F.linear(x, m.weight, m.bias))
            moe = clock(lambda: lora_moe_linear(x, m.weight, m.bias, A, B, R))
        rows.append(f"| {T} x {m.in_features} -> {m.out_features} | {base:.3f} | {moe:.3f} | {moe / base:.2f} |")
    return rows


def profile_edit(m: Models, x: Inputs, steps: int, dev: torch.device, hooks: bool = True,
                 trace: Path | None = None, top: int = 15) -> dict[str, list[str]]:
    """One edit of warmed-up models under torch.profiler -> {"kinds": the kind table (hooks only:
    compiled blocks hide their insides), "kernels": the top kernels (ops on a CPU), "attention":
    what ran as attention}; the Chrome trace to `trace`."""
    cuda = dev.type == "cuda"
    kinds = Kinds()
    if hooks:
        watch_models(kinds, m.flux, m.vae, [m.t5, m.clip])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with labelled_ops(kinds) if hooks else nullcontext():
            with profile(activities=activities, record_shapes=False) as prof:
                with record_function("edit"):
                    run_ours(m, x, steps, dev, None)
    finally:
        kinds.close()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    return {"kinds": kind_table(events, kinds, cuda, edit_time(events, cuda)) if hooks else [],
            "kernels": kernel_table(events, cuda, top), "attention": attention_kernels(prof)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flux_bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="default: 28 on a GPU, 2 on a CPU")
    ap.add_argument("--trace", type=Path, default=Path("flux_trace.json"), help="Chrome trace output")
    ap.add_argument("--top", type=int, default=15, help="rows of the kernel table")
    args = shape_defaults(ap.parse_args(argv))
    args.steps = args.steps or (2 if torch.device(args.device).type == "cpu" else 28)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from flux_minimal.files import check_output
    check_output(args.trace, "Chrome trace")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ops.set_attention_backend(args.attention, dev, dtype)
    p = bench_preset(args.preset, args.depth, args.single_depth, args.text_layers)
    m = our_models(p, dev, dtype, vae_dtype=dtype)
    if args.lora:
        with tempfile.TemporaryDirectory() as tmp:
            load_lora(m.flux, lora_path(args.lora, m.flux, Path(tmp)))
            merge_lora(m.flux)
    if args.compile:
        compile_blocks(m.flux)
    x = make_inputs(p, args.width, dev)
    print(f"{args.preset}: DiT {p.flux.depth} + {p.flux.depth_single_blocks} blocks of width {p.flux.hidden_size}, "
          f"diptych {2 * args.width}x{args.width}, {args.steps} steps, {args.dtype}, {dev}"
          + (f", LoRA {args.lora}" if args.lora else "") + (", compiled" if args.compile else ""))
    run_ours(m, x, args.steps, dev, None)  # warm-up (and compilation)
    tables = profile_edit(m, x, args.steps, dev, hooks=not args.compile, trace=args.trace, top=args.top)
    clock = "device" if cuda else "CPU"
    if not args.compile:
        print(f"\nby kind of work ({clock} time of one edit; {args.steps} denoising steps):")
        print("\n".join(tables["kinds"]))
    print(f"\ntop {'kernels' if cuda else 'ops'} ({clock} self time):")
    print("\n".join(tables["kernels"]))
    print(f"\nattention ran as: {', '.join(tables['attention']) or 'not found'} (backend {args.attention})")
    L = (args.width // 16) * (2 * args.width // 16)
    moe = moe_vs_base(m.flux, {p.flux.hidden_size * 4: L, p.flux.hidden_size * 5: L + 512}, dev, 3 if cuda else 1)
    if len(moe) > 2:
        print("\nLoRA-MoE layers against their base GEMM (" + ("Triton kernels" if cuda else "the torch path") + "):")
        print("\n".join(moe))
    print(f"\nChrome trace: {args.trace}")
    return 0


if __name__ == "__main__":
    from flux_minimal.errors import run_cli
    run_cli(main)
