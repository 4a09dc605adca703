"""Point clouds as binary little-endian PLY files (readable by trimesh, MeshLab, CloudCompare)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from pqk.errors import InputError

_XYZ = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
_RGB = [("red", "u1"), ("green", "u1"), ("blue", "u1")]
_PLY_TYPES = {"float": "<f4", "uchar": "u1"}


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or not np.issubdtype(points.dtype, np.number):
        raise InputError(f"points must be a numeric (N, 3) array (got shape {points.shape}, dtype {points.dtype})")
    if not np.all(np.isfinite(points)):
        raise InputError("points contain NaN or infinite values; mask them out before writing the PLY")
    return points.astype("<f4")


def _colors_to_uint8(colors: np.ndarray, n: int) -> np.ndarray:
    colors = np.asarray(colors)
    if colors.shape != (n, 3):
        raise InputError(f"colors must have shape ({n}, 3) to match the points (got {colors.shape})")
    if colors.dtype == np.uint8:
        return colors
    if np.issubdtype(colors.dtype, np.floating):
        # Floats are taken as [0, 1]; clip so slight overshoot does not wrap around.
        return np.round(np.clip(np.nan_to_num(colors), 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(colors.dtype, np.integer) and (colors.size == 0 or (colors.min() >= 0 and colors.max() <= 255)):
        return colors.astype(np.uint8)
    raise InputError(f"colors must be floats in [0, 1] or integers in 0..255 (got dtype {colors.dtype})")


def _header(n: int, with_colors: bool) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    lines += ["property float x", "property float y", "property float z"]
    if with_colors:
        lines += ["property uchar red", "property uchar green", "property uchar blue"]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def _vertex_records(points: np.ndarray, colors: np.ndarray | None) -> np.ndarray:
    dtype = np.dtype(_XYZ + (_RGB if colors is not None else []))
    records = np.empty(len(points), dtype=dtype)
    for axis, name in enumerate("xyz"):
        records[name] = points[:, axis]
    if colors is not None:
        for channel, name in enumerate(("red", "green", "blue")):
            records[name] = colors[:, channel]
    return records


def _write_atomically(path: Path, payload: list[bytes]) -> None:
    """Write to a sibling temp file, then rename, so readers never see half a file."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {str(folder)!r}")
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 lets the umask decide permissions, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in payload:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write ``points`` (N, 3) and optional ``colors`` (N, 3) as a binary PLY.

    Colours may be floats in [0, 1] (clipped, rounded to 0..255) or uint8.
    The file is replaced atomically.
    """
    xyz = _check_points(points)
    rgb = None if colors is None else _colors_to_uint8(colors, len(xyz))
    records = _vertex_records(xyz, rgb)
    _write_atomically(Path(path), [_header(len(xyz), rgb is not None), records.tobytes()])


def _read_header(handle) -> tuple[int, list[tuple[str, str]]]:
    """(vertex count, [(property name, numpy dtype)]) for files written by ``write_ply``."""
    if handle.readline().strip() != b"ply":
        raise InputError("not a PLY file (missing 'ply' magic)")
    count, props = None, []
    for raw in iter(handle.readline, b""):
        words = raw.decode("ascii", errors="replace").split()
        if not words:
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and words[1] != "binary_little_endian":
            raise InputError(f"unsupported PLY format {words[1]!r}; only binary_little_endian is read")
        if words[:2] == ["element", "vertex"]:
            count = int(words[2])
        elif words[0] == "element":
            raise InputError(f"unsupported PLY element {words[1]!r}; only point clouds are read")
        elif words[0] == "property":
            if words[1] not in _PLY_TYPES:
                raise InputError(f"unsupported PLY property type {words[1]!r}")
            props.append((words[2], _PLY_TYPES[words[1]]))
    else:
        raise InputError("truncated PLY header (no end_header)")
    if count is None:
        raise InputError("PLY file has no vertex element")
    return count, props


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY written by ``write_ply``: (points float32 (N,3), colors uint8 (N,3) or None)."""
    with open(path, "rb") as handle:
        count, props = _read_header(handle)
        dtype = np.dtype(props)
        data = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)
    if len(data) != count:
        raise InputError(f"truncated PLY file {str(path)!r}: expected {count} vertices, found {len(data)}")
    points = np.stack([data[name] for name in "xyz"], axis=1).astype(np.float32)
    names = set(dtype.names or ())
    if not {"red", "green", "blue"} <= names:
        return points, None
    colors = np.stack([data[name] for name in ("red", "green", "blue")], axis=1).astype(np.uint8)
    return points, colors


def read_ply_points(path: str | os.PathLike) -> np.ndarray:
    """Points (N, 3) float32 of a PLY written by ``write_ply``."""
    return read_ply(path)[0]
