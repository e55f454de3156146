"""Writing outputs safely: one helper for every file the project writes.

    check_output(path)                 before any work: will writing `path` really succeed?
    check_folder(folder)               the same for a folder that files will go into
    atomic_write(path, write)          write(f) into a temporary file beside `path`, then rename it
                                       into place: a reader never sees half a file
    save_or_fallback(path, write)      the same, after minutes of work: if the final write fails, the
                                       result goes to the system temp folder and the error says where
    save_safetensors(tensors, path)    a safetensors file, atomically

Never replaced: an existing folder, or anything that is not a regular file (a device such as
/dev/full, a FIFO, a socket). A rename over those would swap a device node for a regular file.
"""

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import FluxMinimalError

Writer = Callable[[BinaryIO], None]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_existing(path: Path, what: str) -> None:
    """An existing folder or special file at `path` is never written over."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise FluxMinimalError(f"cannot write the {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FluxMinimalError(f"the {what} {path} is a folder: pass a file path inside it, e.g. "
                               f"{path / 'edited.png'}")
    if not stat.S_ISREG(st.st_mode):
        raise FluxMinimalError(f"the {what} {path} is {_kind(st.st_mode)}, not a regular file: it is not replaced; "
                               f"pass the path of a new or existing regular file")


def _temp_beside(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # Path("x").parent is "."


def check_output(path: "str | Path", what: str = "output") -> None:
    """Raise FluxMinimalError unless a file can really be written at `path`: its folder exists, it is not
    a folder or a special file, and a temporary file can be created beside it (then removed)."""
    path = Path(path)
    _refuse_existing(path, what)
    folder = path.parent
    if not folder.is_dir():
        raise FluxMinimalError(f"cannot write the {what} {path}: the folder {folder} does not exist")
    try:
        fd, tmp = _temp_beside(path)
    except OSError as e:
        raise FluxMinimalError(f"cannot write the {what} {path}: creating a file in {folder} fails "
                               f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_folder(folder: "str | Path", what: str = "output folder") -> None:
    """A folder that files will be written into: it exists (or can be made) and takes a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FluxMinimalError(f"the {what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FluxMinimalError(f"cannot make the {what} {folder}: {e.strerror or e}") from None
    check_output(folder / "probe.png", what)


def atomic_write(path: "str | Path", write: Writer, what: str = "output") -> Path:
    """write(f) into a temporary file in `path`'s folder, then rename it to `path` (atomic on POSIX).
    On any failure the temporary file is removed and the exception propagates."""
    path = Path(path)
    _refuse_existing(path, what)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        _refuse_existing(path, what)  # again: it may have appeared while we wrote
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_or_fallback(path: "str | Path", write: Writer, what: str = "output") -> Path:
    """`atomic_write`, for results that took work to make: if writing `path` fails, the result is
    written to the system temp folder instead and a FluxMinimalError says where, so it is never lost."""
    path = Path(path)
    try:
        return atomic_write(path, write, what)
    except (OSError, FluxMinimalError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        fd, rescue = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=path.suffix or ".out")
        with os.fdopen(fd, "wb") as f:
            write(f)
        raise FluxMinimalError(f"could not write the {what} {path} ({reason}); the result is saved in {rescue}") from None


def save_safetensors(tensors: dict, path: "str | Path", metadata: dict | None = None) -> Path:
    """A safetensors file (contiguous CPU copies of `tensors`), written atomically."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data), "safetensors file")


def write_text(path: "str | Path", text: str) -> Path:
    """A small text file (JSON, a checkpoint pointer), written atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()), "file")
