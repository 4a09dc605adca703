"""The record: one row per experiment with the protocol's 25 fields, a JSON per experiment,
and `result_table.csv` over all of them (../shared/design/protocol.md)."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pqk.errors import InputError
from pqk.naming import exp_id  # noqa: F401 (re-exported)
from pqk.io.files import atomic_write_text, ensure_writable_dir, write_json  # noqa: F401 (re-exported)


@dataclass
class Record:
    """Exactly the protocol's fields, in its order. None = not applicable (empty cell)."""

    exp_id: str
    combo: str
    rho: float | None = None
    T: float | None = None
    beta: float | None = None
    gamma: float | None = None
    bits_w: int | None = 32
    bits_a: int | None = 32
    keep_list: str = ""
    params_M: float | None = None
    flops_G: float | None = None
    size_MB: float | None = None
    vram_GB: float | None = None
    chamfer: float | None = None
    absrel: float | None = None
    rmse: float | None = None
    delta1: float | None = None
    t_pair_p50_ms: float | None = None
    t_pair_p95_ms: float | None = None
    t_scene_s: float | None = None
    pairs_per_sec: float | None = None
    gpu_hours: float | None = None
    notes: str = ""
    seed: int = 42
    datetime: str = ""

    def as_row(self) -> dict[str, Any]:
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}


RECORD_FIELDS = [f.name for f in fields(Record)]


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def nan_fields(record: Record) -> list[str]:
    """Fields holding NaN or infinity (a failed gate, not a crash)."""
    return [k for k, v in asdict(record).items() if isinstance(v, float) and not math.isfinite(v)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the table, so concurrent writers never lose a row."""
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_table(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file (not UTF-8): not a result_table.csv pqk wrote") from None
    except csv.Error as exc:
        raise InputError(f"{path} is not a readable CSV table ({exc})") from None


def upsert_row(path: Path, record: Record) -> Path:
    """Add the record to the CSV (replacing a row with the same exp_id), atomically:
    write-then-rename under a lock, so a crash never leaves half a table."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    with _locked(path):
        rows = [r for r in read_table(path) if r.get("exp_id") != record.exp_id]
        rows.append({k: str(v) for k, v in record.as_row().items()})
        buffer = io.StringIO()
        # Columns of the record's own type: the protocol's 25 for DUSt3R, a family's own otherwise.
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(record)], extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
    return path


def record_file_name(name: str) -> str:
    """The eval JSON of the record `name` (an exp_id): teacher_eval.json for the protocol's P0
    teacher, else <exp_id>_eval.json (one file per exp_id, which must be a safe file name)."""
    from pqk.io.files import safe_name

    safe_name(name, "exp_id")
    return "teacher_eval.json" if name == "P0_teacher_run1" else f"{name}_eval.json"


def write_record(folder: Path, payload: dict, record) -> tuple[Path, Path]:
    """A record's eval JSON and its result_table.csv row as one unit: the JSON is staged, the
    row upserted, then the JSON renamed into place, so a failure (a full disk) leaves neither
    a record without its row nor a temporary file."""
    from pqk.errors import WriteError
    from pqk.io.files import inside, json_text, stage_text, write_failure

    folder = Path(folder)
    ensure_writable_dir(folder)
    json_path = inside(folder, record_file_name(record.exp_id))
    tmp = stage_text(json_path, json_text(payload))
    try:
        csv_path = upsert_row(folder / "result_table.csv", record)
        tmp.replace(json_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, WriteError):  # the table's own write failed: its message names it
            raise
        raise write_failure(json_path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return json_path, csv_path
