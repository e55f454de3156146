"""The evaluation sets, read into one shape: a session of turns (MagicBrush has several, the others one).

    magicbrush  one split, by name (--split, default test). The test set exists only as the released
                zip (OSU-NLP-Group/MagicBrush's README links it, password "MagicBrush"): unzipped, a
                folder with edit_sessions.json, images/<img_id>/*.png and global_descriptions.json
                (CLIP-T captions; the script's own default name global_description.json is read too).
                The Hub's osunlp/MagicBrush holds train and dev only (data/train-*.parquet,
                data/dev-*.parquet: img_id, turn_index, source_img, mask_img, instruction, target_img);
                a parquet file is read only where its name (or its folder's) says its split.
    emu         the Emu Edit parquet (image, instruction, task, split, idx, hash, input_caption,
                output_caption): the Hub's files hold validation and test rows, and only the rows
                whose `split` column is --split (default test) are read; then the filtering of `emu_keep`.
                It has no target images
    mini        held-out edits of the shapes world (mini_world), judged by its checker

Each reader returns (sessions, report): the report says which split was read, how many rows each
split had, and what was left out and why. Images are decoded two ways: as the reference's metric
script reads them (`as_reference`: `Image.open(...).convert("RGB")`, no EXIF rotation, alpha
dropped) for the metrics, and as our editor reads any input (`to_rgb`: EXIF applied, alpha on
white) for editing.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flux_minimal.errors import FluxMinimalError
from flux_minimal.images import to_rgb

MAGICBRUSH_SPLITS = ("train", "dev", "test")
MAGICBRUSH_TEST_HELP = (
    "MagicBrush's test set is not on the Hub (osunlp/MagicBrush has only train and dev, and ICEdit trained on "
    "train): download the zip linked from github.com/OSU-NLP-Group/MagicBrush (password \"MagicBrush\"), unzip it "
    "and pass --data the folder holding edit_sessions.json (README, Evaluation). --split dev scores the Hub's dev "
    "split instead, reported as dev")
CAPTION_FILES = ("global_descriptions.json", "global_description.json")  # the zip's name, image_eval.py's default


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
        """The input as the metrics see it (the reference's plain convert)."""
        return as_reference(self.source_ref)

    @property
    def source_for_edit(self) -> Image.Image:
        """The input as our editor reads any image (EXIF orientation applied, alpha composited on white)."""
        return to_rgb(decode(self.source_ref))

    @property
    def target(self) -> Image.Image | None:
        return None if self.target_ref is None else as_reference(self.target_ref)


@dataclass
class Session:
    id: str  # a file-name-safe identifier, unique in the set
    turns: list[Turn] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. the Emu task or the mini edit type


@dataclass
class ReadReport:
    """What a reader read: the split, the rows found per split (those not asked for are counted, not
    read), what was dropped and why, and notes (e.g. renamed duplicate ids)."""

    split: str | None = None
    found: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.found:
            parts.append("rows found per split: " + ", ".join(
                f"{s} {n}" + ("" if s == self.split else " (not read)") for s, n in sorted(self.found.items())))
        if self.dropped:
            parts.append(f"dropped {sum(self.dropped.values())}: "
                         + ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        return "; ".join(parts + self.notes)


def decode(value) -> Image.Image:
    """A path, encoded bytes, a datasets-style {"bytes", "path"} dict or a PIL image -> PIL, as stored."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    img = Image.open(value)
    img.load()
    return img


def as_reference(value) -> Image.Image:
    """MagicBrush's image_eval.py: `Image.open(path).convert("RGB")`: no EXIF rotation, alpha dropped."""
    return decode(value).convert("RGB")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FluxMinimalError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _parquet_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FluxMinimalError(f"{path}: no such file or folder (--data)")
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FluxMinimalError(f"{path}: no .parquet files")
    return files


def _check_columns(pq, f: Path, columns: list[str]) -> None:
    names = pq.ParquetFile(f).schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise FluxMinimalError(f"{f}: missing column(s) {missing}; found {names}")


# ---- MagicBrush ---------------------------------------------------------------------------------

def read_magicbrush(path: str | Path, split: str = "test") -> tuple[list[Session], ReadReport]:
    """The sessions of one split: the released folder (its test set) or the Hub's parquet files of that split."""
    path, report = Path(path), ReadReport(split)
    for folder in (path, path / split):
        if (folder / "edit_sessions.json").is_file():
            return _magicbrush_folder(folder, split, report), report
    return _magicbrush_parquet(path, split, report), report


def _captions(folder: Path) -> dict:
    for name in CAPTION_FILES:
        for c in (folder / name, folder.parent / name):
            if c.is_file():
                try:
                    return json.loads(c.read_text())
                except json.JSONDecodeError as e:
                    raise FluxMinimalError(f"{c} is not valid JSON ({e}): re-extract it from the test zip") from None
    return {}


def _caption(captions: dict, img_id: str, output_name: str) -> str | None:
    per = captions.get(str(img_id))
    return per.get(output_name) if isinstance(per, dict) else None


def _magicbrush_folder(path: Path, split: str, report: ReadReport) -> list[Session]:
    """edit_sessions.json: {img_id: [{"input": name, "mask": name, "output": name, "instruction": str}, ...]},
    the images in images/<img_id>/ (or beside the json). This is how the test zip is released, so the
    folder is the test set unless its name says train or dev."""
    holds = path.name if path.name in MAGICBRUSH_SPLITS else "test"
    if holds != split:
        raise FluxMinimalError(f"{path}: this folder holds MagicBrush's {holds} set, not {split}; "
                               f"pass --split {holds} or the folder of the {split} set")
    captions = _captions(path)
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
            report.dropped[f"unreadable session ({type(e).__name__}: {e})"] += 1
            continue
        sessions.append(s)
    report.found[split] = sum(len(s.turns) for s in sessions)
    return sessions


def _split_of(f: Path, root: Path) -> str | None:
    """The split a parquet file's name says ("dev-00000-of-00001.parquet" as on the Hub, or "dev.parquet"),
    else the folder it is in, up to --data itself, named exactly after a split; None when none says."""
    m = re.match(r"(train|dev|test)(?:$|-)", f.stem.lower())
    if m:
        return m.group(1)
    folders = [*(p.name for p in f.relative_to(root).parents if p.name), root.name] if root.is_dir() else []
    return next((name.lower() for name in folders if name.lower() in MAGICBRUSH_SPLITS), None)


def _magicbrush_parquet(path: Path, split: str, report: ReadReport) -> list[Session]:
    pq = _pyarrow()
    by_split: dict[str | None, list[Path]] = {}
    for f in _parquet_files(path):
        by_split.setdefault(_split_of(f, path), []).append(f)
    for s, files in by_split.items():
        if s is not None:
            report.found[s] = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if split not in by_split:
        found = ", ".join(f"{s} ({n} rows)" for s, n in sorted(report.found.items())) or "none"
        unnamed = by_split.get(None, [])
        hint = (f"; {len(unnamed)} file(s) whose name says no split (e.g. {unnamed[0]}): name each after its split, "
                f"as the Hub does (dev-00000-of-00001.parquet), or put it in a folder named so") if unnamed else ""
        what_now = MAGICBRUSH_TEST_HELP if split == "test" else "Pass --split with one of the splits found"
        raise FluxMinimalError(f"{path}: no MagicBrush {split} parquet files; splits found: {found}{hint}. {what_now}")
    columns = ["img_id", "turn_index", "source_img", "target_img", "instruction"]
    rows = []
    for f in by_split[split]:
        _check_columns(pq, f, columns)
        rows += pq.read_table(f, columns=columns).to_pylist()
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(str(r["img_id"]), []).append(r)
    captions = _captions(path if path.is_dir() else path.parent)
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
EMU_COLUMNS = ["image", "instruction", "input_caption", "output_caption", "task", "idx", "split"]


def emu_keep(row: dict) -> str | None:
    """None if the row is kept, else why not: a caption that is empty or a placeholder, or identical
    input and output captions (CLIP-Out cannot tell an edit from a copy there)."""
    a, b = (" ".join(str(row.get(k) or "").split()) for k in ("input_caption", "output_caption"))
    if a.lower().strip(". ") in PLACEHOLDERS or b.lower().strip(". ") in PLACEHOLDERS:
        return "placeholder caption"
    if a.lower() == b.lower():
        return "identical input and output captions"
    return None


def read_emu(path: str | Path, split: str = "test") -> tuple[list[Session], ReadReport]:
    """The rows of one split (the `split` column), filtered by `emu_keep`; session ids
    "<split>_<task>_<idx>", made unique (idx is not unique across splits, and need not be within one)."""
    pq, report = _pyarrow(), ReadReport(split)
    files = _parquet_files(Path(path))
    for f in files:
        _check_columns(pq, f, EMU_COLUMNS)
        report.found.update(str(s) for s in pq.read_table(f, columns=["split"]).column("split").to_pylist())
    if not report.found[split]:
        found = ", ".join(f"{s} ({n} rows)" for s, n in sorted(report.found.items())) or "no rows"
        raise FluxMinimalError(f"{path}: no Emu Edit rows whose split column is {split!r}; found {found}. "
                               f"Pass --split with one of those")
    rows = [r for f in files
            for r in pq.read_table(f, columns=EMU_COLUMNS, filters=[("split", "==", split)]).to_pylist()]
    sessions = []
    for r in rows:
        why = emu_keep(r)
        if why:
            report.dropped[why] += 1
            continue
        turn = Turn(r["instruction"], r["image"], None, r["output_caption"], r["input_caption"])
        sessions.append(Session(_safe(f"{split}_{r['task']}_{r['idx']}"), [turn], {"task": r["task"]}))
    renamed = unique_ids(sessions)
    if renamed:
        report.notes.append(f"{renamed} repeated session id(s) given a suffix (_2, _3, ...)")
    return sessions, report


def unique_ids(sessions: list[Session]) -> int:
    """Suffix repeated ids (_2, _3, ... in reading order) so no two sessions share an edits folder
    or a results line; returns how many were renamed."""
    seen: Counter = Counter(s.id for s in sessions)
    used, renamed = set(), 0
    for s in sessions:
        if s.id in used:
            k = 2
            while f"{s.id}_{k}" in used or f"{s.id}_{k}" in seen:
                k += 1
            s.id, renamed = f"{s.id}_{k}", renamed + 1
        used.add(s.id)
    return renamed


# ---- the shapes world ---------------------------------------------------------------------------

def read_mini(per_type: int, seed: int = 0) -> tuple[list[Session], ReadReport]:
    from mini_world import world
    examples = world.make_split(per_type * len(world.EDIT_TYPES), seed, 64, split="heldout")
    return [Session(f"{i:05d}_{ex.record.edit_type}", [Turn(ex.instruction, ex.source, ex.target, record=ex.record)],
                    {"type": ex.record.edit_type}) for i, ex in enumerate(examples)], ReadReport("heldout")
