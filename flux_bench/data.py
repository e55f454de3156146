"""How fast training data is read and prepared, and the host memory it takes, for 0, 2 and 4 workers.

    .venv/bin/python -m flux_bench.data --make /tmp/big.parquet --rows 2000 --side 512   # a synthetic
                                                        # MagicBrush-schema file (~3 GB of noise PNGs)
    .venv/bin/python -m flux_bench.data --data /tmp/big.parquet --resolution 512 --samples 256

For each worker count, the loader of train/train.py (train/data.py) delivers `--samples` samples in
micro-batches of `--batch`, decoded, cropped, resized and made into diptychs: printed are samples
per second (after the first batch, which pays for starting the workers) and the peak host memory
of the process and its workers together (their proportional set sizes summed, sampled every 20 ms:
pages the forked workers share with the parent count once).
"""

import argparse
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flux_minimal.errors import run_cli
from train.data import EditPairs, loader


def _pss_kb(pid: int) -> int:
    """Proportional set size: resident pages, those shared with other processes divided among them
    (what forked workers share with their parent is counted once in all)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def tree_rss_mb(pid: int) -> float:
    """Memory of `pid` and all its descendants (the sum of their PSS), in MiB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _pss_kb(p)
        except (OSError, StopIteration, ValueError):
            pass
        todo += children.get(p, [])
    return total / 1024


class PeakMemory:
    """Samples tree_rss_mb of this process in a thread while the `with` block runs; `.peak` in MiB."""

    def __enter__(self):
        self.peak, self._stop = tree_rss_mb(os.getpid()), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, tree_rss_mb(os.getpid()))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_parquet(path: Path, rows: int, side: int, group: int) -> None:
    """MagicBrush's schema (img_id, turn_index, source_img, mask_img, instruction, target_img), the
    images random noise saved as PNG (incompressible: a big file fast), `group` rows per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        return {"bytes": buf.getvalue(), "path": None}
    rng, writer = np.random.default_rng(0), None
    tmp = path.with_name(path.name + ".partial")
    for g0 in range(0, rows, group):
        batch = []
        for k in range(g0, min(rows, g0 + group)):
            a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            batch.append({"img_id": str(k), "turn_index": 1, "source_img": png(a), "mask_img": png(a[:, :, :1].repeat(3, 2)),
                          "instruction": f"make edit number {k}", "target_img": png(255 - a)})
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    writer.close()
    os.replace(tmp, path)
    print(f"{path}: {rows} rows in groups of {group}, {path.stat().st_size / 2**30:.2f} GiB")


def bench(data: EditPairs, workers: int, samples: int, batch: int) -> tuple[float, float]:
    """(samples per second after the first batch, peak MiB of the process tree)."""
    batches = [list(range(g, g + batch)) for g in range(0, samples, batch)]
    with PeakMemory() as mem:
        it = loader(data, seed=0, batches=batches, workers=workers)
        next(it)
        t0, n = time.perf_counter(), 0
        for rows in it:
            n += len(rows)
        seconds = time.perf_counter() - t0
        del it
    return n / max(seconds, 1e-9), mem.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flux_bench.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", help="what train.train's --data takes")
    ap.add_argument("--make", type=Path, help="write a synthetic MagicBrush-schema parquet file here and stop")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--side", type=int, default=512, help="image side of --make")
    ap.add_argument("--group", type=int, default=64, help="rows per row group of --make")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", default="0,2,4")
    args = ap.parse_args(argv)
    if args.make:
        make_parquet(args.make, args.rows, args.side, args.group)
        return 0
    if not args.data:
        ap.error("--data or --make is needed")
    before = tree_rss_mb(os.getpid())
    data = EditPairs(args.data, resolution=args.resolution)
    size = sum(p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
               for p in args.data)
    print(f"{len(data)} pairs in {size / 2**30:.2f} GiB; indexed with {tree_rss_mb(os.getpid()) - before:+.0f} MiB "
          f"(process at {tree_rss_mb(os.getpid()):.0f} MiB); {args.samples} samples at {args.resolution} px, batch {args.batch}")
    print("| workers | samples/s | peak host memory (process + workers) |\n| --- | --- | --- |")
    for w in map(int, args.workers.split(",")):
        rate, peak = bench(data, w, args.samples, args.batch)
        print(f"| {w} | {rate:.1f} | {peak:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
