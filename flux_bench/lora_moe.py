"""Benchmark the top-1 LoRA-MoE linear at the FLUX shapes, on a CUDA GPU.

    .venv/bin/python -m flux_bench.lora_moe                       # T in {2560, 15360}, K in {12288, 15360}
    .venv/bin/python -m flux_bench.lora_moe --tokens 2560 --k 12288 --no-backward
    .venv/bin/python -m flux_bench.lora_moe --compile-only         # no GPU needed: sm_90 build check
    .venv/bin/python -m flux_bench.lora_moe --compile-only --dtypes bf16 --arch 90

For each (T, K) with N = 3072, E = 4, r = 32, bf16 it times (triton.testing.do_bench, median):
  base      F.linear(x, W, b) alone (cuBLAS): the floor any fused version is measured against
  reference lora_moe_linear_ref: the official dense-over-experts, masked computation
  triton    lora_moe_linear_triton (default: cuBLAS base GEMM + grouped Triton LoRA kernels)
  fused     lora_moe_linear_triton(fuse_base=True): the base GEMM in Triton with the LoRA epilogue
and prints ms, TFLOP/s and the ratios; a second table does forward + backward (x, lora_A, lora_B
require grad; W, b frozen, as in LoRA training). TFLOP/s count the useful work only: the base
GEMM(s), the routing GEMM and one expert's LoRA per token. Every variant is first checked
against the reference (llm.c habit: validate, then time).

--compile-only builds every kernel exactly as the host functions would launch them on CUDA
(same specialisation, same block sizes) for --arch (default 90 = H100/H200) without a GPU, and
prints what the PTX uses (wgmma = Hopper tensor cores, mma = Ampere-style tensor cores).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Case:
    tokens: int
    k: int
    n: int = 3072
    experts: int = 4
    rank: int = 32


def make_inputs(c: Case, device: str, dtype: torch.dtype, grad: bool = False):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, std: (torch.randn(*s, generator=g, device=device) * std).to(dtype)  # noqa: E731
    x = rnd(c.tokens, c.k, std=1.0)
    w, b = rnd(c.n, c.k, std=c.k ** -0.5), rnd(c.n, std=0.1)
    a, bb = rnd(c.experts, c.rank, c.k, std=c.k ** -0.5), rnd(c.experts, c.n, c.rank, std=c.rank ** -0.5)
    r = rnd(c.experts, c.k, std=c.k ** -0.5)
    if grad:
        for t in (x, a, bb, r):
            t.requires_grad_(True)
    return x, w, b, a, bb, r


def flops(c: Case, backward: bool) -> tuple[float, float]:
    """(base GEMM FLOPs, useful MoE FLOPs) for forward, or forward + backward (dx, dA, dB)."""
    T, K, N, E, r = c.tokens, c.k, c.n, c.experts, c.rank
    base = 2 * T * K * N * (2 if backward else 1)
    lora = 2 * T * r * (K + N) * (3 if backward else 1)  # fwd; bwd: g, dx, dA, dB = 2x fwd
    return base, base + lora + 2 * T * K * E


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def do_bench_ms(fn) -> float:
    """Median milliseconds per call on the GPU (triton.testing.do_bench: warm-up, L2 flushed)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_case(c: Case, backward: bool, device: str = "cuda", clock=do_bench_ms, verbose: bool = True) -> dict:
    """Validate, then time. Returns {"ok": every variant agrees with the reference, "errors": the
    worst relative error per variant, "ms": milliseconds per variant}; prints them when verbose."""
    from flux_kernels.lora_moe import lora_moe_linear_ref, lora_moe_linear_triton

    say = print if verbose else (lambda *a, **k: None)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32  # the interpreter: fp32
    x, w, b, a, bb, r = make_inputs(c, device, dtype, grad=backward)
    variants = {
        "base (cuBLAS)": lambda: F.linear(x, w, b),
        "reference": lambda: lora_moe_linear_ref(x, w, b, a, bb, r),
        "triton": lambda: lora_moe_linear_triton(x, w, b, a, bb, r, fuse_base=False),
        "fused GEMM": lambda: lora_moe_linear_triton(x, w, b, a, bb, r, fuse_base=True),
    }
    dy = torch.randn(c.tokens, c.n, device=device, dtype=dtype)
    if backward:
        fwd = dict(variants)
        wrt = {"base (cuBLAS)": [x]}
        variants = {name: (lambda f=f, name=name: torch.autograd.grad(
            f(), wrt.get(name, [x, a, bb]), dy)) for name, f in fwd.items()}

    # validate first: same routing by construction, so only rounding separates the outputs
    ref, errors = variants["reference"](), {}
    for name in ("triton", "fused GEMM"):
        got = variants[name]()
        errors[name] = max(rel_err(g_, r_) for g_, r_ in zip(got if backward else [got], ref if backward else [ref]))
        say(f"  check {name:<11} vs reference: max rel err {errors[name]:.2e} "
            f"{'ok' if errors[name] < 2e-2 else 'MISMATCH'}")
    del ref

    base_flop, moe_flop = flops(c, backward)
    times = {name: clock(f) for name, f in variants.items()}
    t_base, t_ref = times["base (cuBLAS)"], times["reference"]
    say(f"  {'variant':<14} {'ms':>8} {'TFLOP/s':>8} {'x base':>7} {'ref / this':>10} {'LoRA-MoE overhead':>18}")
    for name, ms in times.items():
        fl = base_flop if name.startswith("base") else moe_flop
        over = "" if name.startswith("base") else f"{(ms - t_base) * 1e3:8.1f} us"
        say(f"  {name:<14} {ms:8.3f} {fl / ms / 1e9:8.1f} {ms / t_base:7.3f} {t_ref / ms:10.2f} {over:>18}")
    for name in ("triton", "fused GEMM"):
        lora = (times[name] - t_base) / (t_ref - t_base) if t_ref > t_base else float("nan")
        say(f"  {name}: {times[name] / t_base:.3f}x base (goal <= 1.10), "
            f"{t_ref / times[name]:.2f}x faster than the reference overall, its LoRA-MoE part "
            f"costs {lora:.2f}x the reference's")
    return {"ok": all(e < 2e-2 for e in errors.values()), "errors": errors, "ms": times}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_only(arch: int, dtypes: list[str]) -> None:
    """Compile every kernel launch of a forward + backward for CUDA `arch`, without a GPU."""
    os.environ.pop("TRITON_INTERPRET", None)
    import flux_kernels.lora_moe as lm

    launches = []

    class Recorder:  # stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    kernels = ("_lora_down_kernel", "_lora_up_kernel", "_lora_wgrad_kernel")
    saved = {k: getattr(lm, k) for k in kernels}
    for k in kernels:
        setattr(lm, k, Recorder(saved[k]))
    try:  # the host code runs on CPU tensors; only the launches matter (with CUDA block sizes)
        with lm.use_blocks(lm.Blocks()):  # the untuned CUDA defaults (a CPU tensor would get the interpreter's)
            launch_all(lm, dtypes)
    finally:
        for k in kernels:
            setattr(lm, k, saved[k])
    compile_launches(launches, arch)


def launch_all(lm, dtypes: list[str]) -> None:
    """Run the host code of every kind of launch: forward + backward, fused or not, two ranks."""
    for dtype in (DTYPES[d] for d in dtypes):
        for rank in (32, 4):  # 4: the rank is padded to the 16 that tl.dot needs
            c = Case(tokens=300, k=512, n=384, rank=rank)
            for fuse in (False, True):
                x, w, b, a, bb, r = make_inputs(c, "cpu", dtype, grad=True)
                y = lm.lora_moe_linear_triton(x, w, b, a, bb, r, fuse_base=fuse)
                torch.autograd.grad(y, [x, a, bb, r], torch.ones_like(y))


def compile_launches(launches: list, arch: int) -> None:
    """Compile each distinct recorded launch for sm_ARCH and print what its PTX uses."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    target, seen = GPUTarget("cuda", arch, 32), set()
    opt_names = ("num_warps", "num_stages")
    for fn, args, kw in launches:
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = args[i] if i < len(args) else kw[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[(i,)] = "constexpr", v
                continue
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            signature[p.name] = ty
            if ty == "constexpr":  # an int argument equal to 1 (unit strides)
                constexprs[(i,)] = attr
            elif attr:
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(attrs))
        if key in seen:
            continue
        seen.add(key)
        options = {k: kw[k] for k in opt_names if k in kw}
        out = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                             options=options)
        ptx = out.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no tensor cores")
        blocks = {fn.arg_names[i[0]]: v for i, v in constexprs.items()
                  if fn.arg_names[i[0]].isupper()}
        print(f"sm_{arch} ok  {fn.__name__:<20} {signature[fn.arg_names[0]]:<6} {mma:<16} "
              f"shared {out.metadata.shared:>6} B  {blocks}")
    print(f"{len(seen)} distinct kernel builds compiled for sm_{arch}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m flux_bench.lora_moe", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2560, 6 * 2560])
    p.add_argument("--k", type=int, nargs="+", default=[12288, 15360])
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--no-backward", action="store_true", help="forward table only")
    p.add_argument("--compile-only", action="store_true", help="sm_ARCH build check, no GPU")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="dtypes for --compile-only")
    args = p.parse_args()

    if args.compile_only:
        return compile_only(args.arch, args.dtypes)
    if not torch.cuda.is_available():
        sys.exit("flux_bench.lora_moe needs a CUDA GPU; none is visible here. "
                 "(Correctness runs on the CPU: .venv/bin/python -m pytest tests/test_lora_moe_kernel.py;"
                 " an sm_90 build check: --compile-only.)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the benchmark times compiled kernels")

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    all_ok = True
    for backward in ([False] if args.no_backward else [False, True]):
        print(f"\n=== {'forward + backward' if backward else 'forward'} (bf16) ===")
        for tokens in args.tokens:
            for k in args.k:
                c = Case(tokens, k, args.n, args.experts, args.rank)
                print(f"\nT={c.tokens} K={c.k} N={c.n} E={c.experts} r={c.rank}")
                all_ok &= bench_case(c, backward)["ok"]
                torch.cuda.empty_cache()
    if not all_ok:
        sys.exit("MISMATCH: a Triton variant disagrees with the reference (see the checks above)")


if __name__ == "__main__":
    main()
