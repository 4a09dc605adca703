"""Procedural multi-view scenes with exact ground truth, rendered by ray casting.

Training a small teacher and evaluating DUSt3R both need image sets whose depth
and camera poses are known exactly, offline. A closed room with boxes and
spheres, ray cast in numpy, gives pixel-exact geometry in a fraction of a
second; its surfaces carry crops of the real photographs bundled with
scikit-image, so stereo matching sees realistic texture that stays glued to the
surface from view to view.

Conventions, shared by the whole package:

- Cameras are OpenCV-style (x right, y down, z forward); ``cam2world`` (4x4)
  maps camera coordinates to world coordinates.
- Pixel centres sit at integer coordinates: pixel (u, v) is the ray through
  (u, v). Generated cameras put the principal point at the exact image centre
  ``((W - 1) / 2, (H - 1) / 2)``.
- Depth is the camera-frame z of the surface point, in metres; 0 where invalid.
- World: the floor is the plane y = 0 and "up" is -y, so a level camera's y
  axis points along the world's y.

Everything random comes from ``np.random.default_rng(seed)``, drawn before and
independently of the image size, so a seed names one scene at every
resolution and the arrays are bit-identical from run to run.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

# The pieces live in their own modules; the names stay importable from here.
from pqk.data.ray_casting import (  # noqa: F401 (re-exported)
    _HITTERS,
    _camera_rays,
    _hit_box,
    _hit_room,
    _hit_sphere,
    _screen_rect,
    _to_local,
    _to_world,
    _trace,
)
from pqk.data.scene_geometry import (  # noqa: F401 (re-exported)
    _EPS,
    _float_type,
    depth_to_points,
    points_in_camera,
    project_points,
)
from pqk.data.scene_layout import (  # noqa: F401 (re-exported)
    _CAM_CLEARANCE,
    _FACES,
    _MAX_CAM_HEIGHT,
    _MIN_CAM_RADIUS,
    RIGS,
    _Camera,
    _draw_layout,
    _draw_objects,
    _draw_poses,
    _draw_room,
    _draw_surfaces,
    _draw_trajectory,
    _intrinsics,
    _Layout,
    _look_at,
    _Primitive,
    _stereo_rig,
    _Surfaces,
    _Trajectory,
)
from pqk.data.scene_types import Scene, View  # noqa: F401 (re-exported)
from pqk.data.shading import (  # noqa: F401 (re-exported)
    MAX_DISTANCE,
    _box_surface,
    _colours,
    _describe,
    _Hits,
    _render,
    _sample_texture,
    _sphere_surface,
    _SurfaceFn,
)
from pqk.data.textures import TEXTURE_NAMES, _Atlas, _atlas, _load_texture, _mirror  # noqa: F401 (re-exported)
from pqk.errors import InputError


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #
def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer (got {value!r})")
    return int(value)


def generate_scene(
    seed: int, n_views: int = 8, width: int = 512, height: int = 384, rig: str = "orbit"
) -> Scene:
    """Render ``n_views`` views of the procedural scene named by ``seed``.

    rig="orbit": cameras move along an arc around the scene centre (6-12
    degrees apart, sometimes dollying in), all looking at a jittered centre,
    with one horizontal field of view of 50-70 degrees. rig="stereo": the same
    room and objects seen by a rectified slider rig (pure sideways
    translation, see ``_stereo_rig``). Same seed and rig, same arrays.
    """
    if rig not in RIGS:
        raise InputError(f"unknown camera rig {rig!r}; expected one of {', '.join(RIGS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer (got {seed!r})")
    seed = int(seed)
    n_views = _check_positive_int("n_views", n_views)
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    layout = _draw_layout(seed, n_views)
    if rig == "stereo":
        layout = _stereo_rig(seed, layout)
    K = _intrinsics(layout.hfov, width, height)
    views = [_render(layout, _Camera(K, pose), width, height) for pose in layout.poses]
    name = f"gen-{seed:05d}" if rig == "orbit" else f"gen-{rig}-{seed:05d}"
    return Scene(name=name, seed=seed, views=views)


def generate_scenes(seeds: Iterable[int], **kw: int) -> list[Scene]:
    """``generate_scene`` for each seed (keyword arguments are passed through)."""
    return [generate_scene(seed, **kw) for seed in seeds]
