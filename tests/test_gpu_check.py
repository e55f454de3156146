"""The prepared GPU check (flux_bench/gpu_check.py) runs end to end on a CPU at tiny shapes, so that
it cannot rot before a GPU arrives: every part finishes, ours agrees with diffusers in every mode,
the kernels with their reference, and the tuned blocks reach the kernels."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flux_kernels.lora_moe as lm
from flux_bench.gpu_check import part

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "flux_bench.gpu_check", "--device", "cpu", "--quick", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert time.perf_counter() - t0 < 120  # the bar for --quick on a CPU
    r = json.loads(out.read_text())
    assert {n: p["status"] for n, p in r["parts"].items()} == {n: "done" for n in
                                                                ("edit", "profile", "lora_moe", "fp8", "autotune")}
    for mode in ("eager", "cuda_graphs", "compiled", "compiled_cuda_graphs"):
        assert r["edit"][mode]["ok"] and r["edit"][mode]["rel_err"] <= 1e-4  # fp32 against diffusers
    kinds = [row.split("|")[1].strip() for row in r["profile"]["kinds"][2:]]
    assert kinds[:7] == ["attention", "linears", "modulation", "norms, RoPE", "LoRA-MoE", "VAE", "text encoders"]
    assert len(r["lora_moe"]["cases"]) == 4 and all(c["ok"] for c in r["lora_moe"]["cases"])
    assert r["fp8"]["psnr_db"] > 30  # FP8 against fp32, the tiny model: measured ~61 dB
    assert r["autotune"]["best"] in [c["blocks"] for c in r["autotune"]["candidates"] if c["ok"]]
    assert "| edit | compiled_cuda_graphs |" in run.stdout  # the printed table


def test_a_part_stops_at_its_cap_and_the_next_one_runs(tmp_path):
    results, out = {"parts": {}}, tmp_path / "r.json"
    with part("outer", 5.0, results, out) as r:
        with part("slow", 0.2, results, out) as inner:
            inner["started"] = True
            while True:
                time.sleep(0.01)
        r["after"] = True  # the outer part goes on after the inner one's cap
    assert results["parts"]["slow"]["status"] == "capped at 0.2 s" and results["slow"] == {"started": True}
    assert results["parts"]["outer"]["status"] == "done" and results["outer"]["after"]
    with part("broken", 5.0, results, out):
        raise ValueError("no such shape")
    assert results["parts"]["broken"]["status"] == "error: ValueError: no such shape"
    assert json.loads(out.read_text())["parts"]["broken"]  # rewritten after every part


def test_tuned_blocks_reach_the_kernels(tmp_path, monkeypatch):
    """The autotune's file is read per GPU name; use_blocks overrides it; a kernel launched with other
    blocks computes the same (the interpreter runs the launches)."""
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"NVIDIA H100 80GB HBM3": {"t": 128, "o": 256, "num_warps": 8}}))
    assert lm.tuned_blocks("NVIDIA H100 80GB HBM3", path) == lm.Blocks(t=128, o=256, num_warps=8)
    assert lm.tuned_blocks("NVIDIA H200", path) is None and lm.tuned_blocks("x", tmp_path / "none.json") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(40, 48, generator=g), torch.randn(24, 48, generator=g) / 7, torch.randn(24, generator=g)
    A, B, R = torch.randn(4, 8, 48, generator=g) / 7, torch.randn(4, 24, 8, generator=g) / 3, torch.randn(4, 48, generator=g)
    ref = lm.lora_moe_linear_ref(x, w, b, A, B, R)
    seen = []
    real = lm._group_by_expert
    monkeypatch.setattr(lm, "_group_by_expert", lambda e, n, block_t: seen.append(block_t) or real(e, n, block_t))
    with lm.use_blocks(lm.Blocks(t=32, d_down=16, o=16)):
        got = lm.lora_moe_linear_triton(x, w, b, A, B, R)
    assert seen == [32] and ((got - ref).norm() / ref.norm()) <= 1e-5  # fp32, different reduction blocks
    lm.lora_moe_linear_triton(x, w, b, A, B, R)
    assert seen == [32, 16]  # back to the interpreter's blocks
