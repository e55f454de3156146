"""Triton top-1 LoRA-MoE kernels (flux_kernels/lora_moe.py) against their torch reference.

The kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest.py before triton is
imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run the compiled kernels.

Tolerances are derived, not guessed. Every output and gradient is compared with an fp64 oracle:
the reference run on the very same (already rounded) inputs upcast to fp64. In each dtype the
kernel's relative error must be <= 2x the reference's own error in that dtype, plus a floor of a
quarter of the dtype's unit roundoff (so that an exactly representable case cannot demand 0).
The routing is planted with a wide margin so that fp64 and the low precision pick the same
experts (asserted); exact ties are tested separately, kernel against reference in one dtype.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flux_kernels.lora_moe as lm
from flux_kernels.lora_moe import (_group_by_expert, lora_moe_linear, lora_moe_linear_ref,
                              lora_moe_linear_triton, route)
from tests.helpers import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="Triton needs TRITON_INTERPRET=1 on the CPU, or a CUDA GPU")

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOL = {dt: (2.0, u / 4) for dt, u in UNIT_ROUNDOFF.items()}  # (factor on the ref's error, floor)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["y", "dx", "dW", "db", "dA", "dB"]


def make_case(T, K, N, E, r, dtype, bias=True, margin=8.0, seed=0):
    """Inputs with a planted routing: orthonormal router rows, x_t = noise + margin * R[e_t], so
    the winning logit leads by ~margin, far above any rounding. Returns (inputs, planted e)."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.randint(E, (T,), generator=g)
    router = torch.linalg.qr(torch.randn(K, E, generator=g))[0].t()      # (E, K), orthonormal
    x = torch.randn(T, K, generator=g) + margin * router[expert]
    weight = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) * 0.5 if bias else None
    lora_A = torch.randn(E, r, K, generator=g) / K ** 0.5
    lora_B = torch.randn(E, N, r, generator=g) / r ** 0.5  # non-zero: a zero B would hide bugs
    inputs = [t if t is None else t.to(dtype).to(DEVICE)
              for t in (x, weight, b, lora_A, lora_B, router)]
    return inputs, expert


def run(fn, inputs, dy, scale, **kw):
    """Forward + backward; returns [y, dx, dW, db, dA, dB] and the router's gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, scale, **kw)
    y.backward(dy)
    grads = [None if t is None else t.grad for t in leaves[:5]]
    return [y.detach(), *grads], leaves[5].grad


def compare(got, ref_lowp, oracle, dtype, names=NAMES):
    """The derived check, with a verbose table of every tensor on failure."""
    factor, floor = TOL[dtype]
    rows, bad = [], []
    for name, k, r, o in zip(names, got, ref_lowp, oracle):
        if o is None:
            assert k is None and r is None, f"{name}: expected no gradient"
            continue
        e_k, e_r = rel_err(k, o), rel_err(r, o)
        bound = factor * e_r + floor
        ok = e_k <= bound
        diff = (k.double() - o).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        rows.append(f"{name:>3} {str(tuple(k.shape)):>14}  kernel {e_k:.2e}  ref {e_r:.2e}  "
                    f"bound {bound:.2e}  max|diff| {diff.max().item():.2e} at {where}  "
                    f"{'ok' if ok else 'MISMATCH'}")
        bad += [] if ok else [name]
    report = "\n".join(rows)
    print(report)
    assert not bad, f"{bad} exceed 2x the reference's own {dtype} error:\n{report}"


# (T, K, N, E, r, bias): odd sizes; the interpreter's blocks are 16 (tokens) and 32 (K, N)
CASES = [
    (1, 17, 5, 8, 4, True),     # one token, rank 4 padded to 16, seven empty experts
    (7, 64, 48, 1, 12, False),  # a single expert, no bias, rank not a power of two
    (33, 17, 5, 4, 32, True),   # several tiles per expert, K and N not multiples of the block
    (33, 64, 48, 8, 16, False),
    (7, 100, 48, 4, 8, True),   # K = 100: two K-splits of two blocks each, the last one partial
]


@pytest.mark.parametrize("fuse_base", [False, True], ids=["cublas_base", "fused_base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,N,E,r,bias", CASES)
def test_forward_and_every_gradient(T, K, N, E, r, bias, dtype, fuse_base):
    inputs, planted = make_case(T, K, N, E, r, dtype, bias)
    x, router = inputs[0], inputs[5]
    inputs64 = [None if t is None else t.double() for t in inputs]
    chosen = route(x, router)[1][:, 0].cpu()
    assert torch.equal(chosen, planted) and torch.equal(
        route(inputs64[0], inputs64[5])[1][:, 0].cpu(), planted), "planted routing not kept"
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    scale = 0.75

    got, dr_k = run(lora_moe_linear_triton, inputs, dy, scale, fuse_base=fuse_base)
    ref, dr_r = run(lora_moe_linear_ref, inputs, dy, scale)
    oracle, _ = run(lora_moe_linear_ref, inputs64, dy.double(), scale)
    print(f"\nT={T} K={K} N={N} E={E} r={r} bias={bias} {dtype} fuse_base={fuse_base}")
    compare(got, ref, oracle, dtype)
    # top-1: the router's gradient is exactly zero, as autograd gives it in the reference
    assert torch.equal(dr_r, torch.zeros_like(router)) and torch.equal(dr_k, dr_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_3d_input_through_the_switch_point(dtype):
    B, L, K, N, E, r = 2, 5, 17, 48, 4, 8
    inputs, _ = make_case(B * L, K, N, E, r, dtype)
    inputs[0] = inputs[0].reshape(B, L, K)  # (B, L, K)
    inputs64 = [t.double() for t in inputs]
    dy = torch.randn(B, L, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got, _ = run(lora_moe_linear, inputs, dy, 1.0)
    ref, _ = run(lora_moe_linear_ref, inputs, dy, 1.0)
    oracle, _ = run(lora_moe_linear_ref, inputs64, dy.double(), 1.0)
    assert got[0].shape == (B, L, N) and got[1].shape == (B, L, K)
    compare(got, ref, oracle, dtype)


def test_frozen_base_and_no_input_grad():
    """LoRA training: W, b frozen, x a leaf without grad; only dA, dB (and the zero dR)."""
    dtype = torch.bfloat16
    inputs, _ = make_case(33, 17, 48, 4, 8, dtype)
    dy = torch.randn(33, 48, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    outs = {}
    for name, fn, dt in [("kernel", lora_moe_linear_triton, dtype), ("ref", lora_moe_linear_ref, dtype),
                         ("oracle", lora_moe_linear_ref, torch.float64)]:
        x, w, b, a, bb, rt = [t.to(dt).detach() for t in inputs]
        a.requires_grad_(), bb.requires_grad_()
        y = fn(x, w, b, a, bb, rt, 1.0)
        y.backward(dy.to(dt))
        assert x.grad is None and w.grad is None and b.grad is None and rt.grad is None
        outs[name] = [y.detach(), a.grad, bb.grad]
    compare(outs["kernel"], outs["ref"], outs["oracle"], dtype, names=["y", "dA", "dB"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_router_ties_pick_the_same_expert_as_the_reference(dtype):
    """Exact ties: rows 1 and 3 of the router are equal, and a third of the tokens are zero (all
    logits 0). torch.topk decides; the kernel path calls the same `route`, so it must agree with
    the reference exactly on which expert's (different) LoRA is applied."""
    T, K, N, E, r = 33, 17, 48, 4, 8
    inputs, _ = make_case(T, K, N, E, r, dtype, margin=0.0)
    x, router = inputs[0], inputs[5]
    router[3] = router[1]
    x[::3] = 0
    logits = torch.nn.functional.linear(x, router)
    assert torch.equal(logits[:, 1], logits[:, 3]), "precondition: exact ties"
    idx = route(x, router)[1][:, 0]
    assert torch.equal(idx, torch.topk(logits, 1, dim=-1).indices[:, 0])  # the tie rule: topk's
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got, _ = run(lora_moe_linear_triton, inputs, dy, 1.0)
    ref, _ = run(lora_moe_linear_ref, inputs, dy, 1.0)
    # one dtype on both sides and the same routing: only accumulation order differs
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    errs = {n: rel_err(k, r_) for n, k, r_ in zip(NAMES, got, ref)}
    print(errs)
    assert all(e <= tol for e in errs.values()), errs
    # a wrong tie-break would show as a wholly different LoRA term on the tied tokens
    tied = (logits[:, 1] == logits.max(-1).values) & (x.abs().sum(-1) > 0)
    if tied.any():
        assert rel_err(got[0][tied], ref[0][tied]) <= tol


@pytest.mark.parametrize("T,E,block", [(1, 1, 16), (1, 8, 16), (33, 4, 16), (200, 3, 64), (64, 2, 16)])
def test_grouping_covers_every_token_once_with_one_expert_per_tile(T, E, block):
    expert = torch.randint(E, (T,), generator=torch.Generator().manual_seed(T))
    g = _group_by_expert(expert, E, block)
    seen = torch.zeros(T, dtype=torch.long)
    assert g.tile_expert.numel() <= T // block + E
    for e, s, t in zip(g.tile_expert.tolist(), g.tile_start.tolist(), g.tile_end.tolist()):
        assert 0 <= t - s <= block and 0 <= e < E
        toks = g.order[s:t]
        assert torch.all(expert[toks] == e), "a tile mixes experts"
        seen[toks] += 1
    assert torch.all(seen == 1), "a token is missing or duplicated"
    assert torch.equal(g.seg_end - g.seg_start, torch.bincount(expert, minlength=E).to(torch.int32))


def test_switch_point(monkeypatch):
    calls = []
    monkeypatch.setattr(lm, "lora_moe_linear_triton", lambda *a, **k: calls.append(1) or "triton")
    inputs, _ = make_case(3, 17, 5, 2, 4, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        assert isinstance(lora_moe_linear(*inputs), torch.Tensor) and not calls  # reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lora_moe_linear(*inputs) == "triton" and calls


def test_rejects_mixed_dtypes():
    inputs, _ = make_case(3, 17, 5, 2, 4, torch.bfloat16)
    inputs[5] = inputs[5].float()  # an fp32 router with bf16 activations
    with pytest.raises(TypeError, match="one dtype"):
        lora_moe_linear_triton(*inputs)


REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "flux_bench.lora_moe", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """No GPU needed: every launch of a bf16 forward + backward builds for sm_90 (wgmma)."""
    ptxas = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in this triton install")
    out = _bench("--compile-only", "--dtypes", "bf16", "--arch", "90")
    print(out.stdout[-3000:], out.stderr[-3000:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distinct kernel builds compiled for sm_90" in out.stdout and "wgmma" in out.stdout


@pytest.mark.gpu
def test_compiled_kernels_match_the_reference_on_gpu():
    """The compiled (not interpreted) kernels at a mid-size bf16 shape, forward and backward."""
    out = _bench("--tokens", "300", "--k", "520", "--n", "384")
    print(out.stdout[-4000:], out.stderr[-2000:])
    assert out.returncode == 0 and "MISMATCH" not in out.stdout, out.stdout[-4000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_benchmark_refuses_politely_without_cuda():
    out = _bench("--tokens", "16")
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


def test_every_kernel_launch_enters_its_tensors_device():
    """Triton launches on the current CUDA device: every `kernel[grid](...)` in flux_kernels/ must sit
    inside `with on_device(tensor):` (a pipeline on cuda:1 would otherwise launch GPU-1 pointers on
    GPU 0). Checked on the source, since a CPU has no second device to show it."""
    import ast
    launches, guarded = 0, 0
    for path in sorted((REPO / "flux_kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        inside = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "on_device"
                    for i in node.items):
                inside.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):  # kernel[grid](...)
                launches += 1
                assert id(node) in inside, f"{path.name}:{node.lineno}: a kernel launch outside `with on_device(...)`"
                guarded += 1
    assert launches >= 4 and guarded == launches  # down, up, wgrad, fp8 rows
    from flux_kernels.launch import on_device
    with on_device(torch.zeros(1)):  # off CUDA: nothing to enter
        pass
