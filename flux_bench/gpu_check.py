"""The prepared GPU check: every GPU figure of the project from one run of at most 8 minutes.

    # on an H100 / H200 (bf16, the real FLUX.1 Fill shapes, random weights: no download)
    .venv/bin/python -m flux_bench.gpu_check --out gpu_check.json
    # the same code at tiny shapes on a CPU (Triton under the interpreter), as the test suite runs it
    .venv/bin/python -m flux_bench.gpu_check --device cpu --quick --out /tmp/gpu_check.json

Parts, in this order, each under its own time cap (a part that reaches its cap stops there, keeps
what it finished and the next part starts; the JSON is rewritten after every part, so even a killed
run leaves its figures):
1. edit      the real-shape edit (512x1024 diptych, 28 steps, bf16, a random MoE LoRA) through
             diffusers' FluxFillPipeline and through ours eager, with CUDA graphs, compiled
             (regional torch.compile), compiled + CUDA graphs: seconds, it/s, and each of ours
             checked against diffusers' final latents (flux_bench/edit.py's tolerance).
2. profile   the kind table of one eager edit (flux_bench/profile.py): attention, linears, ...
3. lora_moe  the Triton LoRA-MoE layer against its base GEMM alone at T = 2560 and 15360 tokens,
             K = 12288 (ff.net.2) and 15360 (proj_out), forward and forward + backward.
4. fp8       the edit with the DiT and T5 in FP8 against bf16: seconds, peak memory, PSNR.
5. autotune  the LoRA-MoE kernels' block sizes over a small set of Hopper configurations on the
             two MoE shapes (forward + backward), the fastest one that agrees with the reference
             written to flux_kernels/lora_moe_tuned.json under this GPU's name, where the kernels
             read it (on a CPU it is only reported).
Prints one table at the end and writes every figure to --out (JSON).
"""

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

# the seconds each part may take on a GPU (the total stays under 8 minutes with model building)
CAPS = {"edit": 200, "profile": 45, "lora_moe": 60, "fp8": 60, "autotune": 85}
TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}  # flux_bench/edit.py --check's


class Capped(Exception):
    """A part reached its time cap."""


@contextmanager
def part(name: str, cap: float, results: dict, out: Path):
    """Run one part under a SIGALRM cap (inside another part: the smaller of its cap and what the
    outer part has left, which runs on afterwards); record how it ended; rewrite the JSON."""
    def expire(signum, frame):
        raise Capped
    results.setdefault(name, {})
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # seconds the enclosing part has left, 0: none
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(cap, outer) if outer else cap)
    t0 = time.perf_counter()
    print(f"\n== {name} (cap {cap:.0f} s)", flush=True)
    try:
        yield results[name]
        status = "done"
    except Capped:
        status = f"capped at {cap:g} s"
    except Exception as e:  # one broken part must not cost the others' figures
        traceback.print_exc()
        status = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.perf_counter() - t0), 1e-3))
    results["parts"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"-- {name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    from flux_minimal.files import write_text
    write_text(out, json.dumps(results, indent=1, default=str) + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def edit_part(r: dict, args, dev, dtype) -> None:
    from flux_bench.common import (bench_preset, load_lora_both, lora_path, make_inputs, our_models, reference_pipeline,
                                   reference_twins, run_ours, run_reference)
    from flux_bench.profile import profile_edit
    from infer.fast import GraphedDenoiser, compile_blocks
    torch.manual_seed(0)
    p = bench_preset(args.preset)
    ours = our_models(p, dev, dtype, vae_dtype=dtype)
    theirs = reference_twins(ours, p)
    pipe = reference_pipeline(theirs)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        r["lora"] = load_lora_both(ours, theirs, pipe, lora_path("random-moe", ours.flux, Path(tmp)), merge=True)
    x = make_inputs(p, args.width, dev)
    r["shape"] = f"{2 * args.width}x{args.width} diptych, {args.steps} steps, {str(dtype).removeprefix('torch.')}"
    tol = TOLERANCE[dtype]

    reference = {}

    def record(name: str, run) -> None:
        first = sum(run()[0].values())  # untimed: compilation and graph capture happen here
        seconds, lat = run()
        r[name] = {"seconds": round(sum(seconds.values()), 3), "first_seconds": round(first, 3),
                   "it_per_s": round(args.steps / seconds["denoise"], 2)}
        if name == "diffusers":
            reference["x"] = lat
        else:
            err = rel_err(lat, reference["x"])
            r[name].update(rel_err=err, ok=err <= tol)
        print(f"{name}: {r[name]}", flush=True)
    record("diffusers", lambda: run_reference(theirs, pipe, x, p, args.steps, dev, dtype))
    record("eager", lambda: run_ours(ours, x, args.steps, dev, None))
    graphed = GraphedDenoiser(ours.flux)
    record("cuda_graphs", lambda: run_ours(ours, x, args.steps, dev, graphed))
    with part("profile", CAPS["profile"], args.results, args.out) as pr:  # the eager models, before compiling
        tables = profile_edit(ours, x, args.steps, dev, hooks=True, trace=None, top=10)
        pr.update(kinds=tables["kinds"], kernels=tables["kernels"], attention=tables["attention"])
        print("\n".join(tables["kinds"]))
    compile_blocks(ours.flux, **({"backend": "eager"} if dev.type == "cpu" else {}))  # CPU: dynamo's trace only
    record("compiled", lambda: run_ours(ours, x, args.steps, dev, None))
    record("compiled_cuda_graphs", lambda: run_ours(ours, x, args.steps, dev, GraphedDenoiser(ours.flux)))


@contextmanager
def torch_moe_on_cpu(dev: torch.device):
    """On a CPU the whole model's LoRA-MoE layers take the torch path (lora_moe_linear's switch):
    dynamo cannot trace the Triton interpreter, and it is slow; the kernels themselves are checked
    by the lora_moe and autotune parts."""
    if dev.type != "cpu":
        yield
        return
    saved, os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET"), "0"
    try:
        yield
    finally:
        os.environ["TRITON_INTERPRET"] = saved if saved is not None else "1"


def lora_moe_part(r: dict, args, dev) -> None:
    from flux_bench.lora_moe import Case, bench_case, do_bench_ms
    clock = do_bench_ms if dev.type == "cuda" else cpu_clock
    r["cases"] = []
    for backward in (False, True):
        for T in args.tokens:
            for K in args.ks:
                c = Case(T, K, n=args.n)
                res = bench_case(c, backward, str(dev), clock=clock, verbose=False)
                ms = res["ms"]
                row = {"tokens": T, "k": K, "n": c.n, "pass": "forward + backward" if backward else "forward",
                       "base_ms": ms["base (cuBLAS)"], "lora_moe_ms": ms["triton"], "fused_ms": ms["fused GEMM"],
                       "reference_ms": ms["reference"], "ratio": ms["triton"] / ms["base (cuBLAS)"],
                       "ok": res["ok"], "errors": res["errors"]}
                r["cases"].append(row)
                print(f"T={T} K={K} {row['pass']}: base {row['base_ms']:.3f} ms, LoRA-MoE {row['lora_moe_ms']:.3f} ms "
                      f"({row['ratio']:.2f}x), fused {row['fused_ms']:.3f} ms, reference {row['reference_ms']:.3f} ms"
                      f"{'' if res['ok'] else '  MISMATCH'}", flush=True)


def cpu_clock(fn) -> float:
    """Milliseconds per call on a CPU (one warm-up call, then the median of three)."""
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[1]


def fp8_part(r: dict, args, dev, dtype) -> None:
    from flux_bench.fp8 import fp8_edit
    r.update(fp8_edit(dev, args.preset, args.width, args.steps, dtype))
    print({k: v for k, v in r.items()}, flush=True)


# A small set around the defaults for Hopper (228 KB shared memory per SM, wgmma wants >= 64 rows):
# tokens per tile, the down kernel's reduction block, the up kernel's output block, warps, stages.
HOPPER = [dict(t=64, d_down=128, o=128, num_warps=4, num_stages=3), dict(t=128, d_down=64, o=128, num_warps=8, num_stages=3),
          dict(t=64, d_down=64, o=256, num_warps=8, num_stages=3), dict(t=128, d_down=128, o=256, num_warps=8, num_stages=3),
          dict(t=64, d_down=128, o=128, num_warps=4, num_stages=4), dict(t=128, d_down=128, o=128, num_warps=8, num_stages=4)]
# Under the interpreter (tl.dot needs >= 16): the same code, tiny blocks
INTERPRETER = [dict(t=16, d_down=32, o=32), dict(t=32, d_down=16, o=16)]


def autotune_part(r: dict, args, dev) -> None:
    import flux_kernels.lora_moe as lm
    from flux_bench.lora_moe import Case, make_inputs
    clock = cpu_clock
    if dev.type == "cuda":
        from flux_bench.lora_moe import do_bench_ms as clock
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [Case(args.tokens[0], k, n=args.n) for k in args.ks]
    inputs = [make_inputs(c, str(dev), dtype, grad=True) for c in shapes]
    dys = [torch.randn(c.tokens, c.n, device=dev, dtype=dtype) for c in shapes]

    def step(x, w, b, a, bb, rt, dy):  # forward + backward, as training runs it
        return torch.autograd.grad(lm.lora_moe_linear_triton(x, w, b, a, bb, rt), [x, a, bb], dy)
    refs = [torch.autograd.grad(lm.lora_moe_linear_ref(*xs), [xs[0], xs[3], xs[4]], dy) for xs, dy in zip(inputs, dys)]
    r["shapes"] = [f"T={c.tokens} K={c.k} N={c.n}" for c in shapes]
    r["candidates"] = []
    for cand in (HOPPER if dev.type == "cuda" else INTERPRETER):
        blocks = lm.Blocks(**cand)
        row = {"blocks": asdict(blocks)}
        try:
            with lm.use_blocks(blocks):
                errs = [max(rel_err(g, f) for g, f in zip(step(*xs, dy), ref)) for xs, dy, ref in zip(inputs, dys, refs)]
                row["ok"] = max(errs) < 2e-2
                row["ms"] = [clock(lambda xs=xs, dy=dy: step(*xs, dy)) for xs, dy in zip(inputs, dys)] if row["ok"] else None
        except Capped:
            raise
        except Exception as e:  # e.g. out of shared memory for this configuration
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
        r["candidates"].append(row)
        print(f"{cand}: {'ms ' + ', '.join(f'{t:.3f}' for t in row['ms']) if row.get('ms') else row.get('error', 'MISMATCH')}",
              flush=True)
    good = [c for c in r["candidates"] if c.get("ms")]
    if not good:
        r["best"] = None
        return
    best = min(good, key=lambda c: sum(c["ms"]))
    r["best"] = best["blocks"]
    default = next((c for c in good if c["blocks"] == asdict(lm.Blocks())), None)
    r["speedup_over_default"] = sum(default["ms"]) / sum(best["ms"]) if default else None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        table = json.loads(lm.TUNED.read_text()) if lm.TUNED.is_file() else {}
        table[name] = best["blocks"]
        from flux_minimal.files import write_text
        write_text(lm.TUNED, json.dumps(table, indent=1, sort_keys=True) + "\n")
        lm.tuned_blocks.cache_clear()
        r["written"] = f"{lm.TUNED} [{name!r}]"
    print(f"best: {r['best']}" + (f", written to {r['written']}" if r.get("written") else " (reported only: not a GPU)"))


def summary(results: dict) -> list[str]:
    rows = ["| part | figure | value |", "| --- | --- | --- |"]
    e = results.get("edit", {})
    for name in ("diffusers", "eager", "cuda_graphs", "compiled", "compiled_cuda_graphs"):
        if name in e:
            v = e[name]
            check = "" if name == "diffusers" else f", vs diffusers {v['rel_err']:.1e} {'ok' if v['ok'] else 'PAST TOLERANCE'}"
            rows.append(f"| edit | {name} | {v['seconds']:.2f} s ({v['it_per_s']:.2f} it/s; first {v['first_seconds']:.1f} s){check} |")
    for line in results.get("profile", {}).get("kinds", [])[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows.append(f"| profile | {cells[0]} | {cells[1]} ms ({cells[2]}) |")
    for c in results.get("lora_moe", {}).get("cases", []):
        rows.append(f"| lora_moe | T={c['tokens']} K={c['k']} {c['pass']} | {c['lora_moe_ms']:.3f} ms vs base "
                    f"{c['base_ms']:.3f} ms ({c['ratio']:.2f}x){'' if c['ok'] else ' MISMATCH'} |")
    f = results.get("fp8", {})
    for mode in ("bf16", "fp32", "fp8"):
        if mode in f:
            peak = f" peak {f[mode]['peak_gb']:.1f} GB" if f[mode]["peak_gb"] is not None else ""
            rows.append(f"| fp8 | {mode} | {f[mode]['seconds']:.2f} s{peak} |")
    if "psnr_db" in f:
        rows.append(f"| fp8 | PSNR against {'bf16' if 'bf16' in f else 'fp32'} | {f['psnr_db']:.1f} dB |")
    a = results.get("autotune", {})
    if a.get("best"):
        speed = f", {a['speedup_over_default']:.2f}x the default" if a.get("speedup_over_default") else ""
        rows.append(f"| autotune | best blocks | {a['best']}{speed} |")
    for name, p in results["parts"].items():
        if p["status"] != "done":
            rows.append(f"| {name} | status | {p['status']} |")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flux_bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the test suite's run on a CPU)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="every figure, as JSON")
    ap.add_argument("--parts", nargs="+", default=list(CAPS), choices=list(CAPS), help="a subset, in this order")
    args = ap.parse_args(argv)
    if args.quick:  # tiny model, tiny layer shapes, the same caps
        args.preset, args.width, args.steps, args.tokens, args.ks, args.n = "tiny", 64, 2, [40], [48, 80], 32
    else:
        args.preset, args.width, args.steps, args.tokens, args.ks, args.n = "real", 512, 28, [2560, 15360], [12288, 15360], 3072
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("flux_bench.gpu_check: no CUDA GPU is visible; --device cpu --quick runs the same code on a CPU")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("unset TRITON_INTERPRET: the check times compiled kernels")
    elif not args.quick:
        raise SystemExit("on a CPU the real shapes would take hours: add --quick")
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before their import
        import flux_kernels.fp8_rows  # noqa: F401  (defined now, as interpreted kernels)
        import flux_kernels.lora_moe  # noqa: F401
    from flux_minimal.files import check_output
    check_output(args.out, "--out")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = args.results = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    import triton
    results["triton"] = triton.__version__
    print(f"gpu_check on {results['device']}, torch {torch.__version__}, triton {triton.__version__}; parts {args.parts}")
    t0 = time.perf_counter()
    for name in args.parts:
        if name == "profile" and "edit" in args.parts:
            continue  # run inside the edit part, on its eager models
        with part(name, CAPS[name] + (CAPS["profile"] if name == "edit" else 0), results, args.out) as r:
            if name == "edit":
                with torch_moe_on_cpu(dev):
                    edit_part(r, args, dev, dtype)
            elif name == "profile":
                from flux_bench.common import bench_preset, make_inputs, our_models, run_ours
                from flux_bench.profile import profile_edit
                p = bench_preset(args.preset)
                m, x = our_models(p, dev, dtype, vae_dtype=dtype), make_inputs(p, args.width, dev)
                run_ours(m, x, args.steps, dev, None)
                r.update(profile_edit(m, x, args.steps, dev, trace=None, top=10))
            elif name == "lora_moe":
                lora_moe_part(r, args, dev)
            elif name == "fp8":
                fp8_part(r, args, dev, dtype)
            elif name == "autotune":
                autotune_part(r, args, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    from flux_minimal.files import write_text
    write_text(args.out, json.dumps(results, indent=1, default=str) + "\n")
    print(f"\ngpu_check: {results['device']}, {results['seconds']:.0f} s in all; every figure in {args.out}\n")
    print("\n".join(summary(results)))
    bad = [n for n, p in results["parts"].items() if p["status"].startswith("error")]
    mismatch = [k for k, v in results.get("edit", {}).items() if isinstance(v, dict) and v.get("ok") is False]
    mismatch += [f"lora_moe T={c['tokens']} K={c['k']}" for c in results.get("lora_moe", {}).get("cases", []) if not c["ok"]]
    if bad or mismatch:
        print(f"\nFAILED: {', '.join(bad + mismatch)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
