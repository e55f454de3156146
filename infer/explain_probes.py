"""What `python -m infer.explain` reads inside an edit, without changing it.

The joint sequence of one diptych, as every block sees it (text first, then the image row-major):

    [ txt (T) | img (rows x cols) ]      img column c < cols/2: the left half (the source)
                                                   c >= cols/2: the right half (the edit)

Attention. `flux_minimal.ops.observe_attention` hands us the rotated q, k [1, H, T+L, D] of each
attention call just before the fused kernel runs on them; for the blocks and steps asked we compute,
beside it, the probabilities of the right half's queries in chunks of rows,

    p = softmax(q_i k^T / sqrt(D))  [H, chunk, T+L] float32,   averaged over heads,

and keep only sums of p: its mass on the left half, the text and the right half (3 numbers per
query), and on each text token. A [T+L, T+L] map is never made: at 4096 image and 512 text tokens,
24 heads and 256 rows a chunk is 113 MB, and what is kept per block and step is O(L/2 + T).

Routing. A forward hook on each LoRA-MoE layer calls the kernel's own `route` on the layer's
input, the same call the layer makes, so the recorded expert is the one each token took. Text
tokens (routed too in single blocks) are left out: the maps are over the diptych's image tokens.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux_kernels.lora_moe import route
from flux_minimal.moe import LoRAMoELinear
from flux_minimal.ops import observe_attention

GROUPS = ("left", "text", "right")  # where a right-half query's attention goes


@dataclass(frozen=True)
class Layout:
    """Where the tokens of the joint sequence [txt; img] of one diptych sit."""

    text_len: int  # T
    rows: int  # token rows of the diptych
    cols: int  # token columns of the whole diptych (both halves; even)

    @property
    def image_len(self) -> int:
        return self.rows * self.cols

    def right_queries(self) -> Tensor:
        """Positions in [txt; img] of the right half's image tokens, row-major: [rows * cols/2]."""
        r, c = torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols // 2, self.cols), indexing="ij")
        return self.text_len + (r * self.cols + c).reshape(-1)

    def key_groups(self) -> Tensor:
        """The group (index into GROUPS) of every key of [txt; img]: [T + L] long."""
        col = torch.arange(self.cols).repeat(self.rows)  # [L], row-major
        img = torch.where(col < self.cols // 2, 0, 2)
        return torch.cat([torch.ones(self.text_len, dtype=torch.long), img])


@torch.no_grad()
def attention_rows(q: Tensor, k: Tensor, queries: Tensor, groups: Tensor, text_len: int,
                   chunk: int = 256) -> tuple[Tensor, Tensor]:
    """The head-mean attention of some queries, summed by key group and per text token.

    q, k [H, N, D] (one sample, rotated); queries [Q] positions; groups [N] group of each key
    (0..G-1); the first text_len keys are text. Returns mass [Q, G] (rows sum to 1) and
    text [Q, text_len], float32. Softmax statistics in float32, `chunk` query rows at a time.
    """
    D = k.shape[-1]
    G = int(groups.max()) + 1
    onehot = torch.nn.functional.one_hot(groups.to(k.device), G).float()  # [N, G]
    kf = k.float().transpose(-1, -2)  # [H, D, N]
    mass = torch.empty(len(queries), G, device=k.device)
    text = torch.empty(len(queries), text_len, device=k.device)
    for s in range(0, len(queries), chunk):
        idx = queries[s:s + chunk].to(q.device)
        p = torch.softmax(q[:, idx].float() @ kf * D ** -0.5, dim=-1).mean(0)  # [c, N]
        mass[s:s + chunk] = p @ onehot
        text[s:s + chunk] = p[:, :text_len]
    return mass, text


@dataclass
class AttentionRecord:
    """The attention of the right half's queries in one block at one step (means over queries)."""

    step: int
    block: str  # "double_blocks.0", "single_blocks.3"
    mass: list[float]  # share to GROUPS, sums to 1
    text: Tensor  # [T] mean probability of each text token
    per_query: Tensor  # [Q, 2]: each query's mass on the left half and on the instruction's tokens


@dataclass
class Recorder:
    """Hooks on a FLUX for one edit (a context manager): the step (one model call per step), the
    block running, its attention when (step, block) is asked, and every MoE layer's routing at the
    steps asked. The model's outputs are untouched."""

    model: nn.Module
    layout: Layout
    steps: set[int]  # steps whose attention and routing are read
    blocks: set[str]  # blocks whose attention is read
    instruction_tokens: list[int]  # positions of the instruction's tokens in the text
    chunk: int = 256
    attention: list[AttentionRecord] = field(default_factory=list)
    routing: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # (step, layer) -> expert [L]
    step: int = -1
    block: str | None = None

    def __enter__(self) -> "Recorder":
        self._queries, self._groups = self.layout.right_queries(), self.layout.key_groups()
        self._observing = observe_attention(self._observe)
        self._observing.__enter__()  # first: it refuses a second observer before any hook is in place
        self._handles = [self.model.register_forward_pre_hook(self._next_step)]
        for kind in ("double_blocks", "single_blocks"):
            for i, b in enumerate(getattr(self.model, kind)):
                self._handles.append(b.register_forward_pre_hook(lambda m, a, name=f"{kind}.{i}": self._enter(name)))
        self.moe_layers = [n for n, m in self.model.named_modules() if isinstance(m, LoRAMoELinear)]
        for name in self.moe_layers:
            layer = self.model.get_submodule(name)
            self._handles.append(layer.register_forward_hook(lambda m, a, out, name=name: self._route(name, m, a[0])))
        return self

    def __exit__(self, *exc) -> None:
        self._observing.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def _next_step(self, module, args) -> None:
        self.step += 1

    def _enter(self, name: str) -> None:
        self.block = name

    def _observe(self, q: Tensor, k: Tensor) -> None:
        if self.step not in self.steps or self.block not in self.blocks:
            return
        if q.shape[0] != 1:
            raise ValueError(f"explain reads one edit at a time (batch 1), not {q.shape[0]}")
        mass, text = attention_rows(q[0], k[0], self._queries, self._groups, self.layout.text_len, self.chunk)
        instr = text[:, self.instruction_tokens].sum(1)  # [Q]
        self.attention.append(AttentionRecord(self.step, self.block, mass.mean(0).tolist(), text.mean(0).cpu(),
                                              torch.stack([mass[:, 0], instr], 1).cpu()))

    def _route(self, name: str, layer: LoRAMoELinear, x: Tensor) -> None:
        if self.step not in self.steps:
            return
        x2 = x.reshape(-1, x.shape[-1])  # as the layer routes: every row of its input at once
        expert = route(x2, layer.lora_route.to(x.dtype))[1][:, 0]
        self.routing[(self.step, name)] = expert[-self.layout.image_len:].cpu()  # the image tokens come last
