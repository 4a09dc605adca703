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
