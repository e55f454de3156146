"""Checkpoint loading: safetensors read from a memory map, strictly checked, onto meta-built models.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{key: {"dtype", "shape", "data_offsets": [begin, end]}}` and the raw tensor bytes. We parse the
header ourselves (so a truncated or foreign file gets a precise message) and view each tensor
straight out of a private (copy-on-write) memory map with `torch.frombuffer`: nothing is read
until it is used, a tensor kept in the file's dtype on the CPU costs no copy at all, and a
conversion or a move to the GPU reads one tensor at a time. Nothing is ever unpickled.

Models are built on the meta device and receive their tensors with `load_state_dict(assign=True)`,
so host memory peaks near the model plus its largest tensor, never twice the model.

Key remapping (a diffusers folder onto our BFL-named model) is a declarative table of rules
`(our key, source key(s), combine)`, with `{i}` a block index and `{w}` weight|bias; see
`flux_keys.FLUX_FROM_DIFFUSERS` and `vae.VAE_FROM_DIFFUSERS`.
"""

import json
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import WeightsError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHTS_HELP = "See weights.md for where to get the files and the layouts this project reads."


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked, tensors viewed from a private mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix in PICKLE_SUFFIXES:
            raise WeightsError(f"{self.path} is a pickle checkpoint; this project loads only .safetensors "
                               f"(pickle can run arbitrary code). {WEIGHTS_HELP}")
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such file. {WEIGHTS_HELP}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or 8 + n > size or n > 100_000_000:
                raise WeightsError(f"{self.path} is not a safetensors file (or is cut off in its header): "
                                   f"{size} bytes, header length field {n}. {WEIGHTS_HELP}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{self.path} is not a safetensors file: its header is not JSON ({e}). "
                                   f"{WEIGHTS_HELP}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.header: dict[str, dict] = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise WeightsError(f"{self.path} is truncated: the header promises {self.data_start + end} bytes, "
                               f"the file has {size}. Download it again (compare its size and sha256 with "
                               f"weights.md).")
        for key, v in header.items():
            if v["dtype"] not in SAFETENSORS_DTYPES:
                raise WeightsError(f"{self.path}: tensor {key!r} has unsupported dtype {v['dtype']}")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.header[key]["dtype"]]

    def tensor(self, key: str) -> Tensor:
        """A CPU tensor viewing the file's bytes (copy-on-write: writing to it never touches the file)."""
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        info = self.header[key]
        begin, end = info["data_offsets"]
        dtype, shape = self.dtype(key), self.shape(key)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.data_start + begin)
        return flat.view(shape)

    def release(self, key: str) -> None:
        """Drop the pages of `key` from this process's memory once a copy of it was made (a dtype
        conversion, a move to the GPU): they are re-read from the file if ever touched again."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.header[key]["data_offsets"]
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if self.data_start + end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, self.data_start + end - start)


class Checkpoint:
    """The tensors of one checkpoint: a single file, or the shards named by an index json.
    `prefix` is stripped from keys that carry it (e.g. ComfyUI's `model.diffusion_model.`)."""

    def __init__(self, files: Iterable[str | Path], prefix: str = ""):
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self.files:
            for k in f.keys():
                name = k[len(prefix):] if prefix and k.startswith(prefix) else k
                self._where[name] = (f, k)

    @classmethod
    def from_index(cls, index_path: str | Path) -> "Checkpoint":
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise WeightsError(f"{index_path}: not a readable shard index ({e!r}). {WEIGHTS_HELP}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (index_path.parent / s).is_file()]
        if missing:
            raise WeightsError(f"{index_path} names shards that are not in {index_path.parent}: {missing}. "
                               f"The download is incomplete. {WEIGHTS_HELP}")
        ckpt = cls([index_path.parent / s for s in shards])
        absent = [k for k, s in weight_map.items() if k not in ckpt._where]
        if absent:
            raise WeightsError(f"{index_path}: keys listed in the index are missing from their shards, "
                               f"e.g. {absent[:3]}. Download the shards again.")
        return ckpt

    @property
    def name(self) -> str:
        return str(self.files[0].path) if len(self.files) == 1 else f"{self.files[0].path.parent} (sharded)"

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._where[key]
        return f.shape(k)

    def dtype(self, key: str) -> torch.dtype:
        f, k = self._where[key]
        return f.dtype(k)

    def file_of(self, key: str) -> Path:
        return self._where[key][0].path

    def tensor(self, key: str) -> Tensor:
        f, k = self._where[key]
        return f.tensor(k)

    def release(self, key: str) -> None:
        f, k = self._where[key]
        f.release(k)


def open_checkpoint(path: str | Path, single_names: tuple[str, ...], index_name: str) -> Checkpoint:
    """A file, or a folder holding `index_name` or one of `single_names`."""
    path = Path(path)
    if path.is_file():
        return Checkpoint([path])
    if (path / index_name).is_file():
        return Checkpoint.from_index(path / index_name)
    for name in single_names:
        if (path / name).is_file():
            return Checkpoint([path / name])
    raise WeightsError(f"{path}: found neither {index_name} nor any of {list(single_names)}. {WEIGHTS_HELP}")


def open_component(path: str | Path, subfolder: str, what: str, single_names: tuple[str, ...], index_name: str
                   ) -> tuple[Path, Checkpoint, Path | None]:
    """A text encoder's weights: `path` is its folder, a snapshot root holding `subfolder`/, or one
    .safetensors file. Returns (the resolved path, its checkpoint, the folder to read config.json from
    or None for a bare file)."""
    path = Path(path)
    if path.is_dir() and (path / subfolder).is_dir():
        path = path / subfolder
    if not path.exists():
        raise WeightsError(f"{path}: no such {what} file or folder. {WEIGHTS_HELP}")
    return path, open_checkpoint(path, single_names, index_name), path if path.is_dir() else None


def read_config(folder: Path) -> dict | None:
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{f} is not valid JSON ({e}).") from None


# ---- declarative key remapping -------------------------------------------------------------------

def cat_rows(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, dim=0)


def swap_halves(ts: list[Tensor]) -> Tensor:
    """[a; b] -> [b; a] along dim 0 (diffusers' final norm is (scale, shift), BFL's (shift, scale))."""
    a, b = ts[0].chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


@dataclass
class Rule:
    target: str  # our key, with {i} (an index) and {w} (weight|bias) placeholders
    sources: tuple[str, ...]  # the checkpoint's key(s), same placeholders
    combine: Callable[[list[Tensor]], Tensor] | None = None  # None: exactly one source, as is

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        pattern = re.escape(self.target).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>weight|bias)")
        self._regex = re.compile(pattern + "$")

    def match(self, key: str) -> list[str] | None:
        m = self._regex.match(key)
        return None if m is None else [s.format(**m.groupdict()) for s in self.sources]


def sources_of(key: str, rules: list[Rule]) -> tuple[list[str], Callable | None]:
    for rule in rules:
        found = rule.match(key)
        if found is not None:
            return found, rule.combine
    return [key], None  # no rule: the checkpoint uses our name


def split_by_rules(state: dict[str, Tensor], rules: list[Rule], their_shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, Tensor]:
    """The inverse of loading through `rules`: our tensors under the checkpoint's keys, fused rows
    split back by the checkpoint's shapes (`their_shapes`), swapped halves swapped back. (Exports
    our models to the diffusers layout, e.g. for the side-by-side benchmark.)"""
    out = {}
    for key, t in state.items():
        sources, combine = sources_of(key, rules)
        if combine is None:
            out[sources[0]] = t
        elif combine is swap_halves:
            out[sources[0]] = swap_halves([t])
        elif combine is cat_rows:
            out.update(zip(sources, t.split([their_shapes[s][0] for s in sources], dim=0)))
        else:
            raise ValueError(f"{key}: its rule combines with {combine.__name__}, which has no inverse here")
    return out


def _combined_shape(shapes: list[tuple[int, ...]], combine) -> tuple[int, ...]:
    if combine is None:
        return shapes[0]
    # Run the combine on meta tensors: any concatenation or reshape reports its true shape, no data read.
    try:
        return tuple(combine([torch.empty(s, device="meta") for s in shapes]).shape)
    except RuntimeError:  # the sources do not even fit together: report all their shapes
        return tuple(shapes)


def _listing(keys: list[str], n: int = 5) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state(model: nn.Module, ckpt: Checkpoint, rules: list[Rule] = (), *, device="cpu",
               dtype: torch.dtype | None = None, ignore: tuple[str, ...] = (), what: str = "model",
               convert: Callable[[str, Tensor], Tensor] | None = None) -> nn.Module:
    """Fill a meta-device `model` from `ckpt`, strictly: every key of the model must come from the
    checkpoint with the right shape, and every checkpoint key must be used (except those matching
    the `ignore` regexes). dtype=None keeps each tensor's file dtype; floating tensors only are cast.
    `convert(key, tensor)`, when given, makes the model's tensor from the file's instead (one at a
    time: e.g. FP8 quantization while loading, flux_minimal/fp8.py); it returns it on `device`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    plan, missing, wrong, used = {}, [], [], set()
    for key, shape in expected.items():
        srcs, combine = sources_of(key, rules)
        used.update(srcs)
        absent = [s for s in srcs if s not in ckpt]
        if absent:
            missing.append(absent[0] if len(srcs) == 1 else f"{absent[0]} (for {key})")
            continue
        found = _combined_shape([ckpt.shape(s) for s in srcs], combine)
        if found != shape:
            wrong.append(f"{srcs[0]} in {ckpt.file_of(srcs[0]).name}: expected {list(shape)}, found {list(found)}")
        plan[key] = (srcs, combine)
    unexpected = [k for k in ckpt.keys() if k not in used and not any(re.search(p, k) for p in ignore)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {_listing(wrong, 3)}")
    if problems:
        raise WeightsError(f"{ckpt.name} does not fit the {what}: " + "; ".join(problems) +
                           f". Is this the right file for the {what}? {WEIGHTS_HELP}")

    state = {}
    for key, (srcs, combine) in plan.items():
        ts = [ckpt.tensor(s) for s in srcs]
        t = ts[0] if combine is None else combine(ts)
        target_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        state[key] = convert(key, t) if convert else t.to(device=device, dtype=target_dtype)  # no copy when already there
        if state[key].data_ptr() != ts[0].data_ptr():  # a copy was made: the mapped pages can go
            for s in srcs:
                ckpt.release(s)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """How many `prefix.N.` blocks the keys hold (N = 0..count-1)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0
