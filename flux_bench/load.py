"""Checkpoint loading: wall time and peak host memory (RSS) for a >= 1 GB random FLUX checkpoint.

    .venv/bin/python -m flux_bench.load                      # 1.3 GB bf16 file in /tmp
    .venv/bin/python -m flux_bench.load --blocks 4 --keep    # bigger; keep the file

The checkpoint is a real-width FLUX Fill (3072 wide, 24 heads) with fewer blocks, written as a
BFL single file in bf16. Each scenario loads it in a fresh process and reports the load time, the
peak RSS during the load (VmHWM), and the RSS after touching every weight once (a forward
pass reads them all), against the file size and the largest tensor. Expected: a lazy bf16 load
costs ~nothing until used and peaks at ~1x the file once touched; a conversion to fp32 peaks near
the fp32 model plus one tensor (the mapped bf16 pages are released after each conversion); an
FP8 load (`fp8`: linear weights quantized while loading) near half the file plus one tensor in
float32, and the last column compares each scenario's touched peak with the bf16 load's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flux_minimal.timing import peak_rss

GB = 1024**3


def child(path: str, dtype: str, device: str) -> None:
    """Runs in a fresh process: load, measure, print one JSON line."""
    import torch

    from flux_minimal import load_flux

    base = peak_rss()  # the interpreter and torch, before any weight
    t0 = time.perf_counter()
    if dtype == "fp8":
        model = load_flux(path, device=device, dtype=torch.bfloat16, fp8=True)
    else:
        model = load_flux(path, device=device, dtype=None if dtype == "file" else getattr(torch, dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_load = peak_rss()
    with torch.no_grad():
        total = sum(p.float().sum().item() for p in model.parameters())  # touch every weight
        total += sum(b.float().sum().item() for b in model.buffers())
    peak_touch = peak_rss()
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps(dict(base=base, load_s=load_s, peak_load=peak_load, peak_touch=peak_touch, params=params,
                          model_bytes=model_bytes, checksum=total)))


def write_checkpoint(path: Path, double: int, single: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    from flux_minimal import Flux, FluxParams

    with torch.device("meta"):
        skeleton = Flux(FluxParams(depth=double, depth_single_blocks=single))
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
             for k, v in skeleton.state_dict().items()}
    largest = max(v.numel() * v.element_size() for v in state.values())
    save_file(state, path)
    return path.stat().st_size, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2, help="double blocks (single blocks = 2x)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    args = ap.parse_args()

    path = Path(args.dir) / f"bench_flux_{args.blocks}.safetensors"
    t0 = time.perf_counter()
    size, largest = write_checkpoint(path, args.blocks, 2 * args.blocks)
    print(f"wrote {path}: {size / GB:.2f} GB, largest tensor {largest / 2**20:.0f} MiB "
          f"({time.perf_counter() - t0:.1f} s)")
    scenarios = [("file", "cpu"), ("float32", "cpu"), ("fp8", "cpu")]
    try:
        import torch
        if torch.cuda.is_available():
            scenarios.append(("file", "cuda"))
    except ImportError:
        pass
    print("peak RSS is measured above the interpreter + torch baseline of each process")
    print(f"{'dtype':>8} {'device':>6} {'load s':>7} {'peak RSS load':>14} {'peak RSS touched':>17} "
          f"{'model':>8} {'RSS/model':>9} {'vs bf16 load':>12}")
    bf16_touch = None
    try:
        for dtype, device in scenarios:
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
            out = subprocess.run([sys.executable, "-c", f"from flux_bench.load import child; "
                                  f"child({str(path)!r}, {dtype!r}, {device!r})"],
                                 capture_output=True, text=True, env=env, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            load, touch = r["peak_load"] - r["base"], r["peak_touch"] - r["base"]
            if (dtype, device) == ("file", "cpu"):
                bf16_touch = touch
            print(f"{dtype:>8} {device:>6} {r['load_s']:7.2f} {load / GB:11.2f} GB {touch / GB:14.2f} GB "
                  f"{r['model_bytes'] / GB:5.2f} GB {touch / r['model_bytes']:9.2f} "
                  f"{touch / bf16_touch if device == 'cpu' else float('nan'):11.2f}x")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
