"""Edit pairs for training: a folder format and the MagicBrush / OmniEdit parquet files.

Every sample becomes what ICEdit trains on: source and target resized to R x R, a diptych
[source | target] (R x 2R), the right half masked, the in-context prompt with the instruction,
and the prompt dropped to "" with probability 0.1 (the whole prompt, as the official code does).

    folder/pairs.jsonl   {"source": "src/1.png", "target": "tgt/1.png", "instruction": "..."} per line
    *.parquet            MagicBrush (source_img, target_img, instruction) or OmniEdit
                         (src_img, edited_img, edited_prompt_list); needs `pip install pyarrow`

A sample that cannot be read (missing file, corrupt image, bad line) is skipped and counted,
never fatal: `EditPairs.skipped` says how many and why.
"""

import io
import json
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from flux_minimal.errors import FluxMinimalError
from flux_minimal.images import IC_PROMPT, load_image, make_diptych, to_tensor

DROP_PROMPT_P = 0.1


class SkipSample(Exception):
    """This sample cannot be used; the reason is counted."""


def _image(value, base: Path | None) -> Image.Image:
    """A path (relative to the dataset), or a parquet image cell ({"bytes": ..., "path": ...})."""
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return load_image(Image.open(io.BytesIO(value)))
        path = Path(value)
        return load_image(path if path.is_absolute() or base is None else base / path)
    except FluxMinimalError as e:
        raise SkipSample(str(e)) from None
    except Exception as e:  # any decoder failure of a corrupt file: skip it, never crash training
        raise SkipSample(f"{type(e).__name__}: {e}") from None


class EditPairs:
    """All pairs of one or more sources. `sample(g, seed)` gives the g-th training sample as (pair index,
    diptych [3, R, 2R] in [-1, 1], prompt); `diptych(i)` and `prompt(i, rng)` give its parts."""

    def __init__(self, paths: list["str | Path"], resolution: int = 512, drop_prompt_p: float = DROP_PROMPT_P):
        self.resolution, self.drop_prompt_p = resolution, drop_prompt_p
        self.records: list[tuple[str, dict, Path | None]] = []  # (kind, record, base folder)
        self.skipped: Counter = Counter()
        for p in map(Path, paths):
            if p.is_dir() and (p / "pairs.jsonl").is_file():
                self._read_jsonl(p / "pairs.jsonl")
            elif p.suffix == ".jsonl":
                self._read_jsonl(p)
            elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
                for f in ([p] if p.is_file() else sorted(p.glob("*.parquet"))):
                    self._read_parquet(f)
            else:
                raise FluxMinimalError(f"{p}: not a dataset (expected a folder with pairs.jsonl, a .jsonl file, "
                                       f"or .parquet files)")
        if not self.records:
            raise FluxMinimalError(f"no training pairs found in {[str(p) for p in paths]}")

    def _read_jsonl(self, f: Path) -> None:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("source", "target", "instruction"))):
                self.skipped[f"{f.name}:{n}: not a {{source, target, instruction}} line"] += 1
                continue
            self.records.append(("pair", rec, f.parent))

    def _read_parquet(self, f: Path) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise FluxMinimalError("reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(f)
        cols = set(table.column_names)
        if {"source_img", "target_img", "instruction"} <= cols:
            for row in table.to_pylist():
                self.records.append(("magicbrush", row, f.parent))
        elif {"src_img", "edited_img", "edited_prompt_list"} <= cols:
            for row in table.to_pylist():
                self.records.append(("omniedit", row, f.parent))
        else:
            raise FluxMinimalError(f"{f}: columns {sorted(cols)} are neither MagicBrush (source_img, target_img, "
                                   f"instruction) nor OmniEdit (src_img, edited_img, edited_prompt_list)")

    def __len__(self) -> int:
        return len(self.records)

    def prompt(self, i: int, rng: random.Random) -> str:
        """The training prompt of pair i: the in-context prompt, or "" with probability 0.1."""
        kind, rec, _ = self.records[i]
        if kind == "omniedit":
            if not rec["edited_prompt_list"]:
                raise SkipSample("OmniEdit row without prompts")
            instruction = rng.choice(rec["edited_prompt_list"])
        else:
            instruction = rec["instruction"]
        drop = rng.random() < self.drop_prompt_p
        return "" if drop else IC_PROMPT.format(instruction=" ".join(instruction.split()))

    def diptych(self, i: int) -> torch.Tensor:
        """[source | target] of pair i, each resized to R x R: [3, R, 2R] in [-1, 1]."""
        kind, rec, base = self.records[i]
        keys = {"pair": ("source", "target"), "magicbrush": ("source_img", "target_img"),
                "omniedit": ("src_img", "edited_img")}[kind]
        src, tgt = _image(rec[keys[0]], base), _image(rec[keys[1]], base)
        if kind == "magicbrush":  # ICEdit crops MagicBrush's noisy bottom 1/32
            src, tgt = (im.crop((0, 0, im.width, im.height - im.height // 32)) for im in (src, tgt))
        R = self.resolution
        src, tgt = (im.resize((R, R), Image.Resampling.BICUBIC) for im in (src, tgt))
        return to_tensor(make_diptych(src, tgt))[0]

    def sample(self, g: int, seed: int, images: bool = True) -> tuple[int, torch.Tensor | None, str] | None:
        """The g-th sample of training (epochs of seeded permutations) as (pair index, diptych or
        None if not asked for, prompt). Its randomness (prompt drop, OmniEdit prompt choice) comes
        from (seed, g): identical however the batch is split across processes, and after a resume.
        None if the pair cannot be read (counted in `skipped`)."""
        epoch, k = divmod(g, len(self))
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._order = epoch, epoch_order(len(self), epoch, seed)
        i = self._order[k]
        try:
            prompt = self.prompt(i, random.Random(f"{seed}:{g}"))
            return i, self.diptych(i) if images else None, prompt
        except SkipSample as e:
            self.skipped[str(e)[:160]] += 1
            return None


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The visiting order of epoch `epoch`: a permutation drawn from (seed, epoch)."""
    order = list(range(n))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return order
