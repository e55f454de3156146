"""Edit pairs for training: a folder format and the MagicBrush / OmniEdit parquet files.

Every sample becomes what ICEdit trains on: source and target resized to R x R, a diptych
[source | target] (R x 2R), the right half masked, the in-context prompt with the instruction,
and the prompt dropped to "" with probability 0.1 (the whole prompt, as the official code does).

    folder/pairs.jsonl   {"source": "src/1.png", "target": "tgt/1.png", "instruction": "..."} per line
    *.parquet            MagicBrush (source_img, target_img, instruction) or OmniEdit
                         (src_img, edited_img, edited_prompt_list); needs `pip install pyarrow`

Parquet files are read lazily, so host memory does not grow with the dataset: at start only their
footers (row counts per row group); a sample reads its row group's needed columns on demand, and
the last `window` row groups stay cached. So that each row group is read once per epoch, an epoch
shuffles the row groups, then the rows within each run of `window` consecutive groups (a folder
dataset alone is one block: a plain permutation). `loader` prepares samples (decode, crop, resize,
diptych, prompt) in DataLoader worker processes; each process reads only its own samples' groups.

A sample that cannot be read (missing file, corrupt image, bad line) is skipped and counted,
never fatal: `EditPairs.skipped` says how many and why.
"""

import bisect
import io
import json
import os
import random
from collections import Counter, OrderedDict
from pathlib import Path

import torch
from PIL import Image

from flux_minimal.errors import FluxMinimalError
from flux_minimal.icedit import IC_PROMPT, make_diptych
from flux_minimal.images import load_image, to_tensor

DROP_PROMPT_P = 0.1
WINDOW = 4  # row groups per shuffle window, and cached per process
# kind: (source image, target image, instruction) columns
COLUMNS = {"pair": ("source", "target", "instruction"), "magicbrush": ("source_img", "target_img", "instruction"),
           "omniedit": ("src_img", "edited_img", "edited_prompt_list")}


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


class JsonlRows:
    """The lines of a pairs.jsonl (small: paths and instructions), held in memory."""

    kind = "pair"

    def __init__(self, f: Path, skipped: Counter):
        self.base, self.rows = f.parent, []
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in COLUMNS["pair"])):
                skipped[f"{f.name}:{n}: not a {{source, target, instruction}} line"] += 1
                continue
            self.rows.append(rec)
        self.groups = [len(self.rows)]  # one block: any order is as cheap as another

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, k: int) -> dict:
        return self.rows[k]


class ParquetRows:
    """The rows of one parquet file, read on demand a row group at a time (only the needed columns);
    the last `cache` groups are kept. Safe across fork: each process opens the file itself."""

    def __init__(self, f: Path, cache: int = WINDOW):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise FluxMinimalError("reading parquet needs pyarrow: pip install pyarrow") from None
        self.path, self.base, self.cache_size = f, f.parent, cache
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise FluxMinimalError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
        cols = set(pf.schema_arrow.names)
        kind = next((k for k in ("magicbrush", "omniedit") if set(COLUMNS[k]) <= cols), None)
        if kind is None:
            raise FluxMinimalError(f"{f}: columns {sorted(cols)} are neither MagicBrush (source_img, target_img, "
                                   f"instruction) nor OmniEdit (src_img, edited_img, edited_prompt_list)")
        self.kind = kind
        self.groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        self.starts = [0]
        for n in self.groups:
            self.starts.append(self.starts[-1] + n)
        self._file, self._pid, self._cache = None, None, OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def row(self, k: int) -> dict:
        g = bisect.bisect_right(self.starts, k) - 1
        return self._group(g).slice(k - self.starts[g], 1).to_pylist()[0]  # Python copies of one row only

    def _group(self, g: int):
        if os.getpid() != self._pid:  # a forked worker: its own handle and cache
            import pyarrow.parquet as pq
            self._file, self._pid, self._cache = pq.ParquetFile(self.path), os.getpid(), OrderedDict()
        if g in self._cache:
            self._cache.move_to_end(g)
        else:
            try:
                rows = self._file.read_row_group(g, columns=list(COLUMNS[self.kind]))  # an Arrow table
            except Exception as e:  # a damaged group: its samples are skipped, not the run
                raise SkipSample(f"{self.path.name} row group {g}: {type(e).__name__}: {e}") from None
            self._cache[g] = rows
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._cache[g]


class EditPairs:
    """All pairs of one or more sources. `sample(g, seed)` gives the g-th training sample as (pair index,
    diptych [3, R, 2R] in [-1, 1], prompt); `diptych(i)` and `prompt(i, rng)` give its parts."""

    def __init__(self, paths: list["str | Path"], resolution: int = 512, drop_prompt_p: float = DROP_PROMPT_P,
                 window: int = WINDOW):
        self.resolution, self.drop_prompt_p, self.window = resolution, drop_prompt_p, window
        self.sources: list[JsonlRows | ParquetRows] = []
        self.skipped: Counter = Counter()
        for p in map(Path, paths):
            if p.is_dir() and (p / "pairs.jsonl").is_file():
                self.sources.append(JsonlRows(p / "pairs.jsonl", self.skipped))
            elif p.suffix == ".jsonl":
                self.sources.append(JsonlRows(p, self.skipped))
            elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
                self.sources += [ParquetRows(f, window) for f in ([p] if p.is_file() else sorted(p.glob("*.parquet")))]
            else:
                raise FluxMinimalError(f"{p}: not a dataset (expected a folder with pairs.jsonl, a .jsonl file, "
                                       f"or .parquet files)")
        self.starts = [0]
        for s in self.sources:
            self.starts.append(self.starts[-1] + len(s))
        if not len(self):
            raise FluxMinimalError(f"no training pairs found in {[str(p) for p in paths]}")
        self.blocks = self._blocks()

    def _blocks(self) -> list[range]:
        """Index ranges an epoch shuffles as units: the parquet row groups; the folder rows all in one
        block when there is no parquet, else cut to the parquet groups' mean size (so they mix)."""
        groups = [n for s in self.sources if isinstance(s, ParquetRows) for n in s.groups]
        if not groups:
            return [range(len(self))]
        size, blocks = max(1, round(sum(groups) / len(groups))), []
        for s, start in zip(self.sources, self.starts):
            cuts = s.groups if isinstance(s, ParquetRows) else [size] * (len(s) // size) + [len(s) % size]
            for n in filter(None, cuts):
                blocks.append(range(start, start + n))
                start += n
        return blocks

    def __len__(self) -> int:
        return self.starts[-1]

    def record(self, i: int) -> tuple[str, dict, Path]:
        """(kind, row, base folder) of pair i: kind is "pair", "magicbrush" or "omniedit"."""
        s = bisect.bisect_right(self.starts, i) - 1
        src = self.sources[s]
        return src.kind, src.row(i - self.starts[s]), src.base

    def instruction(self, i: int, rng: random.Random | None = None) -> str:
        kind, rec, _ = self.record(i)
        if kind == "omniedit":
            if not rec["edited_prompt_list"]:
                raise SkipSample("OmniEdit row without prompts")
            return (rng or random.Random(0)).choice(rec["edited_prompt_list"])
        return rec["instruction"]

    def prompt(self, i: int, rng: random.Random) -> str:
        """The training prompt of pair i: the in-context prompt, or "" with probability 0.1."""
        instruction = self.instruction(i, rng)
        drop = rng.random() < self.drop_prompt_p
        return "" if drop else IC_PROMPT.format(instruction=" ".join(instruction.split()))

    def diptych(self, i: int) -> torch.Tensor:
        """[source | target] of pair i, each resized to R x R: [3, R, 2R] in [-1, 1]."""
        kind, rec, base = self.record(i)
        keys = COLUMNS[kind]
        src, tgt = _image(rec[keys[0]], base), _image(rec[keys[1]], base)
        if kind == "magicbrush":  # ICEdit crops MagicBrush's noisy bottom 1/32
            src, tgt = (im.crop((0, 0, im.width, im.height - im.height // 32)) for im in (src, tgt))
        R = self.resolution
        src, tgt = (im.resize((R, R), Image.Resampling.BICUBIC) for im in (src, tgt))
        return to_tensor(make_diptych(src, tgt))[0]

    def load(self, g: int, seed: int, images: bool = True) -> tuple[int, torch.Tensor | None, str]:
        """The g-th sample of training (epochs of seeded, row-group-aware permutations) as (pair index,
        diptych or None if not asked for, prompt). Its randomness (prompt drop, OmniEdit prompt
        choice) comes from (seed, g): identical however the batch is split across processes or
        workers, and after a resume. Raises SkipSample if the pair cannot be read."""
        epoch, k = divmod(g, len(self))
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._order = epoch, epoch_order(self.blocks, epoch, seed, self.window)
        i = self._order[k]
        prompt = self.prompt(i, random.Random(f"{seed}:{g}"))
        return i, self.diptych(i) if images else None, prompt

    def sample(self, g: int, seed: int, images: bool = True) -> tuple[int, torch.Tensor | None, str] | None:
        """`load`, or None if the pair cannot be read (counted in `skipped`)."""
        try:
            return self.load(g, seed, images)
        except SkipSample as e:
            self.skipped[str(e)[:160]] += 1
            return None


def epoch_order(blocks: list[range], epoch: int, seed: int, window: int = WINDOW) -> list[int]:
    """The visiting order of epoch `epoch`, drawn from (seed, epoch): the blocks shuffled, then the
    rows within each run of `window` blocks. One block (a folder dataset): a plain permutation."""
    rng = random.Random(f"order:{seed}:{epoch}")
    blocks = list(blocks)
    rng.shuffle(blocks)
    order = []
    for w in range(0, len(blocks), window):
        rows = [i for b in blocks[w:w + window] for i in b]
        rng.shuffle(rows)
        order += rows
    return order


# ---- loading in worker processes ------------------------------------------------------------------

class _Samples(torch.utils.data.Dataset):
    """Sample number g -> (g, sample or None, why it was skipped or None), for DataLoader workers
    (their skip counts would be lost in the worker, so the reason travels back with the sample)."""

    def __init__(self, data: EditPairs, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return 2**62  # sample numbers run over epochs

    def __getitem__(self, g: int):
        try:
            return g, self.data.load(g, self.seed), None
        except SkipSample as e:
            return g, None, str(e)[:160]


def loader(data: EditPairs, seed: int, batches, workers: int = 0):
    """An iterator over `batches` (lists of sample numbers, in order) giving each batch's readable
    samples [(g, (pair, diptych, prompt))]; unreadable ones are counted in data.skipped. With
    workers > 0 they are prepared ahead in that many processes."""
    dl = torch.utils.data.DataLoader(_Samples(data, seed), batch_sampler=batches, num_workers=workers,
                                     collate_fn=list, prefetch_factor=2 if workers else None,
                                     persistent_workers=False)
    for batch in dl:
        for _, s, why in batch:
            if why is not None:
                data.skipped[why] += 1
        yield [(g, s) for g, s, _ in batch if s is not None]
