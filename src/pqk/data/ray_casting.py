"""Ray casting of a generated scene's layout: one ray per pixel, intersected with the
room and the objects (only inside each object's screen rectangle), giving every pixel's
depth and the primitive it hit."""

from __future__ import annotations

import numpy as np

from pqk.data.scene_geometry import _EPS, points_in_camera, project_points
from pqk.data.scene_layout import _Camera, _Primitive


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
