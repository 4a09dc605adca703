"""The data types every scene source produces: a `View` (image plus exact ground truth)
and a `Scene` (named views of one static scene), in the conventions of `pqk.data.scenes`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pqk.data.scene_geometry import points_in_camera


@dataclass
class View:
    """One rendered (or loaded) image with its ground truth."""

    img: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, camera-frame z, 0 where invalid
    intrinsics: np.ndarray  # (3, 3) float32
    cam2world: np.ndarray  # (4, 4) float32
    valid: np.ndarray  # (H, W) bool
    pts3d: np.ndarray  # (H, W, 3) float32, world frame, 0 where invalid


@dataclass
class Scene:
    """A named set of views of one static scene (``seed`` is -1 when not generated)."""

    name: str
    seed: int
    views: list[View] = field(default_factory=list)

    def pair_gt(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pts_i, valid_i, pts_j, valid_j): both views' points in camera i's frame.

        This is what DUSt3R predicts for the pair (i, j): ``pts3d`` of view 1
        and ``pts3d_in_other_view`` of view 2. Invalid pixels are 0.
        """
        view_i, view_j = self.views[i], self.views[j]
        pts_i = points_in_camera(view_i.pts3d, view_i.cam2world)
        pts_j = points_in_camera(view_j.pts3d, view_i.cam2world)
        pts_i = np.where(view_i.valid[..., None], pts_i, 0).astype(np.float32)
        pts_j = np.where(view_j.valid[..., None], pts_j, 0).astype(np.float32)
        return pts_i, view_i.valid.copy(), pts_j, view_j.valid.copy()
