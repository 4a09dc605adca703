"""The frozen workload of the protocol (P0-1): resolution 512, batch 1, pair graph swin-4
symmetrized, seed 42, a fixed sample of 20 pairs, the scenes for scene-level figures, and
a content hash of the data so every experiment is measured on exactly the same inputs."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pqk.data.pairs import make_pair_indices
from pqk.errors import InputError

WORKLOAD_VERSION = 1
MOTORCYCLE = "middlebury-motorcycle"


@dataclass
class Workload:
    resolution: int = 512
    batch_size: int = 1
    scene_graph: str = "swin-4"
    symmetrize: bool = True
    seed: int = 42
    n_pairs: int = 20
    # Where the scenes come from: {"kind": "generated", "seeds": [...], "views": 8, "width": 512,
    # "height": 384} or {"kind": "folder", "path": "/data/scenes"}.
    data: dict = field(default_factory=dict)
    # The frozen sample: [scene name, view1 index, view2 index].
    pairs: list = field(default_factory=list)
    scene_level: list = field(default_factory=list)
    # Real-photograph check, reported beside the main figures: pairs of the motorcycle scene.
    real_pairs: list = field(default_factory=list)
    data_hash: str = ""
    pairs_hash: str = ""  # which pairs are measured (`pairs_hash`); empty in workloads frozen before it
    # Global alignment for the scene-level figures (t_scene_s, chamfer), DUSt3R's README values.
    ga_niter: int = 300
    ga_lr: float = 0.01
    ga_schedule: str = "cosine"
    # Pointmaps are subsampled by this stride before global alignment: at full 512x384 the
    # optimisation costs minutes per scene on a CPU; the same stride is used for every experiment.
    ga_stride: int = 4
    version: int = WORKLOAD_VERSION


def scene_hash(scenes: list) -> str:
    """sha256 over every array that enters evaluation, in scene and view order."""
    h = hashlib.sha256()
    for scene in scenes:
        h.update(scene.name.encode())
        for view in scene.views:
            for array in (view.img, view.depth, view.intrinsics, view.cam2world, view.valid):
                a = np.ascontiguousarray(array)
                h.update(str(a.dtype).encode() + str(a.shape).encode())
                h.update(a.tobytes())
    return h.hexdigest()


def _build_scenes(data: dict, resolution: int) -> list:
    kind = data.get("kind")
    if kind == "generated":
        from pqk.data.scenes import generate_scene

        return [generate_scene(s, n_views=data["views"], width=data["width"], height=data["height"]) for s in data["seeds"]]
    if kind == "folder":
        from pqk.data.folder import load_folder_scenes

        return load_folder_scenes(Path(data["path"]), size=resolution)
    raise InputError(f"workload data kind {kind!r} is not known; accepted: generated, folder")


def load_scenes(workload: Workload, check_hash: bool = True) -> dict[str, object]:
    """The workload's scenes by name (motorcycle included when used), hash-checked."""
    scenes = _build_scenes(workload.data, workload.resolution)
    if check_hash and scene_hash(scenes) != workload.data_hash:
        raise InputError(
            "the workload's data hash does not match the data found "
            f"({workload.data.get('kind')}: {workload.data.get('path', 'generated scenes')}); the data changed since "
            "`pqk workload make` froze it: remake the workload or restore the data"
        )
    by_name = {s.name: s for s in scenes}
    if workload.real_pairs:
        from pqk.data.motorcycle import motorcycle_scene

        by_name[MOTORCYCLE] = motorcycle_scene(workload.resolution)
    check_pairs_in_scenes(workload, by_name)
    return by_name


def pair_shapes(workload: Workload) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The distinct ((H1, W1), (H2, W2)) image shapes of the workload's pairs and real pairs, in
    first-use order: the static shapes a deployed ONNX model must cover to measure all of them.
    Generated scenes are not rendered for this (their shape is in the data spec)."""
    data = workload.data or {}
    if data.get("kind") == "generated" and "height" in data:
        shapes = [((int(data["height"]), int(data["width"])),) * 2] if workload.pairs else []
        scenes: dict = {}
    else:
        scenes = {s.name: s for s in _build_scenes(data, workload.resolution)}
        shapes = []
    if workload.real_pairs:
        from pqk.data.motorcycle import motorcycle_scene

        scenes[MOTORCYCLE] = motorcycle_scene(workload.resolution)
    for name, i, j in [*(workload.pairs if not shapes else []), *workload.real_pairs]:
        views = scenes[name].views
        shape = (tuple(views[i].img.shape[:2]), tuple(views[j].img.shape[:2]))
        if shape not in shapes:
            shapes.append(shape)  # type: ignore[arg-type]
    return shapes  # type: ignore[return-value]


def make_workload(
    data: Path | None = None,
    n_pairs: int = 20,
    n_scenes: int = 5,
    views: int = 8,
    scene_level: int = 1,
    seed: int = 42,
    resolution: int = 512,
    scene_graph: str = "swin-4",
    real_check: bool = True,
) -> Workload:
    """Freeze a workload: the default is generated scenes (seeds seed..seed+n_scenes-1, disjoint
    from the teacher's training seeds) plus the motorcycle pair; `data` uses a user folder."""
    if data is None:
        spec = {"kind": "generated", "seeds": [seed + k for k in range(n_scenes)], "views": views,
                "width": resolution, "height": resolution * 3 // 4}
    else:
        spec = {"kind": "folder", "path": str(Path(data).resolve())}
    scenes = _build_scenes(spec, resolution)
    if not scenes:
        raise InputError(f"no scenes found for the workload in {data}")
    candidates = [
        [scene.name, i, j]
        for scene in scenes
        for i, j in make_pair_indices(len(scene.views), scene_graph, symmetrize=True)
        if scene.views[i].valid.any()
    ]
    if len(candidates) < n_pairs:
        raise InputError(f"the data gives only {len(candidates)} pairs with ground truth; the workload needs {n_pairs}")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(candidates), size=n_pairs, replace=False).tolist())
    workload = Workload(
        resolution=resolution,
        scene_graph=scene_graph,
        seed=seed,
        n_pairs=n_pairs,
        data=spec,
        pairs=[candidates[k] for k in picks],
        scene_level=[s.name for s in scenes[:scene_level]],
        real_pairs=[[MOTORCYCLE, 0, 1], [MOTORCYCLE, 1, 0]] if real_check else [],
        data_hash=scene_hash(scenes),
    )
    workload.pairs_hash = pairs_hash(workload)
    return workload


def save_workload(workload: Workload, path: Path) -> Path:
    from pqk.io.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# pqk workload: frozen by `pqk workload make`; every experiment is measured on exactly this.\n"
    atomic_write_text(path, header + yaml.safe_dump(asdict(workload), sort_keys=False, default_flow_style=None))
    return path


def load_workload(path: Path) -> Workload:
    from pqk.yaml_io import read_yaml

    path = Path(path)
    raw = read_yaml(path, "workload", hint=f"create one with `pqk workload make --out {path}`")
    if not isinstance(raw, dict) or "pairs" not in raw or "data_hash" not in raw:
        raise InputError(f"{path} is not a pqk workload (no pairs / data_hash)")
    known = set(Workload.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"workload {path} has unknown field {unknown[0]!r}")
    _check_fields(raw, path)
    workload = Workload(**raw)
    if workload.pairs_hash and workload.pairs_hash != pairs_hash(workload):
        raise InputError(f"workload {path}: its pair list changed since `pqk workload make` froze it (pairs_hash "
                         "does not match); remake the workload or restore the file")
    return workload


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pair_list(value, name: str, path: Path) -> None:
    ok = isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and _is_int(p[1]) and _is_int(p[2])
        and p[1] >= 0 and p[2] >= 0 for p in value)
    if not ok:
        raise InputError(f"workload {path}: {name} must be a list of [scene name, view index, view index] "
                         "(indices >= 0), as `pqk workload make` writes it")


def _check_fields(raw: dict, path: Path) -> None:
    """Types and ranges of a frozen workload's fields: one line naming the bad field."""
    for name in ("resolution", "batch_size", "n_pairs", "seed", "ga_niter", "ga_stride", "version"):
        if name in raw and not (_is_int(raw[name]) and (raw[name] >= 0 if name == "seed" else raw[name] > 0)):
            raise InputError(f"workload {path}: {name} must be a positive whole number; got {raw[name]!r}")
    if "ga_lr" in raw and (isinstance(raw["ga_lr"], bool) or not isinstance(raw["ga_lr"], (int, float)) or not raw["ga_lr"] > 0):
        raise InputError(f"workload {path}: ga_lr must be a number > 0; got {raw['ga_lr']!r}")
    for name in ("scene_graph", "ga_schedule", "data_hash", "pairs_hash"):
        if name in raw and not isinstance(raw[name], str):
            raise InputError(f"workload {path}: {name} must be a string; got {raw[name]!r}")
    _check_pair_list(raw.get("pairs"), "pairs", path)
    _check_pair_list(raw.get("real_pairs", []), "real_pairs", path)
    if not isinstance(raw.get("scene_level", []), list) or not all(isinstance(n, str) for n in raw.get("scene_level", [])):
        raise InputError(f"workload {path}: scene_level must be a list of scene names")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise InputError(f"workload {path}: data must be a mapping (kind: generated or folder)")
    if data.get("kind") == "generated":
        if not isinstance(data.get("seeds"), list) or not all(_is_int(x) for x in data["seeds"]):
            raise InputError(f"workload {path}: data.seeds must be a list of whole numbers; got {data.get('seeds')!r}")
        for name in ("views", "width", "height"):
            if not (_is_int(data.get(name)) and 0 < data[name] <= 8192):
                raise InputError(f"workload {path}: data.{name} must be a whole number in 1..8192; got {data.get(name)!r}")
    elif data.get("kind") == "folder" and not isinstance(data.get("path"), str):
        raise InputError(f"workload {path}: data.path must be a folder path")


def pairs_hash(workload: Workload) -> str:
    """sha256 of which pairs are measured (the data hash covers the arrays, not the choice)."""
    payload = repr(([list(p) for p in workload.pairs], [list(p) for p in workload.real_pairs])).encode()
    return hashlib.sha256(payload).hexdigest()


def check_pairs_in_scenes(workload: Workload, scenes: dict) -> None:
    """Every measured pair names a scene of the data and views it has."""
    for name, i, j in [*workload.pairs, *workload.real_pairs]:
        if name not in scenes:
            raise InputError(f"the workload measures pair {[name, i, j]} but its data has no scene {name!r}")
        n = len(scenes[name].views)
        if max(i, j) >= n:
            raise InputError(f"the workload measures pair {[name, i, j]} but scene {name!r} has {n} views (0..{n - 1})")
    missing = [n for n in workload.scene_level if n not in scenes]
    if missing:
        raise InputError(f"the workload's scene_level names {missing[0]!r}, which its data does not have")


# The protocol's workload when no workload file is found (configs/workload.yaml).
_DEFAULT_SHAPE = {"width": 512, "height": 384, "pairs": 20, "real_pairs": 2, "scene_level": 1,
                  "views": 8, "scene_graph": "swin-4", "symmetrize": True}
_LATENCY_PASSES = 3 + 30  # EvalOptions: 3 warm-up + 30 timed pairs


def evaluation_shape(path: Path | None, notes: list[str]) -> dict:
    """Evaluation shape and pass count of a frozen workload, read without loading its scenes
    (what `pqk budget` prices one evaluation with)."""
    from pqk.errors import ConfigError
    from pqk.yaml_io import read_yaml

    shape = dict(_DEFAULT_SHAPE)
    if path is None:
        notes.append("no workload file found: the protocol's workload assumed (512x384, 20 pairs, 1 scene of 8 views)")
    else:
        data = read_yaml(path, "workload", invalid=ConfigError) or {}
        src = data.get("data") if isinstance(data.get("data"), dict) else {}
        shape.update(
            width=int(src.get("width", shape["width"])), height=int(src.get("height", shape["height"])),
            pairs=len(data.get("pairs") or []) or int(data.get("n_pairs", shape["pairs"])),
            real_pairs=len(data.get("real_pairs") or []), scene_level=len(data.get("scene_level") or []),
            views=int(src.get("views", shape["views"])), scene_graph=str(data.get("scene_graph", shape["scene_graph"])),
            symmetrize=bool(data.get("symmetrize", True)),
        )
    scene_pairs = len(make_pair_indices(shape["views"], shape["scene_graph"], symmetrize=shape["symmetrize"]))
    shape["passes"] = shape["pairs"] + shape["real_pairs"] + _LATENCY_PASSES + shape["scene_level"] * scene_pairs
    shape["scene_pairs"] = scene_pairs
    shape["what"] = (f"{shape['pairs']} pairs, {shape['real_pairs']} real, {_LATENCY_PASSES} latency, "
                     f"{shape['scene_level']} scene x {scene_pairs} pairs")
    return shape
