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
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not a text file (not UTF-8); give the YAML file" + (f" ({hint})" if hint else "")) from None
    except yaml.YAMLError as exc:
        raise invalid(f"{what} {path} is not valid YAML ({str(exc).strip().splitlines()[0]})") from None


def reject_unknown_keys(what: str, data: Any, known: set[str]) -> None:
    """One-line ConfigError naming every unknown key of a config mapping and the accepted ones."""
    from pqk.errors import ConfigError

    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")


def read_config_mapping(path: Path, what: str, known: set[str]) -> dict:
    """A method's config file as a dict (empty file: {}), refused in one line when it is not a
    mapping or names a key outside `known`."""
    from pqk.errors import ConfigError

    data = read_yaml(Path(path), what, invalid=ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of settings; got {type(data).__name__}")
    reject_unknown_keys(f"{what} {path}", data, known)
    return dict(data)


def dataclass_from_mapping(cls, data, what: str):
    """`cls(**data)` for a config dataclass, with one-line errors for a non-mapping and for
    unknown keys (naming the accepted ones); the dataclass validates values itself."""
    from dataclasses import fields

    from pqk.errors import ConfigError

    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
    return cls(**data)
