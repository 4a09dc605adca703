"""The calibration set: the generated-scene pairs every quantization experiment calibrates
on (seeds far from evaluation and training), and the reader that feeds them to ONNX
Runtime's calibrators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from pqk.backends.onnx_export import INPUT_NAMES
from pqk.data.images import normalize_array
from pqk.data.scenes import generate_scene
from pqk.errors import InputError
from pqk.methods.quantize.spec import QuantSpec, _is_int


def _check_n_views(n_views: Any) -> int:
    if not _is_int(n_views) or n_views < 2:
        raise InputError(f"n_views must be an integer >= 2 (pairs need two views); got {n_views!r}")
    return int(n_views)


def calibration_seeds(spec: QuantSpec, n_views: int = 8) -> list[int]:
    """The generated-scene seeds `calibration_pairs` draws from, in order."""
    per_scene = _check_n_views(n_views) - 1
    n_scenes = math.ceil(spec.calibration.size / per_scene)
    return [spec.calibration_seed_base + k for k in range(n_scenes)]


def _neighbour_pairs(n_views: int) -> list[tuple[int, int]]:
    # Both orientations, alternating: evaluation pairs are symmetrised, so the network sees
    # each view as view 1 and as view 2.
    return [(i, i + 1) if i % 2 == 0 else (i + 1, i) for i in range(n_views - 1)]


def _network_input(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(normalize_array(img).unsqueeze(0).numpy(), dtype=np.float32)


def calibration_pairs(
    spec: QuantSpec, width: int, height: int, n_views: int = 8
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`spec.calibration.size` image pairs for `img1`, `img2` (float32 (1, 3, H, W) in [-1, 1]).

    Neighbouring views of generated scenes whose seeds start at `spec.calibration_seed_base`,
    far from every evaluation and training seed; the same arguments give the same arrays.
    Scenes are rendered one at a time and a view shared by two pairs is one array.
    """
    n_views = _check_n_views(n_views)
    size = spec.calibration.size
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for seed in calibration_seeds(spec, n_views):
        scene = generate_scene(seed, n_views=n_views, width=width, height=height)
        imgs = [_network_input(view.img) for view in scene.views]
        for i, j in _neighbour_pairs(n_views):
            pairs.append((imgs[i], imgs[j]))
            if len(pairs) == size:
                return pairs
    return pairs


class PairCalibrationReader(CalibrationDataReader):
    """Feeds calibration pairs to ONNX Runtime's calibrators as {img1, img2}.

    Supports `set_range` so calibration can run in chunks (histogram calibrators keep every
    activation of a chunk in memory).
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.pairs = list(pairs)
        self._stop = len(self.pairs)
        self._next = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._stop = int(start_index), min(int(end_index), len(self.pairs))

    def rewind(self) -> None:
        self.set_range(0, len(self.pairs))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._stop:
            return None
        pair = self.pairs[self._next]
        self._next += 1
        return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(INPUT_NAMES, pair)}
