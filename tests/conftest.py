"""Shared test fixtures: where the conformance data lives, tiny models."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PQK_SHARED", REPO.parent / "shared"))
CONFORMANCE = SHARED / "conformance" / "dust3r"

TINY_KWARGS = dict(
    enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
    dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
    img_size=(64, 96), landscape_only=False,
)


def require_conformance() -> Path:
    """The conformance folder; CI must have it (fail), a laptop without it skips."""
    if not CONFORMANCE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"conformance data not found at {CONFORMANCE} (set PQK_SHARED)")
        pytest.skip(f"conformance data not found at {CONFORMANCE}")
    return CONFORMANCE


def conformance_cases() -> list[Path]:
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p for p in CONFORMANCE.iterdir() if (p / "config.json").is_file())


def read_case_config(case: Path) -> dict:
    return json.loads((case / "config.json").read_text())


def read_case_weights(case: Path) -> dict[str, torch.Tensor]:
    name = read_case_config(case)["weights_file"]
    path = case / name
    if name.endswith(".xz"):
        return load(lzma.decompress(path.read_bytes()))
    return load_file(str(path))


def decompress_case_weights(case: Path, folder: Path) -> Path:
    """The weights as a plain .safetensors file in `folder` (the DPT file ships xz-compressed)."""
    name = read_case_config(case)["weights_file"]
    if not name.endswith(".xz"):
        return case / name
    out = folder / name[: -len(".xz")]
    if not out.exists():
        out.write_bytes(lzma.decompress((case / name).read_bytes()))
    return out


@pytest.fixture(scope="session")
def tiny_model():
    from pqk.models.dust3r import build_model

    torch.manual_seed(42)
    return build_model(**TINY_KWARGS).eval()


def generated_pair(seed: int, width: int, height: int) -> tuple[dict, dict]:
    """Views 0 and 1 of a two-view generated scene, as the model takes them."""
    from pqk.data.scenes import generate_scene
    from pqk.tasks.dust3r.measure import scene_view

    scene = generate_scene(seed, n_views=2, width=width, height=height)
    return scene_view(scene, 0), scene_view(scene, 1)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of `a` from the reference `b`."""
    return float((a - b).norm() / b.norm())
