"""The CLIP family's frozen workload: image size 64, batch 1, seed 42, 300 generated test-split
scenes (3 captions, 4-5 VQA items and a zero-shot label each) plus the 10 bundled real
photographs, and a content hash of every set that enters evaluation, so every experiment is
measured on exactly the same inputs. A user folder (`pqk.data.captions.folder`) can replace the
generated scenes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pqk.errors import InputError

WORKLOAD_VERSION = 1
FAMILY = "clip"
DEFAULT_N = 300
# How to re-freeze, named in the hash-mismatch error.
REFREEZE_HINT = ("re-freeze with pqk.tasks.clip.workload.freeze(path) (or `pqk workload make` for CLIP) "
                 "or restore the data")
# pqk eval's latency protocol (EvalOptions: 3 warm-up + 30 timed), once for images and once for texts.
_LATENCY_PASSES = 2 * (3 + 30)


@dataclass
class ClipWorkload:
    family: str = FAMILY
    image_size: int = 64
    batch_size: int = 1
    # Seeds the generated scenes (the test split's stream; training uses the train split).
    seed: int = 42
    # Where the main set comes from: {"kind": "generated", "n": 300, "split": "test"} or
    # {"kind": "folder", "path": "/data/coco5k"} (captions.jsonl, questions.jsonl or class folders).
    data: dict = field(default_factory=lambda: {"kind": "generated", "n": DEFAULT_N, "split": "test"})
    # The bundled real photographs, reported beside the main figures.
    real_photos: bool = True
    data_hash: str = ""  # sha256 over the content hashes of every set, in order
    set_hashes: dict = field(default_factory=dict)  # set name -> content_hash, to say which one changed
    # Forwards of one full evaluation: images, and distinct texts (captions, prompts, VQA candidates).
    forwards: dict = field(default_factory=dict)
    version: int = WORKLOAD_VERSION


def combined_hash(set_hashes: dict[str, str]) -> str:
    """sha256 over (name, content hash) of every set, in order."""
    h = hashlib.sha256()
    for name, value in set_hashes.items():
        h.update(f"{name}:{value}\n".encode())
    return h.hexdigest()


def workload_hash(workload: ClipWorkload) -> str:
    """sha256 of the whole workload (every field), to name it in records."""
    payload = json.dumps(asdict(workload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _build_sets(workload: ClipWorkload) -> dict:
    """The sets of a workload, main set first: {"generated" | "folder": ..., "photos": ...}."""
    from pqk.data.captions import generate_caption_set, load_folder, real_photographs

    data, size = workload.data, workload.image_size
    kind = data.get("kind")
    if kind == "generated":
        sets = {"generated": generate_caption_set(int(data["n"]), int(workload.seed), data["split"], size)}
    elif kind == "folder":
        sets = {"folder": load_folder(Path(data["path"]), size)}
    else:
        raise InputError(f"workload data kind {kind!r} is not known; accepted: generated, folder")
    if workload.real_photos:
        sets["photos"] = real_photographs(size)
    return sets


def _hashes(sets: dict) -> dict[str, str]:
    from pqk.data.captions import content_hash

    return {name: content_hash(data) for name, data in sets.items()}


def _count_forwards(sets: dict) -> dict[str, int]:
    images = sum(len(s) for s in sets.values())
    texts = 0
    for s in sets.values():
        distinct = {c for caps in s.captions for c in caps}
        distinct |= {p.format(name) for name in s.class_names for p in s.prompts}
        distinct |= {f"{item.question} {choice}" for item in s.vqa for choice in item.choices}
        texts += len(distinct)
    return {"images": images, "texts": texts}


def load_sets(workload: ClipWorkload, check_hash: bool = True) -> dict:
    """The workload's sets by name, main set first; refused when their content changed."""
    sets = _build_sets(workload)
    if check_hash:
        found = _hashes(sets)
        if combined_hash(found) != workload.data_hash:
            changed = [n for n in found if workload.set_hashes.get(n) != found[n]] or list(found)
            raise InputError(f"workload data hash mismatch: the data changed since the workload was frozen "
                             f"({', '.join(changed)}); {REFREEZE_HINT}")
    return sets


def make_workload(
    data: Path | None = None,
    n: int = DEFAULT_N,
    split: str = "test",
    seed: int = 42,
    image_size: int = 64,
    real_photos: bool = True,
) -> ClipWorkload:
    """Freeze a workload: generated scenes (n of the split, seeded by seed) by default, a user
    folder with `data`; the bundled photographs unless real_photos is False."""
    spec = ({"kind": "generated", "n": int(n), "split": split} if data is None
            else {"kind": "folder", "path": str(Path(data).resolve())})
    workload = ClipWorkload(image_size=image_size, seed=seed, data=spec, real_photos=real_photos)
    _check_fields(asdict(workload), Path("<new workload>"), frozen=False)
    sets = _build_sets(workload)
    if not len(next(iter(sets.values()))):
        raise InputError(f"no images found for the workload in {data}")
    workload.set_hashes = _hashes(sets)
    workload.data_hash = combined_hash(workload.set_hashes)
    workload.forwards = _count_forwards(sets)
    return workload


_HEADER = """\
# pqk CLIP workload: frozen by pqk.tasks.clip.workload.freeze; every experiment is measured on exactly this.
# image_size: images are resized (shorter side, bicubic) and centre-cropped to image_size x image_size.
# data: the main set; generated = n scenes of the split, seeded by `seed` (training uses the train split,
#   which never shows the held-out colour-shape pairs); folder = a user folder (README: folder formats).
# real_photos: the 10 photographs bundled with scikit-image, scikit-learn and matplotlib (a sanity check).
# data_hash / set_hashes: content hashes of the sets; evaluation refuses data that no longer matches.
# forwards: image and distinct-text forwards of one full evaluation (what `pqk budget` prices).
"""


def save_workload(workload: ClipWorkload, path: Path) -> Path:
    from pqk.io.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, _HEADER + yaml.safe_dump(asdict(workload), sort_keys=False, default_flow_style=False))
    return path


def freeze(path: Path, **options) -> ClipWorkload:
    """make_workload(**options), written to `path`."""
    workload = make_workload(**options)
    save_workload(workload, path)
    return workload


def load_workload(path: Path) -> ClipWorkload:
    from pqk.yaml_io import read_yaml

    path = Path(path)
    raw = read_yaml(path, "workload", hint="freeze one with pqk.tasks.clip.workload.freeze")
    if not isinstance(raw, dict) or raw.get("family") != FAMILY or "data_hash" not in raw:
        raise InputError(f"{path} is not a pqk CLIP workload (no family: clip / data_hash)")
    unknown = sorted(set(raw) - set(ClipWorkload.__dataclass_fields__))
    if unknown:
        raise InputError(f"workload {path} has unknown field {unknown[0]!r}")
    _check_fields(raw, path, frozen=True)
    return ClipWorkload(**raw)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(raw: dict, path: Path, frozen: bool) -> None:
    """Types and ranges of a workload's fields: one line naming the bad field."""
    for name, low, high in (("image_size", 8, 4096), ("batch_size", 1, 4096), ("seed", 0, 2**63 - 1),
                            ("version", 1, WORKLOAD_VERSION)):
        if name in raw and not (_is_int(raw[name]) and low <= raw[name] <= high):
            raise InputError(f"workload {path}: {name} must be a whole number in {low}..{high}; got {raw[name]!r}")
    if "real_photos" in raw and not isinstance(raw["real_photos"], bool):
        raise InputError(f"workload {path}: real_photos must be true or false; got {raw['real_photos']!r}")
    if frozen and not (isinstance(raw.get("data_hash"), str) and len(raw["data_hash"]) == 64):
        raise InputError(f"workload {path}: data_hash must be the 64-character hash the workload was frozen with")
    set_hashes = raw.get("set_hashes", {})
    if not isinstance(set_hashes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in set_hashes.items()):
        raise InputError(f"workload {path}: set_hashes must map set names to hashes")
    forwards = raw.get("forwards", {})
    if not isinstance(forwards, dict) or not all(k in ("images", "texts") and _is_int(v) and v >= 0
                                                 for k, v in forwards.items()):
        raise InputError(f"workload {path}: forwards must be {{images: N, texts: M}} (whole numbers)")
    _check_data(raw.get("data"), path)


def _check_data(data, path: Path) -> None:
    if not isinstance(data, dict):
        raise InputError(f"workload {path}: data must be a mapping (kind: generated or folder)")
    kind = data.get("kind")
    if kind == "generated":
        extra = sorted(set(data) - {"kind", "n", "split"})
        if extra:
            raise InputError(f"workload {path}: data has unknown field {extra[0]!r} (generated: kind, n, split)")
        if not (_is_int(data.get("n")) and 1 <= data["n"] <= 1_000_000):
            raise InputError(f"workload {path}: data.n must be a whole number in 1..1000000; got {data.get('n')!r}")
        if data.get("split") not in ("train", "test"):
            raise InputError(f"workload {path}: data.split must be train or test; got {data.get('split')!r}")
    elif kind == "folder":
        extra = sorted(set(data) - {"kind", "path"})
        if extra:
            raise InputError(f"workload {path}: data has unknown field {extra[0]!r} (folder: kind, path)")
        if not isinstance(data.get("path"), str) or not data["path"]:
            raise InputError(f"workload {path}: data.path must be a folder path")
    else:
        raise InputError(f"workload {path}: data.kind must be generated or folder; got {kind!r}")


# The protocol's workload when no workload file is found (configs/workload_clip.yaml).
_DEFAULT_FORWARDS = {"images": DEFAULT_N + 10, "texts": 2222}  # as frozen in configs/workload_clip.yaml


def evaluation_shape(path: Path | None, notes: list[str]) -> dict:
    """Evaluation shape and pass count of a frozen workload, read without loading its sets
    (what `pqk budget` prices one evaluation with): image forwards + distinct text forwards +
    the latency protocol's (3 warm-up + 30 timed, images and texts)."""
    from pqk.errors import ConfigError
    from pqk.yaml_io import read_yaml

    size, forwards = 64, dict(_DEFAULT_FORWARDS)
    if path is None:
        notes.append(f"no workload file found: the protocol's CLIP workload assumed (64x64, {DEFAULT_N} generated "
                     "scenes + 10 photographs)")
    else:
        raw = read_yaml(path, "workload", invalid=ConfigError) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"workload {path} is not a mapping")
        size = int(raw.get("image_size", size)) if _is_int(raw.get("image_size", size)) else size
        found = raw.get("forwards") if isinstance(raw.get("forwards"), dict) else {}
        if _is_int(found.get("images")) and _is_int(found.get("texts")):
            forwards = {"images": found["images"], "texts": found["texts"]}
        else:
            notes.append(f"workload {path} does not record its forwards: the protocol's counts assumed")
    passes = forwards["images"] + forwards["texts"] + _LATENCY_PASSES
    return {"width": size, "height": size, "passes": passes, "images": forwards["images"], "texts": forwards["texts"],
            "what": f"{forwards['images']} images, {forwards['texts']} texts, {_LATENCY_PASSES} latency"}
