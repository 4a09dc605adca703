"""Files written so that a crash never leaves half of one: write to a temporary sibling,
fsync, rename. Every JSON, CSV and YAML pqk writes goes through here. A write that fails (a
full disk, a read-only folder) removes its temporary file and is one line naming the path;
names that become paths are checked to stay inside their folder; a run folder is locked while
a run writes it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pqk.errors import InputError, WriteError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def write_failure(path: Path, exc: OSError) -> WriteError:
    """A failed write as one line: the path, why, and on a full disk how much space is left."""
    why = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(Path(path).parent).free
            why += f"; {free / 1e6:.1f} MB free on that disk: free some space and run again"
        except OSError:
            pass
    return WriteError(f"cannot write {path} ({why})")


def stage_text(path: Path, text: str) -> Path:
    """`text` in a temporary sibling of `path`, synced to disk; the caller renames it into place
    (or unlinks it). Nothing is left behind when the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc) from None
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    tmp = stage_text(path, text)
    try:
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc) from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary sibling and a rename (a checkpoint is whole or absent). A
    failed write (torch reports a full disk as a RuntimeError) is one line naming the path."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc) from None
    except RuntimeError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, OSError(errno.ENOSPC, str(exc).splitlines()[0])) from None


def remove_leftovers(folder: Path) -> list[str]:
    """Remove what a killed writer left in `folder`: hidden temporary files (`.<name>.tmp`,
    `.<name>.<pid>.tmp`) and hidden staging folders (`.<name>.<random>`). pqk's own hidden
    markers (`.pqk-*`, locks) stay. Returns the names removed."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        name = entry.name
        if not name.startswith(".") or name.startswith(".pqk-") or name.endswith(".lock"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(name)
    return removed


def safe_name(name: str, what: str = "name") -> str:
    """`name` when it can be a file name (letters, digits, '.', '-', '_', not starting with
    '.'), else a one-line error: names from a command line or a config never leave their folder."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise InputError(f"{what} {name!r} is not accepted: use letters, digits, '.', '-' and '_' (not starting with '.')")
    return name


def inside(folder: Path, name: str) -> Path:
    """folder/name, refused when it would lie outside `folder`."""
    path = (Path(folder) / name).resolve()
    if Path(folder).resolve() not in (path, *path.parents):
        raise InputError(f"{name!r} would be written outside {folder}")
    return Path(folder) / name


@contextlib.contextmanager
def run_lock(folder: Path, wait: bool = False) -> Iterator[None]:
    """Hold `folder/.pqk-run.lock` while a run writes the folder: a second run on it is one line
    naming the process that holds it (or, with `wait`, waits for it). The operating system
    drops the lock when its process dies, so a killed run never leaves the folder locked."""
    import fcntl

    lock = Path(folder) / ".pqk-run.lock"
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(f"run folder {folder} is in use by {holder}; wait for it to finish "
                             "(or pass --wait), or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def json_text(payload: dict) -> str:
    return json.dumps(payload, indent=1, default=_json_default) + "\n"


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent)
    atomic_write_text(path, json_text(payload))
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output folder {folder} cannot be created ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable")


def json_safe(value: Any) -> Any:
    """`value` with every dict key a string and every leaf JSON can hold (others as repr)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def resolve_path(path_like: str | Path, base: Path) -> Path | None:
    """A path as written in a plan: absolute, relative to the working folder (the README's
    examples run from the repository root), or relative to the plan's folder or any folder
    above it (a plan copied into runs/<plan>/ still finds configs/). None when not found."""
    path = Path(path_like)
    if path.is_absolute():
        return path if path.exists() else None
    for root in (Path.cwd(), base, *base.parents):
        if (root / path).exists():
            return root / path
    return None


def read_safetensors(path: Path):
    """(tensors, metadata) of a safetensors file; an unreadable one is one CheckpointError line."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from pqk.errors import CheckpointError

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
