"""Fine-tuning on a tiny random base: the loss falls, a killed run resumes exactly, DDP equals one
process with the doubled batch, the export loads in diffusers, bad samples are skipped."""

import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.data import EditPairs
from train.train import main
from tests.helpers import rel_err

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--resolution", "64", "--max-length", "32", "--no-progress", "--log-every", "1"]


def write_pairs(folder: Path, n: int = 6, extra_lines: list[str] = ()) -> Path:
    """n pairs: a coloured square on gray (source) and the same square in another colour (target)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    rng = np.random.default_rng(0)
    for i in range(n):
        src = np.full((64, 64, 3), 128, np.uint8)
        tgt = src.copy()
        y, x = rng.integers(8, 40, 2)
        src[y:y + 16, x:x + 16] = (220, 30, 30)
        tgt[y:y + 16, x:x + 16] = (30, 30, 220)
        Image.fromarray(src).save(folder / "img" / f"s{i}.png")
        Image.fromarray(tgt).save(folder / "img" / f"t{i}.png")
        lines.append(json.dumps({"source": f"img/s{i}.png", "target": f"img/t{i}.png",
                                 "instruction": "turn the red square blue"}))
    (folder / "pairs.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return folder


def train(snapshot, data, out, *args):
    return main(["--weights", str(snapshot), "--data", str(data), "--out", str(out), *COMMON, *map(str, args)])


def losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loss_goes_down(snapshot, tmp_path):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    assert train(snapshot, data, out, "--steps", "200", "--batch", "2", "--optimizer", "adamw", "--lr", "1e-2",
                 "--rank", "8", "--cache", "--save-every", "1000") == 0
    ls = losses(out)
    first, last = np.mean(ls[:30]), np.mean(ls[-30:])
    assert last < 0.85 * first, (first, last)  # measured: 1.20 -> 0.93
    assert (out / "adapter.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert set(log["loss_by_t"]) <= {"0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"}


@pytest.mark.parametrize("adapter", ["lora", "moe"])
def test_resume_equals_uninterrupted(snapshot, tmp_path, adapter, monkeypatch):
    # the MoE layers take their torch reference here (the kernel under the interpreter is ~20x slower;
    # it has its own tests in test_lora_moe_kernel.py)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = write_pairs(tmp_path / "data")
    opts = ["--adapter", adapter, "--rank", "4", "--experts", "3", "--batch", "2", "--save-every", "2"]
    train(snapshot, data, tmp_path / "full", "--steps", "6", *opts)
    train(snapshot, data, tmp_path / "cut", "--steps", "4", *opts)  # "killed" after its step-4 checkpoint
    train(snapshot, data, tmp_path / "cut", "--steps", "6", "--resume", tmp_path / "cut", "--workers", "2", *opts)
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cmd(snapshot, data, out, *args):
    return [sys.executable, "-m", "train.train", "--weights", str(snapshot), "--data", str(data), "--out", str(out),
            *COMMON, "--optimizer", "prodigy", *map(str, args)]


@pytest.mark.slow
def test_sigkill_then_resume(snapshot, tmp_path):
    """A real kill at an arbitrary moment (SIGKILL, no cleanup): the atomic checkpoint survives and
    the resumed run ends with exactly the adapter of a run that was never interrupted. The killed
    and resumed runs read their samples in 2 worker processes, the clean one inline."""
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(snapshot, data, out, "--steps", "100000", "--save-every", "3", "--workers", "2"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "latest").is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get somewhere mid-step or mid-save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = int((out / (out / "latest").read_text()).name.split("_")[1])
    target = step + 2
    subprocess.run(_cmd(snapshot, data, out, "--steps", target, "--save-every", "3", "--resume", out, "--workers", "2"), cwd=REPO,
                   check=True, capture_output=True)
    subprocess.run(_cmd(snapshot, data, tmp_path / "clean", "--steps", target, "--save-every", "3"), cwd=REPO,
                   check=True, capture_output=True)
    a, b = load_file(out / "adapter.safetensors"), load_file(tmp_path / "clean" / "adapter.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def torchrun(args: list[str], env: dict) -> None:
    """Two processes of `args` under torchrun, on a free port (fixed ports collide on a busy
    machine); on failure the processes' own output is in the assertion."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


@pytest.mark.slow
def test_ddp_two_processes_equal_one_with_double_batch(snapshot, tmp_path):
    data = write_pairs(tmp_path / "data", n=8)
    args = ["--steps", "3", "--optimizer", "adamw", "--lr", "1e-3", "--rank", "4", "--save-every", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun(["-m", "train.train", "--weights", str(snapshot), "--data", str(data), "--out", str(tmp_path / "ddp"),
              *COMMON, "--batch", "1", "--workers", "2", *args], env)
    assert train(snapshot, data, tmp_path / "one", "--batch", "2", *args) == 0
    a, b = load_file(tmp_path / "ddp" / "adapter.safetensors"), load_file(tmp_path / "one" / "adapter.safetensors")
    # The all-reduce sums in another order than one batch's mean (~1e-7 relative on the gradients).
    # Adam's first update is lr * g / (|g| + eps): an element whose gradient is ~eps (1e-8), i.e. all
    # rounding, moves by a rounding-dependent fraction of lr (measured: 1 element in 768 off by 0.05 lr,
    # the rest within 1e-5 relative). So: per tensor, at most 0.5% of the elements beyond 1e-4 of the
    # tensor's scale and none beyond lr. A DDP bug (unaveraged or repeated samples) moves most elements
    # by ~lr.
    lr = 1e-3
    for k in a:
        d = (a[k] - b[k]).abs()
        off = (d > 1e-4 * b[k].abs().max()).float().mean().item()
        assert off <= 0.005 and d.max() <= lr, (k, off, d.max().item())


@pytest.mark.slow
def test_fsdp_equals_ddp(snapshot, tmp_path):
    """FSDP2 (the base sharded over 2 processes) gives the DDP run's adapter, and resumes."""
    data = write_pairs(tmp_path / "data", n=8)
    args = ["--optimizer", "adamw", "--lr", "1e-3", "--rank", "4", "--batch", "1", "--save-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, *extra):
        torchrun(["-m", "train.train", "--weights", str(snapshot), "--data", str(data), "--out", str(out), *COMMON,
                  *args, *map(str, extra)], env)
    run(tmp_path / "ddp", "--steps", "4")
    run(tmp_path / "fsdp", "--steps", "2", "--fsdp")
    run(tmp_path / "fsdp", "--steps", "4", "--fsdp", "--resume", tmp_path / "fsdp")
    a, b = load_file(tmp_path / "ddp" / "adapter.safetensors"), load_file(tmp_path / "fsdp" / "adapter.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:  # reduce-scatter vs all-reduce: another summation order (see the DDP test)
        assert rel_err(b[k], a[k]) <= 1e-4, (k, rel_err(b[k], a[k]))


def test_export_loads_in_diffusers(snapshot, tmp_path):
    from diffusers import FluxTransformer2DModel

    from flux_minimal import load_flux
    from flux_minimal.lora_files import load_lora
    from tests.test_mmdit import inputs, run_diffusers, run_ours
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    train(snapshot, data, out, "--steps", "3", "--optimizer", "adamw", "--lr", "1e-2", "--rank", "4",
          "--preview-every", "3", "--preview-steps", "2")
    assert Image.open(out / "preview_0000003.png").size == (3 * 64, 64)  # source | edit | target
    ours = load_flux(snapshot)
    load_lora(ours, out / "adapter.safetensors")
    ref = FluxTransformer2DModel.from_pretrained(snapshot / "transformer")
    ref.load_lora_adapter(str(out / "pytorch_lora_weights.safetensors"), prefix="transformer")
    x = inputs(ours.params)
    assert rel_err(run_ours(ours, x), run_diffusers(ref.eval(), x)) <= 1e-5
    assert rel_err(run_ours(ours, x), run_ours(load_flux(snapshot), x)) > 1e-4  # the training changed something


def test_corrupt_and_missing_images_are_skipped_and_counted(snapshot, tmp_path, capsys):
    data = write_pairs(tmp_path / "data", n=4, extra_lines=[
        json.dumps({"source": "img/missing.png", "target": "img/t0.png", "instruction": "x"}),
        json.dumps({"source": "img/corrupt.png", "target": "img/t0.png", "instruction": "x"}),
        "this is not json"])
    (data / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    pairs = EditPairs([data], resolution=64)
    assert len(pairs) == 6 and sum(pairs.skipped.values()) == 1  # the bad line
    got = [pairs.sample(g, seed=0) for g in range(12)]  # two epochs
    assert sum(s is None for s in got) == 4 and sum(pairs.skipped.values()) == 5
    assert train(snapshot, data, tmp_path / "run", "--steps", "4", "--batch", "3", "--optimizer", "adamw") == 0
    assert "skipped" in capsys.readouterr().out


def test_parquet_readers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    def png_bytes(color):
        buf = io.BytesIO()
        Image.new("RGB", (80, 64), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    pq.write_table(pa.Table.from_pylist([{"source_img": png_bytes("red"), "target_img": png_bytes("blue"),
                                          "instruction": "make it blue", "img_id": "1"}]), tmp_path / "mb.parquet")
    pq.write_table(pa.Table.from_pylist([{"src_img": png_bytes((0, 255, 0)), "edited_img": png_bytes("white"),
                                          "edited_prompt_list": ["whiten it", "make it white"], "task": "attr"}]),
                   tmp_path / "omni.parquet")
    pairs = EditPairs([tmp_path / "mb.parquet", tmp_path / "omni.parquet"], resolution=64, drop_prompt_p=0.0)
    kinds = {pairs.record(i)[0] for i in range(len(pairs))}
    assert kinds == {"magicbrush", "omniedit"}
    for g in range(2):
        i, d, prompt = pairs.sample(g, seed=1)
        assert d.shape == (3, 64, 128) and "the same as on the left but" in prompt
        left, right = d[:, 32, 10], d[:, 32, 100]
        if pairs.record(i)[0] == "magicbrush":
            assert left[0] > 0.9 and right[2] > 0.9 and "make it blue" in prompt
        else:
            assert left[1] > 0.9 and right.min() > 0.9 and ("whiten it" in prompt or "make it white" in prompt)


def write_magicbrush_parquet(path: Path, rows: int, side: int = 64, group: int = 3) -> Path:
    """A parquet file in MagicBrush's schema, `group` rows per row group: row k's source is grey level
    k, its target inverted (so a test can tell which row it got)."""
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=0)
        return {"bytes": buf.getvalue(), "path": None}
    writer = None
    for g0 in range(0, rows, group):
        batch = []
        for k in range(g0, min(rows, g0 + group)):
            a = np.full((side, side, 3), k, np.uint8)
            batch.append({"img_id": str(k), "turn_index": 1, "source_img": png(a), "mask_img": png(a),
                          "instruction": f"edit {k}", "target_img": png(255 - a)})
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def test_parquet_is_read_lazily_a_row_group_at_a_time(tmp_path, monkeypatch):
    """Nothing but the footer is read at start; an epoch visits the row groups a window at a time, so
    with the window's groups cached each group is read once per epoch; the order is a permutation."""
    import pyarrow.parquet as pq

    from train.data import COLUMNS
    path = write_magicbrush_parquet(tmp_path / "mb.parquet", rows=21, group=3)  # 7 groups
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, columns=None, **kw: reads.append((g, tuple(columns))) or real(self, g, columns, **kw))
    pairs = EditPairs([path], resolution=32, drop_prompt_p=0.0, window=2)
    assert len(pairs) == 21 and reads == []
    for epoch in range(2):
        got = [pairs.sample(g, seed=0) for g in range(21 * epoch, 21 * epoch + 21)]
        order = [i for i, _, _ in got]
        assert sorted(order) == list(range(21))
        for i, d, prompt in got:  # the right row: grey level i on the left, inverted on the right
            assert prompt.endswith(f"edit {i}")
            assert abs((d[0, 5, 5].item() + 1) * 127.5 - i) < 1 and abs((d[0, 5, 40].item() + 1) * 127.5 - (255 - i)) < 1
        windows = [{i // 3 for i in order[k:k + 6]} for k in (0, 6, 12, 18)]
        assert [len(w) for w in windows] == [2, 2, 2, 1], windows  # a window: 2 whole groups, shuffled
        if epoch == 0:
            assert len(reads) == 7  # each group once
    # epoch 1 reads each group once too, but one of epoch 0's last window may still be cached
    assert len(reads) in (13, 14) and {c for _, c in reads} == {COLUMNS["magicbrush"]}  # only 3 columns


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_parquet_file(snapshot, tmp_path):
    """Two training steps on a ~100 MB parquet file peak at most 60 MB above the same run on a
    one-group file (reading the whole file, as before, costs twice its size)."""
    pytest.importorskip("pyarrow")
    from flux_bench.data import make_parquet  # noise PNGs, which do not compress: a big file fast
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    make_parquet(small, rows=4, side=512, group=4)
    make_parquet(big, rows=64, side=512, group=4)
    assert big.stat().st_size > 90e6

    def peak_mb(data, out):
        code = ("import resource, sys; from train.train import main; main(sys.argv[1:]); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        r = subprocess.run([sys.executable, "-c", code, "--weights", str(snapshot), "--data", str(data), "--out",
                            str(out), *COMMON, "--steps", "2", "--batch", "2"], cwd=REPO, check=True,
                           capture_output=True, text=True)
        return float(r.stdout.split("PEAK")[-1])
    base, got = peak_mb(small, tmp_path / "s"), peak_mb(big, tmp_path / "b")
    assert got - base < 60, (base, got)
