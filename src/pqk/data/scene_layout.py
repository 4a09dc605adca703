"""What a generated scene is made of, drawn from its seed: the room, the objects, their
surface textures, the light and the camera poses (orbit arc or stereo slider) and
intrinsics. All the randomness of scene generation lives here."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pqk.data.textures import TEXTURE_NAMES, _atlas

_FACES = 6  # surface slots per primitive (box faces; spheres use slot 0)

# Placement bounds (metres). Cameras never come closer to the centre than
# _MIN_CAM_RADIUS and objects stay _CAM_CLEARANCE inside it, so no camera is
# ever inside an object.
_MIN_CAM_RADIUS = 1.9
_CAM_CLEARANCE = 0.45
_MAX_CAM_HEIGHT = 2.2


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
