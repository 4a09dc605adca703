"""Joint PQK: prune, distil and quantize in one training run, then export the INT8 model.

The sequential path (P→K→Q) prunes the teacher, fine-tunes, derives and distils a student,
then calibrates and maybe fine-tunes again with fake quantization: three trainings, each
blind to what the next will do. Here one run of the shared trainer does all three:

- **K.** The student is derived from the teacher exactly as in K (`derive_student`, the
  distillation run's `ratio`) and trained with that run's loss (α·L_task + β·KL_T + γ·F)
  for that run's length.
- **P.** Every attention module's heads and every FFN's hidden channels carry a mask on the
  input of their output layer (`proj` / `fc2`): a masked head's or channel's contribution
  is exactly zero, as after removal. The number masked per unit grows with a cubic schedule
  (Zhu & Gupta, 2017) from 0 to the uniform allocation of ρ (`allocate_uniform`) over the
  first `prune_until` of the run, in `mask_updates` steps; each update masks the smallest
  remaining heads/channels by weight magnitude (the score `derive_student` uses). Masks only
  grow, and after `prune_until` they are settled; the rest of the run trains the survivors.
  Sensitivity allocation is not offered: it would be measured on a freshly derived student,
  whose quality says nothing yet about which layers matter.
- **Q.** Every Linear computes on fake-quantized input (uint8, per tensor) and weight (int8,
  per output channel): `FakeQuantLinear`, the QAT module. At `fake_quant_from` of the run
  (the protocol's "last third") the activation ranges are calibrated once, min/max over
  the quantization spec's calibration pairs at the workload's shape (the rule PTQ applies),
  then held fixed while training adapts the weights to the grid.

After the last step the masked heads/channels are removed through Torch-Pruning's dependency
groups (`apply_pruning`: an ordinary, smaller DUSt3R) and the model is exported to QDQ ONNX
with the trained activation ranges imposed (`export_with_ranges`), so the INT8 file computes
what the run trained. Masks and ranges are buffers in the trainer's checkpoints: a killed run
resumes exactly.

The package: settings in `spec`, masks in `masks`, fake quantization in `fake_quant`, the
training run in `train`, the plan step in `step`; what callers import from
`pqk.methods.joint` is re-exported here.
"""

from pqk.methods.joint.fake_quant import calibrate_fake_quant, fake_quant_on, install_fake_quant, uint8_range_params
from pqk.methods.joint.masks import cubic_share, grow_masks, install_masks, masked_indices
from pqk.methods.joint.spec import JointSpec, load_joint_spec, referenced_configs
from pqk.methods.joint.step import JOINT_FILE, joint_step
from pqk.methods.joint.train import JointLoss, JointOutcome, prepare_joint, settle, train_joint
# Public names outside __all__ (as before the split): importable, not star-exported.
from pqk.methods.joint.fake_quant import calibration_views  # noqa: F401 (re-exported)
from pqk.methods.joint.masks import MASK, magnitude_scores, output_layer  # noqa: F401 (re-exported)

__all__ = [
    "JOINT_FILE", "JointLoss", "JointOutcome", "JointSpec", "calibrate_fake_quant", "cubic_share", "grow_masks",
    "fake_quant_on", "install_fake_quant", "install_masks", "joint_step", "load_joint_spec", "masked_indices", "prepare_joint",
    "referenced_configs", "settle", "train_joint", "uint8_range_params",
]
