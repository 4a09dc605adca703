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

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np

from pqk.errors import InputError

# Bundled (never downloaded) scikit-image photographs with enough structure to
# match on; mostly-black or binary ones (hubble, horse, retina) are left out.
TEXTURE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "camera",
    "coins", "moon", "text", "page", "immunohistochemistry", "cell", "clock",
)
MAX_DISTANCE = 100.0  # metres; farther hits count as invalid
_EPS = 1e-4  # minimum ray parameter, keeps hits strictly in front of the camera
_FACES = 6  # surface slots per primitive (box faces; spheres use slot 0)

# Placement bounds (metres). Cameras never come closer to the centre than
# _MIN_CAM_RADIUS and objects stay _CAM_CLEARANCE inside it, so no camera is
# ever inside an object.
_MIN_CAM_RADIUS = 1.9
_CAM_CLEARANCE = 0.45
_MAX_CAM_HEIGHT = 2.2


# --------------------------------------------------------------------------- #
# Public data types
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Geometry helpers (used by the loaders and by evaluation too)
# --------------------------------------------------------------------------- #
def _float_type(array: np.ndarray) -> np.dtype:
    """float32 stays float32, everything else computes and returns float64."""
    return np.result_type(array.dtype, np.float32)


def points_in_camera(pts_world: np.ndarray, cam2world: np.ndarray) -> np.ndarray:
    """World points (..., 3) -> coordinates in the camera whose pose is ``cam2world``."""
    pose = np.asarray(cam2world, dtype=np.float64)
    pts = np.asarray(pts_world)
    # Row vectors: R^T (p - t) is (p - t) @ R.
    cam = (pts.astype(np.float64) - pose[:3, 3]) @ pose[:3, :3]
    return cam.astype(_float_type(pts))


def depth_to_points(
    depth: np.ndarray, intrinsics: np.ndarray, cam2world: np.ndarray | None = None
) -> np.ndarray:
    """Back-project a depth map (H, W) to points (H, W, 3).

    Pixel (u, v) is the ray through K^-1 (u, v, 1) (integer pixel centres).
    Points are in the camera frame, or in the world frame when ``cam2world`` is
    given. Pixels whose depth is not finite and positive give 0.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise InputError(f"depth must be an (H, W) array (got shape {depth.shape})")
    K = np.asarray(intrinsics, dtype=np.float64)
    height, width = depth.shape
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)
    # General K (including skew): solve the upper-triangular system per axis.
    y = (v - K[1, 2]) / K[1, 1]
    x = (u[None, :] - K[0, 2] - K[0, 1] * y[:, None]) / K[0, 0]
    ok = np.isfinite(depth) & (depth > 0)
    z = np.where(ok, depth, 0).astype(np.float64)  # no inf/NaN arithmetic below
    pts = np.stack([x * z, np.broadcast_to(y[:, None], z.shape) * z, z], axis=-1)
    if cam2world is not None:
        pose = np.asarray(cam2world, dtype=np.float64)
        pts = pts @ pose[:3, :3].T + pose[:3, 3]
    pts = np.where(ok[..., None], pts, 0.0)
    return pts.astype(_float_type(depth))


def project_points(pts_cam: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (..., 3) -> (pixel coordinates (..., 2), in-front mask)."""
    K = np.asarray(intrinsics, dtype=np.float64)
    pts = np.asarray(pts_cam, dtype=np.float64)
    z = pts[..., 2]
    front = z > _EPS
    safe_z = np.where(front, z, 1.0)
    uvw = pts @ K.T
    uv = uvw[..., :2] / safe_z[..., None]
    return uv, front


# --------------------------------------------------------------------------- #
# Textures
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _load_texture(name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) uint8; loaded once per process."""
    from skimage import data  # lazy: importing skimage is slow

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


@dataclass(frozen=True)
class _Atlas:
    """All textures flattened into one (N, 3) table so one gather serves every surface."""

    texels: np.ndarray  # (sum H*W, 3) uint8
    base: np.ndarray  # (T,) first row of each texture
    width: np.ndarray  # (T,)
    height: np.ndarray  # (T,)
    grey: np.ndarray  # (T,) bool: tinted more strongly, they have no colour of their own


@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    images = [_load_texture(name) for name in TEXTURE_NAMES]
    sizes = np.array([img.shape[0] * img.shape[1] for img in images])
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    grey = np.array([np.array_equal(img[..., 0], img[..., 1]) for img in images])
    return _Atlas(
        texels=np.concatenate([img.reshape(-1, 3) for img in images]),
        # int32 halves the memory traffic of the per-pixel index arithmetic.
        base=base.astype(np.int32),
        width=np.array([img.shape[1] for img in images], dtype=np.int32),
        height=np.array([img.shape[0] for img in images], dtype=np.int32),
        grey=grey,
    )


def _mirror(index: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Mirrored tiling: no hard seam where a texture repeats."""
    m = np.mod(index, 2 * size)
    return np.where(m < size, m, 2 * size - 1 - m)


# --------------------------------------------------------------------------- #
# Scene description (all randomness lives here)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Primitive:
    kind: str  # "room" (seen from inside), "box" or "sphere"
    center: np.ndarray  # (3,)
    half: np.ndarray  # (3,) half extents; a sphere's radius is half[0]
    yaw: float  # rotation about the world y axis (boxes)

    @property
    def bound(self) -> float:
        """Radius of a sphere around ``center`` that contains the primitive."""
        return float(self.half[0]) if self.kind == "sphere" else float(np.linalg.norm(self.half))


@dataclass(frozen=True)
class _Surfaces:
    """Per-surface texture mapping and colour, indexed by primitive * _FACES + face."""

    texture: np.ndarray  # (S,) index into TEXTURE_NAMES
    affine: np.ndarray  # (S, 2, 2) metres -> texture pixels (rotation and scale)
    offset: np.ndarray  # (S, 2) texture pixels (crop position)
    tint: np.ndarray  # (S, 3)


@dataclass(frozen=True)
class _Camera:
    intrinsics: np.ndarray  # (3, 3) float32
    cam2world: np.ndarray  # (4, 4) float32


@dataclass(frozen=True)
class _Layout:
    primitives: list[_Primitive]
    surfaces: _Surfaces
    light: np.ndarray  # (3,) unit vector towards the light
    ambient: float
    gain: np.ndarray  # (3,) per-scene colour/brightness jitter
    poses: list[np.ndarray]  # (4, 4) float32 cam2world per view
    hfov: float  # radians, shared by all views


def _draw_objects(rng: np.random.Generator) -> list[_Primitive]:
    """3-8 boxes and spheres resting on or floating above the floor near the centre."""
    objects = []
    for _ in range(int(rng.integers(3, 9))):
        lift = 0.0 if rng.random() < 0.65 else float(rng.uniform(0.1, 0.6))
        if rng.random() < 0.55:
            half = rng.uniform([0.1, 0.1, 0.1], [0.5, 0.6, 0.5])
            yaw = 0.0 if rng.random() < 0.4 else float(rng.uniform(0, np.pi / 2))
            kind = "box"
        else:
            half = np.full(3, rng.uniform(0.12, 0.45))
            yaw, kind = 0.0, "sphere"
        # Horizontal footprint only: heights stay below the lowest camera path.
        footprint = float(np.hypot(half[0], half[2]))
        reach = max(_MIN_CAM_RADIUS - _CAM_CLEARANCE - footprint, 0.0)
        dist = reach * np.sqrt(rng.random())  # uniform over the disc
        angle = rng.uniform(0, 2 * np.pi)
        center = np.array([dist * np.sin(angle), -(half[1] + lift), dist * np.cos(angle)])
        objects.append(_Primitive(kind, center, half, yaw))
    return objects


def _draw_room(rng: np.random.Generator, cam_radius: float) -> _Primitive:
    """A closed box around every camera position, walls at uneven distances."""
    margins = rng.uniform(0.6, 2.5, size=4)
    height = _MAX_CAM_HEIGHT + rng.uniform(0.6, 1.8)
    lo = np.array([-cam_radius - margins[0], -height, -cam_radius - margins[1]])
    hi = np.array([cam_radius + margins[2], 0.0, cam_radius + margins[3]])
    return _Primitive("room", (lo + hi) / 2, (hi - lo) / 2, 0.0)


def _draw_surfaces(rng: np.random.Generator, n_primitives: int) -> _Surfaces:
    """Random crop (offset), rotation and scale of a bundled photograph per surface."""
    atlas = _atlas()
    n_tex = len(TEXTURE_NAMES)
    count = n_primitives * _FACES
    # The room's faces each get their own photograph; an object's faces share one.
    per_prim = rng.integers(0, n_tex, size=n_primitives)
    room_faces = rng.integers(0, n_tex, size=_FACES)
    texture = np.repeat(per_prim, _FACES)
    texture[:_FACES] = room_faces
    angle = rng.uniform(0, 2 * np.pi, size=count)
    # ~1-2 image pixels per texel at typical distances: detail without heavy aliasing.
    density = rng.uniform(60.0, 150.0, size=count)
    cos, sin = np.cos(angle) * density, np.sin(angle) * density
    affine = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], axis=1)
    span = np.stack([atlas.width[texture], atlas.height[texture]], -1) * 2
    offset = rng.random((count, 2)) * span
    strong = rng.uniform(0.45, 1.0, size=(count, 3))
    mild = rng.uniform(0.85, 1.1, size=(count, 3))
    tint = np.where(atlas.grey[texture][:, None], strong, mild)
    return _Surfaces(texture, affine, offset, tint)


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cam2world for a level camera at ``position`` looking at ``target``."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    # World "down" is +y; right = down x forward keeps the image upright.
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


@dataclass(frozen=True)
class _Trajectory:
    """An arc around the centre, optionally dollying in and climbing slowly.

    Neighbouring views are 6-12 degrees apart around the centre, so a window of
    4 neighbours spans at most ~50 degrees and its pairs share most surfaces.
    """

    radius: float  # metres, at the first view (the largest: dolly <= 0)
    dolly: float  # radius change per view
    height: float  # above the floor, first view
    climb: float  # height change per view
    angle: float  # radians, first view
    step: float  # radians per view (signed)
    target: np.ndarray  # (3,) jittered scene centre all views look at


def _draw_trajectory(rng: np.random.Generator) -> _Trajectory:
    return _Trajectory(
        radius=float(rng.uniform(2.3, 3.5)),
        dolly=0.0 if rng.random() < 0.5 else float(rng.uniform(-0.12, 0.0)),
        height=float(rng.uniform(0.8, 1.9)),
        climb=float(rng.uniform(-0.05, 0.05)),
        angle=float(rng.uniform(0, 2 * np.pi)),
        step=float(np.deg2rad(rng.uniform(6.0, 12.0)) * rng.choice([-1.0, 1.0])),
        target=np.array([rng.uniform(-0.3, 0.3), -rng.uniform(0.2, 0.7), rng.uniform(-0.3, 0.3)]),
    )


def _draw_poses(rng: np.random.Generator, path: _Trajectory, n_views: int) -> list[np.ndarray]:
    poses = []
    for k in range(n_views):
        radius = max(path.radius + path.dolly * k, _MIN_CAM_RADIUS)
        height = float(np.clip(path.height + path.climb * k, 0.6, _MAX_CAM_HEIGHT))
        angle = path.angle + path.step * k
        position = np.array([radius * np.sin(angle), -height, radius * np.cos(angle)])
        # Small per-view aim jitter, like a hand-held camera.
        aim = path.target + rng.uniform(-0.05, 0.05, size=3)
        poses.append(_look_at(position, aim).astype(np.float32))
    return poses


def _draw_layout(seed: int, n_views: int) -> _Layout:
    rng = np.random.default_rng(seed)
    # Fixed draw order, independent of the image size, and per-view draws come
    # last: a seed names one scene at every resolution, and fewer views are a
    # prefix of more views.
    hfov = np.deg2rad(rng.uniform(50.0, 70.0))
    light = np.array([rng.uniform(-0.8, 0.8), -1.0, rng.uniform(-0.8, 0.8)])
    ambient = float(rng.uniform(0.3, 0.5))
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, size=3)
    objects = _draw_objects(rng)
    path = _draw_trajectory(rng)
    primitives = [_draw_room(rng, path.radius)] + objects
    surfaces = _draw_surfaces(rng, len(primitives))
    poses = _draw_poses(rng, path, n_views)
    return _Layout(primitives, surfaces, light / np.linalg.norm(light), ambient, gain, poses, hfov)


def _stereo_rig(seed: int, layout: _Layout) -> _Layout:
    """The same scene seen by a rectified stereo/slider rig instead of the arc.

    All views share the first arc view's orientation and sit on a line along its x axis
    (centred on it, 5-15 cm apart), with a 35-65 degree field of view: the geometry of
    real rectified pairs such as Middlebury's. Its draws come from a second generator, so
    the arc scene of the same seed is untouched.
    """
    rng = np.random.default_rng([seed, 1])
    hfov = float(np.deg2rad(rng.uniform(35.0, 65.0)))
    spacing = float(rng.uniform(0.05, 0.15))
    first = layout.poses[0].astype(np.float64)
    n_views = len(layout.poses)
    poses = []
    for k in range(n_views):
        pose = first.copy()
        pose[:3, 3] += (k - (n_views - 1) / 2) * spacing * first[:3, 0]
        poses.append(pose.astype(np.float32))
    return replace(layout, poses=poses, hfov=hfov)


RIGS = ("orbit", "stereo")


def _intrinsics(hfov: float, width: int, height: int) -> np.ndarray:
    focal = (width / 2) / np.tan(hfov / 2)  # the image spans [-0.5, W - 0.5]
    K = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])
    return K.astype(np.float32)


# --------------------------------------------------------------------------- #
# Ray casting
# --------------------------------------------------------------------------- #
def _camera_rays(camera: _Camera, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), directions (3, H, W) float32) with camera-frame z = 1.

    With z = 1 the ray parameter of a hit *is* its depth.
    """
    K = camera.intrinsics.astype(np.float64)
    pose = camera.cam2world.astype(np.float64)
    x = ((np.arange(width) - K[0, 2]) / K[0, 0]).astype(np.float32)
    y = ((np.arange(height) - K[1, 2]) / K[1, 1]).astype(np.float32)
    R = pose[:3, :3].astype(np.float32)
    dirs = np.empty((3, height, width), dtype=np.float32)
    for k in range(3):
        dirs[k] = R[k, 0] * x[None, :] + (R[k, 1] * y + R[k, 2])[:, None]
    return pose[:3, 3], dirs


def _to_local(vx: np.ndarray, vz: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(yaw), np.sin(yaw)
    return c * vx - s * vz, s * vx + c * vz


def _to_world(vx: np.ndarray, vz: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(yaw), np.sin(yaw)
    return c * vx + s * vz, -s * vx + c * vz


def _hit_room(origin: np.ndarray, dirs: np.ndarray, room: _Primitive) -> np.ndarray:
    """Exit distance from inside the room: the nearest wall along each ray."""
    lo, hi = room.center - room.half, room.center + room.half
    t = np.full(dirs.shape[1:], np.inf, dtype=np.float32)
    with np.errstate(divide="ignore"):
        for k in range(3):
            wall = np.where(dirs[k] > 0, np.float32(hi[k] - origin[k]), np.float32(lo[k] - origin[k]))
            np.minimum(t, wall / dirs[k], out=t)
    return t


def _hit_box(origin: np.ndarray, dirs: np.ndarray, box: _Primitive) -> np.ndarray:
    """Entry distance into a yaw-rotated box (slab test in its own frame), inf on miss."""
    rel = origin - box.center
    ox, oz = _to_local(rel[0], rel[2], box.yaw)
    dx, dz = (dirs[0], dirs[2]) if box.yaw == 0.0 else _to_local(dirs[0], dirs[2], box.yaw)
    near = np.full(dirs.shape[1:], -np.inf, dtype=np.float32)
    far = np.full(dirs.shape[1:], np.inf, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for o, d, h in ((ox, dx, box.half[0]), (rel[1], dirs[1], box.half[1]), (oz, dz, box.half[2])):
            inv = 1.0 / d
            a = np.float32(-h - o) * inv
            b = np.float32(h - o) * inv
            np.maximum(near, np.minimum(a, b), out=near)
            np.minimum(far, np.maximum(a, b), out=far)
        hit = (near <= far) & (near > _EPS)  # NaNs (ray in a slab face) compare False
    return np.where(hit, near, np.float32(np.inf))


def _hit_sphere(origin: np.ndarray, dirs: np.ndarray, sphere: _Primitive) -> np.ndarray:
    """Nearest intersection with a sphere seen from outside, inf on miss."""
    rel = (origin - sphere.center).astype(np.float32)
    a = dirs[0] * dirs[0] + dirs[1] * dirs[1] + dirs[2] * dirs[2]
    b = dirs[0] * rel[0] + dirs[1] * rel[1] + dirs[2] * rel[2]
    c = np.float32(rel @ rel - sphere.half[0] ** 2)
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.float32(np.inf))


_HITTERS = {"box": _hit_box, "sphere": _hit_sphere}


def _screen_rect(prim: _Primitive, camera: _Camera, width: int, height: int) -> tuple[slice, slice] | None:
    """Pixel rectangle that can see ``prim`` (whole image if it reaches behind the camera).

    Projecting the corners of a cube around the bounding sphere is
    conservative, and testing only those pixels is what keeps objects cheap.
    """
    corners = prim.center + prim.bound * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    cam = points_in_camera(corners, camera.cam2world.astype(np.float64))
    if np.any(cam[:, 2] <= _EPS):
        return slice(0, height), slice(0, width)
    uv, _ = project_points(cam, camera.intrinsics)
    u0, v0 = np.floor(uv.min(axis=0)).astype(int)
    u1, v1 = np.ceil(uv.max(axis=0)).astype(int) + 1
    u0, u1 = max(u0, 0), min(u1, width)
    v0, v1 = max(v0, 0), min(v1, height)
    if u0 >= u1 or v0 >= v1:
        return None
    return slice(v0, v1), slice(u0, u1)


def _trace(
    origin: np.ndarray, dirs: np.ndarray, primitives: list[_Primitive], camera: _Camera
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit per pixel: (depth (H, W) float32, primitive index (H, W) int16)."""
    height, width = dirs.shape[1:]
    depth = _hit_room(origin, dirs, primitives[0])
    owner = np.zeros((height, width), dtype=np.int16)
    for index, prim in enumerate(primitives[1:], start=1):
        rect = _screen_rect(prim, camera, width, height)
        if rect is None:
            continue
        t = _HITTERS[prim.kind](origin, dirs[:, rect[0], rect[1]], prim)
        closer = t < depth[rect]
        np.copyto(depth[rect], t, where=closer)
        np.copyto(owner[rect], np.int16(index), where=closer)
    return depth, owner


# --------------------------------------------------------------------------- #
# Shading
# --------------------------------------------------------------------------- #
@dataclass
class _Hits:
    """Surface description of n hit points (float32 arrays, face int8)."""

    face: np.ndarray  # int8, 0-5 (box/room face; spheres use 0)
    u: np.ndarray  # surface coordinates in metres
    v: np.ndarray
    facing: np.ndarray  # cosine between the surface normal and the light direction


_SurfaceFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _box_surface(
    px: np.ndarray, py: np.ndarray, pz: np.ndarray, prim: _Primitive, light: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(face, u, v, n.l) for points on a box, or on the room's walls seen from inside."""
    lx, lz = _to_local(px - np.float32(prim.center[0]), pz - np.float32(prim.center[2]), prim.yaw)
    ly = py - np.float32(prim.center[1])
    hx, hy, hz = (np.float32(1.0 / h) for h in prim.half)
    rx, ry, rz = np.abs(lx) * hx, np.abs(ly) * hy, np.abs(lz) * hz
    # The face is the slab the point lies on: its largest normalised coordinate.
    on_x = (rx >= ry) & (rx >= rz)
    on_y = ~on_x & (ry >= rz)
    along = np.where(on_x, lx, np.where(on_y, ly, lz))
    positive = along > 0
    face = np.where(on_x, 0, np.where(on_y, 2, 4)).astype(np.int8) + positive
    # Each face is parametrised by its two in-plane local axes.
    u = np.where(on_x, lz, lx)
    v = np.where(on_y, lz, ly)
    # n.l in the box frame: the normal is +-1 along the face axis.
    l_x, l_z = _to_local(light[0], light[2], prim.yaw)
    l_along = np.where(on_x, np.float32(l_x), np.where(on_y, np.float32(light[1]), np.float32(l_z)))
    outward = positive if prim.kind != "room" else ~positive  # room normals point inwards
    facing = np.where(outward, l_along, -l_along)
    return face, u, v, facing


def _sphere_surface(
    px: np.ndarray, py: np.ndarray, pz: np.ndarray, prim: _Primitive, light: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(face, u, v, n.l) for points on a sphere."""
    inv = np.float32(1.0 / prim.half[0])
    qx, qy, qz = ((p - np.float32(c)) * inv for p, c in zip((px, py, pz), prim.center))
    # Longitude/latitude scaled by the radius: texels about as large as on flat faces.
    radius = np.float32(prim.half[0])
    u = np.arctan2(qx, qz) * radius
    v = np.arcsin(np.clip(qy, -1.0, 1.0)) * radius
    facing = qx * np.float32(light[0]) + qy * np.float32(light[1]) + qz * np.float32(light[2])
    return np.zeros(len(px), dtype=np.int8), u, v, facing


def _describe(points: tuple[np.ndarray, ...], owner: np.ndarray, layout: _Layout) -> _Hits:
    """Surface description of every pixel's hit point."""
    # The room owns most pixels: describe every pixel as room first (no
    # gathers), then overwrite the few pixels that objects own.
    hits = _Hits(*_box_surface(*points, layout.primitives[0], layout.light))
    for index, prim in enumerate(layout.primitives[1:], start=1):
        sel = np.flatnonzero(owner == index)
        if len(sel) == 0:
            continue
        describe: _SurfaceFn = _sphere_surface if prim.kind == "sphere" else _box_surface
        face, u, v, facing = describe(*(p[sel] for p in points), prim, layout.light)
        hits.face[sel], hits.u[sel], hits.v[sel], hits.facing[sel] = face, u, v, facing
    return hits


def _sample_texture(surface: np.ndarray, hits: _Hits, surfaces: _Surfaces) -> np.ndarray:
    """Nearest texel of each surface's photograph crop, (n, 3) uint8."""
    atlas = _atlas()
    tex = surfaces.texture[surface]
    a = surfaces.affine.astype(np.float32)
    off = surfaces.offset.astype(np.float32)
    col = np.floor(a[surface, 0, 0] * hits.u + a[surface, 0, 1] * hits.v + off[surface, 0])
    row = np.floor(a[surface, 1, 0] * hits.u + a[surface, 1, 1] * hits.v + off[surface, 1])
    width, height = atlas.width[tex], atlas.height[tex]
    col = _mirror(col.astype(np.int32), width)
    row = _mirror(row.astype(np.int32), height)
    return atlas.texels[atlas.base[tex] + row * width + col]


def _colours(points: tuple[np.ndarray, ...], owner: np.ndarray, layout: _Layout) -> np.ndarray:
    """Shaded texture colours (n, 3) uint8 for hit points owned by each primitive."""
    hits = _describe(points, owner, layout)
    surface = owner.astype(np.int64) * _FACES + hits.face
    texels = _sample_texture(surface, hits, layout.surfaces)
    # Lambert with one directional light plus ambient, so shapes read clearly.
    ambient = np.float32(layout.ambient)
    shading = ambient + (1 - ambient) * np.maximum(hits.facing, np.float32(0))
    tint = (layout.surfaces.tint * layout.gain).astype(np.float32)[surface]
    colour = texels * (tint * shading[:, None])
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


def _render(layout: _Layout, camera: _Camera, width: int, height: int) -> View:
    origin, dirs = _camera_rays(camera, width, height)
    depth, owner = _trace(origin, dirs, layout.primitives, camera)
    valid = np.isfinite(depth) & (depth > 0) & (depth < MAX_DISTANCE)
    depth = np.where(valid, depth, np.float32(0))
    # Invalid pixels get depth 0, i.e. the camera centre: harmless, masked below.
    points = tuple((np.float32(origin[k]) + depth * dirs[k]).ravel() for k in range(3))
    img = _colours(points, owner.ravel(), layout).reshape(height, width, 3)
    img[~valid] = 0
    pts3d = np.stack(points, axis=-1).reshape(height, width, 3)
    pts3d[~valid] = 0
    return View(
        img=img,
        depth=depth,
        intrinsics=camera.intrinsics.copy(),
        cam2world=camera.cam2world.copy(),
        valid=valid,
        pts3d=pts3d,
    )


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
