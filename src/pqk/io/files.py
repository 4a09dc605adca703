"""Files written so that a crash never leaves half of one: write to a temporary sibling,
fsync, rename. Every JSON, CSV and YAML pqk writes goes through here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pqk.errors import InputError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent)
    atomic_write_text(path, json.dumps(payload, indent=1, default=_json_default) + "\n")
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
