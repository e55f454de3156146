"""The evaluation sets, read into one shape: a session of turns (MagicBrush has several, the others one).

    magicbrush  the MagicBrush test set: the Hub's parquet (img_id, turn_index, source_img, target_img,
                instruction) or the released folder (edit_sessions.json + images/<img_id>/*.png);
                optional global_descriptions.json beside it gives CLIP-T captions
    emu         the Emu Edit test set's parquet (image, instruction, input_caption, output_caption, ...),
                with the filtering of `emu_keep`; it has no target images
    mini        held-out edits of the shapes world (mini_world), judged by its checker

Each reader returns (sessions, dropped): `dropped` counts what was left out and why.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flux_minimal.errors import FluxMinimalError


@dataclass
class Turn:
    """One edit. The images are kept as read (a path, encoded bytes, or a PIL image) and decoded
    when asked for, so a test set of thousands of images is not held decoded in memory."""

    instruction: str
    source_ref: object  # the ground-truth input of this turn
    target_ref: object = None  # the ground-truth output (None: Emu Edit)
    caption: str | None = None  # the output's caption (CLIP-T / CLIP-Out), if the set has one
    source_caption: str | None = None
    record: object = None  # the mini world's EditRecord (its checker's ground truth)

    @property
    def source(self) -> Image.Image:
        return _open(self.source_ref)

    @property
    def target(self) -> Image.Image | None:
        return None if self.target_ref is None else _open(self.target_ref)


@dataclass
class Session:
    id: str  # a file-name-safe identifier, unique in the set
    turns: list[Turn] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. the Emu task or the mini edit type


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    return Image.open(value).convert("RGB")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _parquet_rows(path: Path, columns: list[str]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FluxMinimalError("reading parquet needs pyarrow: pip install pyarrow") from None
    files = [path] if path.is_file() else sorted(path.glob("*.parquet")) + sorted(path.glob("*/*.parquet"))
    if not files:
        raise FluxMinimalError(f"{path}: no .parquet files")
    rows = []
    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise FluxMinimalError(f"{f}: missing column(s) {missing}; found {names}")
        rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


# ---- MagicBrush ---------------------------------------------------------------------------------

def read_magicbrush(path: str | Path) -> tuple[list[Session], Counter]:
    path, dropped = Path(path), Counter()
    captions = {}
    for c in (path / "global_descriptions.json", path.parent / "global_descriptions.json"):
        if c.is_file():
            captions = json.loads(c.read_text())
            break
    if (path / "edit_sessions.json").is_file():
        sessions = _magicbrush_folder(path, captions, dropped)
    else:
        sessions = _magicbrush_parquet(path, captions, dropped)
    return sessions, dropped


def _caption(captions: dict, img_id: str, output_name: str) -> str | None:
    per = captions.get(str(img_id))
    return per.get(output_name) if isinstance(per, dict) else None


def _magicbrush_folder(path: Path, captions: dict, dropped: Counter) -> list[Session]:
    """edit_sessions.json: {img_id: [{"input": name, "mask": name, "output": name, "instruction": str}, ...]},
    the images in images/<img_id>/ (or beside the json)."""
    sessions = []
    for img_id, turns in sorted(json.loads((path / "edit_sessions.json").read_text()).items()):
        folder = path / "images" / img_id if (path / "images" / img_id).is_dir() else path
        s = Session(_safe(img_id))
        try:
            for t in turns:
                paths = folder / t["input"], folder / t["output"]
                missing = [p.name for p in paths if not p.is_file()]
                if missing:
                    raise FileNotFoundError(missing[0])
                s.turns.append(Turn(t["instruction"], *paths, _caption(captions, img_id, t["output"])))
        except (OSError, KeyError) as e:
            dropped[f"unreadable session ({type(e).__name__}: {e})"] += 1
            continue
        sessions.append(s)
    return sessions


def _magicbrush_parquet(path: Path, captions: dict, dropped: Counter) -> list[Session]:
    rows = _parquet_rows(path, ["img_id", "turn_index", "source_img", "target_img", "instruction"])
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(str(r["img_id"]), []).append(r)
    sessions = []
    for img_id, turns in sorted(by_id.items()):
        turns.sort(key=lambda r: int(r["turn_index"]))
        s = Session(_safe(img_id))
        for r in turns:
            out_name = f"{img_id}-output{int(r['turn_index'])}.png"
            s.turns.append(Turn(r["instruction"], r["source_img"], r["target_img"], _caption(captions, img_id, out_name)))
        sessions.append(s)
    return sessions


# ---- Emu Edit -----------------------------------------------------------------------------------

PLACEHOLDERS = {"", "none", "n/a", "na", "null", "placeholder", "caption", "..."}


def emu_keep(row: dict) -> str | None:
    """None if the row is kept, else why not: a caption that is empty or a placeholder, or identical
    input and output captions (CLIP-Out cannot tell an edit from a copy there)."""
    a, b = (" ".join(str(row.get(k) or "").split()) for k in ("input_caption", "output_caption"))
    if a.lower().strip(". ") in PLACEHOLDERS or b.lower().strip(". ") in PLACEHOLDERS:
        return "placeholder caption"
    if a.lower() == b.lower():
        return "identical input and output captions"
    return None


def read_emu(path: str | Path) -> tuple[list[Session], Counter]:
    rows = _parquet_rows(Path(path), ["image", "instruction", "input_caption", "output_caption", "task", "idx"])
    sessions, dropped = [], Counter()
    for r in rows:
        why = emu_keep(r)
        if why:
            dropped[why] += 1
            continue
        turn = Turn(r["instruction"], r["image"], None, r["output_caption"], r["input_caption"])
        sessions.append(Session(_safe(f"{r['task']}_{r['idx']}"), [turn], {"task": r["task"]}))
    return sessions, dropped


# ---- the shapes world ---------------------------------------------------------------------------

def read_mini(per_type: int, seed: int = 0) -> tuple[list[Session], Counter]:
    from mini_world import world
    examples = world.make_split(per_type * len(world.EDIT_TYPES), seed, 64, split="heldout")
    return [Session(f"{i:05d}_{ex.record.edit_type}", [Turn(ex.instruction, ex.source, ex.target, record=ex.record)],
                    {"type": ex.record.edit_type}) for i, ex in enumerate(examples)], Counter()
