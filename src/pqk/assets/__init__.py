"""Files shipped inside the package: the default model pqk runs when given none.

`teacher_dust3r.safetensors` is the embedded teacher (a small DUSt3R trained by
`pqk teacher train` on generated scenes; `teacher_recipe.json` beside it says how). Until it
exists, the tiny untrained demo model stands in, with a notice saying so.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TEACHER_CHECKPOINT = ASSETS / "teacher_dust3r.safetensors"
TEACHER_RECIPE = ASSETS / "teacher_recipe.json"
DEMO_CHECKPOINT = ASSETS / "demo_dust3r.safetensors"
TEACHER_NOTICE = (
    "using the bundled teacher: a small DUSt3R (~5M parameters) trained on pqk's generated scenes, "
    "not the official DUSt3R; pass --checkpoint for other weights"
)
DEMO_NOTICE = (
    "using the bundled DEMO weights (a tiny randomly initialised DUSt3R, seed 42): the pipeline runs, "
    "but the point clouds are not a real reconstruction; pass --checkpoint for a trained model"
)

# A tiny DUSt3R with the linear head: any input size, ~0.4M parameters.
DEMO_KWARGS = dict(
    enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
    dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
    img_size=(512, 512), landscape_only=False, head_type="linear",
)


def default_checkpoint() -> tuple[Path, str]:
    """The checkpoint used when the user names none, and the notice to print with it."""
    if TEACHER_CHECKPOINT.is_file():
        return TEACHER_CHECKPOINT, TEACHER_NOTICE
    return DEMO_CHECKPOINT, DEMO_NOTICE


def make_demo_checkpoint(path: Path = DEMO_CHECKPOINT) -> Path:
    """Rebuild the bundled demo file (deterministic: seed 42)."""
    import torch

    from pqk.models.dust3r import build_model, save_model

    torch.manual_seed(42)
    model = build_model(**DEMO_KWARGS)
    return save_model(model, path, history=[{"step": "random_init", "seed": 42, "note": "demo weights, untrained"}])
