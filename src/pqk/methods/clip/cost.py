"""What the CLIP family's methods cost, for `pqk budget`: the same probe as DUSt3R's (one
measured optimizer step of the student at its resolution and batch, one measured batch-1
forward), multiplied by the run's scaled schedule.

A training run is billed as: its student steps (the probe's step: both towers forward and
backward), the ALSN-only epochs CMAPKD adds after them (billed as student steps: an upper
bound, the student runs without gradients there), the validation passes after every epoch
(n_val images and their captions, batch-1 forwards: an upper bound, validation is batched), and
once per plan the frozen teacher's targets over the training set (`teacher_cache`: every run
shares them). CMAPKD's pyramids, FitNet's regressor and the other objectives' small modules are
not in the probe; they are noted, not guessed (CMAPKD measured ~1.6x a plain step here).
"""

from __future__ import annotations

from typing import Any

from pqk.measure.probe import CostModel, Costing, Item


def _student(costing: Costing, student_cfg: dict, label: str) -> CostModel:
    import torch

    from pqk.models.clip import CLIP

    torch.manual_seed(0)  # the probe only needs shapes; a fixed init keeps the estimate repeatable
    return CostModel(label, CLIP(**student_cfg))


def training_items(costing: Costing, step: str, label: str, student: CostModel, teacher: CostModel, train: Any,
                   extra_epochs: int = 0, teacher_targets: bool = True) -> list[Item]:
    """Items of one CLIP training run of `student` on `train` (a ClipTrainSpec, already scaled)."""
    from pqk.models.clip.family import image_resolution

    res = image_resolution(student.module)
    per_epoch = max(1, train.n_train // train.batch_size)
    steps = per_epoch * (train.epochs + extra_epochs)
    flops, secs = costing.probe.train_step(student.name, student.module, res, res, train.batch_size)
    vf, vs = costing.probe.forward(student.name, student.module, res, res)
    passes = train.n_val * (train.epochs + extra_epochs)
    what = "generated scenes" if not train.data else train.data
    items = [Item(step, f"{label}: {train.epochs} epochs" + (f" + {extra_epochs} ALSN-only" if extra_epochs else "")
                  + f" x {per_epoch} steps, batch {train.batch_size} at {res}x{res} ({what})", steps * flops, steps * secs),
             Item(step, f"{label} validation: {train.epochs + extra_epochs} epochs x {train.n_val} images", passes * vf,
                  passes * vs)]
    key = ("clip-teacher-targets", teacher.name, train.n_train, train.data, res)
    if teacher_targets and key not in costing.once:
        costing.once.add(key)
        tres = image_resolution(teacher.module)
        tf, ts = costing.probe.forward(teacher.name, teacher.module, tres, tres)
        items.append(Item(step, f"teacher targets: {train.n_train} images and their captions, once per plan",
                          train.n_train * tf, train.n_train * ts))
    return items


def cmapkd_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.methods.cmapkd.alsn import progressive_schedule, refinement_epochs

    run = step.impl.load_spec(step.config, step.options)
    train = run.spec.train.scaled(costing.budget)
    extra = refinement_epochs(progressive_schedule(train.epochs, refine_alsn=run.spec.alsn == "adaptive")) \
        if run.objective == "cmapkd" and run.spec.schedule == "progressive" else 0
    student = _student(costing, run.student, f"CLIP student ({run.name})")
    if run.objective == "cmapkd":
        costing.note(f"cmapkd: the {run.spec.channels}-channel pyramids and CMAPKD's losses are not in the probe's "
                     "step (measured ~1.6x a plain step on 2 CPU cores at 32 channels)")
    targets = run.objective != "scratch"  # Scratch never reads the teacher
    return training_items(costing, f"cmapkd {run.name}", run.name, student, costing.teacher, train, extra,
                          targets), student


def distill_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    spec = step.impl.load_spec(step.config, step.options)
    train = spec.train.scaled(costing.budget)
    student = _student(costing, spec.student, f"CLIP student ({spec.run})")
    return training_items(costing, f"distill {spec.run}", spec.run, student, model, train,
                          teacher_targets=train.kd_weight > 0), student


def quantize_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.models.clip.family import image_resolution

    spec = step.impl.load_spec(step.config, step.options)
    size = max(16, round(spec.calibration_size * min(1.0, costing.budget * 4)))  # as ClipQuantize.run
    res = image_resolution(model.module)
    costing.note("quantize (CLIP): ONNX export and ONNX Runtime's calibration are billed as FP32 forwards")
    return [costing.forwards("quantize", f"PTQ calibration: {size} images and captions", model, size, res, res)], model
