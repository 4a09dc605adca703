"""Shading and the rendering of one view: surface coordinates of every ray hit,
textured and Lambert-lit, assembled with depth and world points into a `View`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pqk.data.ray_casting import _camera_rays, _to_local, _trace
from pqk.data.scene_layout import _FACES, _Camera, _Layout, _Primitive, _Surfaces
from pqk.data.scene_types import View
from pqk.data.textures import _atlas, _mirror

MAX_DISTANCE = 100.0  # metres; farther hits count as invalid


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
