"""K-only (protocol stage P1): distil a DUSt3R teacher into a smaller student.

The student and its weight inheritance are in `student`, the loss in `loss`, the run settings
and the P1 grid in `spec`, the training call and the plan runner's K step in `step`; this
package re-exports what callers import from `pqk.methods.distill`.

Training is `pqk.train.trainer.fit` (AdamW, warm-up + cosine, clipping, validation every
epoch, early stopping, best/last checkpoints, exact resume, DDP). A pair's teacher outputs
are recomputed each step (no cache): the teacher is frozen and small next to the student's
backward pass, and a cache would not survive random pair sampling.
"""

from pqk.methods.distill.loss import CONF_ALPHA, DistillLoss, channel_kl, feature_loss, output_maps
from pqk.methods.distill.spec import BEST_STUDENT_FILE, DistillGrid, DistillSpec, load_distill_config
from pqk.methods.distill.step import STUDENT_FILE, distill, distill_step
from pqk.methods.distill.student import (
    DPT_MIN_DEC_DEPTH, derive_student, evenly_spaced, kept_depth, kept_heads, kept_hidden,
)
# Private helpers other modules import from here (joint PQK scores and rank with them).
from pqk.methods.distill.step import _is_main  # noqa: F401 (re-exported)
from pqk.methods.distill.student import _cross_attn_scores, _mlp_scores, _self_attn_scores  # noqa: F401 (re-exported)

__all__ = [
    "BEST_STUDENT_FILE", "CONF_ALPHA", "DPT_MIN_DEC_DEPTH", "DistillGrid", "DistillLoss", "DistillSpec", "STUDENT_FILE",
    "channel_kl", "derive_student", "distill", "distill_step", "evenly_spaced", "feature_loss", "kept_depth",
    "kept_heads", "kept_hidden", "load_distill_config", "output_maps",
]
