"""Reading the YAML files users write (workloads, method specs) with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pqk.errors import InputError, PqkError


def read_yaml(path: Path, what: str, hint: str = "", invalid: type[PqkError] = InputError) -> Any:
    """Parsed YAML of `path`; a missing file is an InputError, bad YAML an `invalid` error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise invalid(f"{what} {path} is not valid YAML ({str(exc).strip().splitlines()[0]})") from None
