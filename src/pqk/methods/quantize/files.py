"""ONNX files on disk: saving a graph (weights in `<name>.data` past 2 GiB), telling whether
a file has such a side file, its size with it, and moving a staged file into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from pqk.backends.onnx_export import EXTERNAL_DATA_THRESHOLD


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def _save(proto: onnx.ModelProto, path: Path) -> None:
    # Protobuf cannot serialize past 2 GiB: large graphs keep weights in `<name>.data`.
    external = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=path.name + ".data"
    )


def _has_side_file(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


def onnx_file_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of an ONNX file with its `<name>.data` weights file, if any."""
    path = Path(path)
    side = path.parent / (path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def _replace(staged: Path, out_path: Path) -> None:
    # Weights first so the graph never points at missing or stale data (as export_onnx).
    side, stale = staged.parent / (staged.name + ".data"), out_path.parent / (out_path.name + ".data")
    external = side.exists()
    if external:
        os.replace(side, stale)
    os.replace(staged, out_path)
    if not external and stale.exists():
        stale.unlink()  # left by an earlier large model written to the same name
