"""What each built-in method costs, for `pqk budget` (each method's `cost`). TEMPORARY home:
each function moves into its method's package once the packages are split.

Upper bounds on purpose: every epoch is counted (early stopping can only save), QAT is counted
although `qat: auto` runs it only when PTQ misses the gate.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from pqk.errors import ConfigError
from pqk.measure.probe import CostModel, Costing, Item


def _run_names(step, cfg: dict, runs_cfg: dict, where: str) -> list[str]:
    """The distillation runs a step trains: its `run`, a selection's members (K-4), or the first."""
    select = cfg.get("select") or {}
    wanted = step.options.get("run", step.options.get("runs"))
    if wanted is None:  # as the runner: the config's first run
        return list(runs_cfg)[:1] or ["default"]
    names = []
    for name in (wanted if isinstance(wanted, list) else str(wanted).split(",")):
        name = str(name).strip()
        if name in select:
            names += [str(m) for m in select[name]]
        elif name in runs_cfg or not runs_cfg:
            names.append(name)
        else:
            accepted = ", ".join([*runs_cfg, *select])
            raise ConfigError(f"{where}: distill run {name!r} is not in {step.config_name}; accepted: {accepted}")
    return names


def distill_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.methods.distill import derive_student

    cfg = costing.config(step)
    shared = cfg.get("train") or {}
    runs_cfg = cfg.get("runs") or {}
    if isinstance(runs_cfg, list):  # a list of {name: K-1, ...} is read as well as a mapping
        runs_cfg = {str(r.get("name") or r.get("id") or f"run{k + 1}"): r for k, r in enumerate(runs_cfg) if isinstance(r, dict)}
    names = _run_names(step, cfg, runs_cfg, where)
    items: list[Item] = []
    student: CostModel | None = None
    for name in dict.fromkeys(names):
        run = runs_cfg.get(name) or {}
        ratio = float(step.options.get("ratio", run.get("ratio", cfg.get("ratio", 0.3))))
        train = {**shared, **(run.get("train") or {})}
        spec = costing.train_spec(train, f"{where}: {step.config_name} run {name}")
        if student is None or ratio != student.ratio:
            module = derive_student(model.module, ratio) if ratio > 0 else copy.deepcopy(model.module)
            student = CostModel(f"student r={ratio:g} of {model.name}" if ratio > 0 else model.name, module, ratio)
        target = None if run.get("task_only") else costing.teacher
        items += costing.train(f"distill {name}", f"distill {name}", student, spec, target)
    if len(names) > 1:  # a selection (K-4) measures every run to pick the best
        for name in names[1:]:
            items.append(costing.evaluation(student, f"evaluation of run {name} (selection)"))
    return items, student


def prune_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    cfg = costing.config(step)
    rhos = step.options.get("rho", cfg.get("rho", 0.3))
    rhos = [float(r) for r in (rhos if isinstance(rhos, list) else [rhos])]
    allocation = str(step.options.get("allocation", cfg.get("allocation", "sensitivity")))
    calib = cfg.get("calibration") or {}
    cw, ch = int(calib.get("width", 512)), int(calib.get("height", 384))
    n_pairs = int(calib.get("n_pairs", 8))
    items: list[Item] = []
    if allocation == "sensitivity":
        ratios = cfg.get("sensitivity_ratios") or [0.25, 0.5, 0.75]
        trials = 1 + _prunable_unit_count(model.module) * len(ratios)
        items.append(costing.forwards("prune", f"sensitivity: {trials} trials x {n_pairs} pairs at {cw}x{ch}",
                                      model, trials * n_pairs, cw, ch))
    pruned = model
    finetune = cfg.get("finetune")
    if not finetune:
        costing.note(f"{where}: {step.config_name} has no 'finetune' settings: no fine-tuning costed")
    for rho in rhos:
        pruned = CostModel(f"pruned rho={rho:g} of {model.name}", pruned_copy(model.module, rho, costing))
        if finetune:
            spec = costing.train_spec(finetune, f"{where}: {step.config_name} finetune")
            items += costing.train("prune", f"fine-tune rho {rho:g}", pruned, spec, None)
    if len(rhos) > 1:
        costing.note(f"{where}: prune lists rho {rhos}: the next steps continue from rho {rhos[-1]:g}")
    return items, pruned


def quantize_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.methods.quantize import DEFAULT_QAT

    cfg = costing.config(step)
    calib = cfg.get("calibration") or {}
    size = int(step.options.get("calibration_size", step.options.get("calib", calib.get("size", 512))))
    size = max(1, round(size * costing.budget)) if costing.budget != 1.0 else size
    sh = costing.shape
    items = [costing.forwards("quantize", f"PTQ calibration: {size} pairs at {sh['width']}x{sh['height']}",
                              model, size, sh["width"], sh["height"])]
    mode = str(step.options.get("qat", "auto"))
    if mode != "never":
        qat = {**DEFAULT_QAT, **(cfg.get("qat") or {})}
        spec = costing.train_spec(qat.get("train") or DEFAULT_QAT["train"], f"{where}: {step.config_name} qat.train")
        target = CostModel(f"{model.name} (FP32 target)", model.module) if float(qat.get("teacher_weight", 0.5)) > 0 else None
        for item in costing.train("quantize", "QAT", model, spec, target):
            if mode == "auto":
                item.conditional = "QAT runs only when PTQ misses the gate (qat: auto)"
            items.append(item)
    return items, model


def joint_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    """One distillation run's training (masks and fake quantization cost nothing extra per
    step) + calibration twice (at fake-quant onset and at export) + the FP32 reference's
    evaluation; the model that leaves is the student pruned by rho."""
    from pqk.pipeline.plan import PlanStep, resolve_path

    cfg = costing.config(step)
    anchor = (step.config or Path(step.config_name)).resolve().parent

    def sub(method: str, key: str, default: str, options: dict) -> PlanStep:
        name = str((cfg.get(key) or {}).get("config", default))
        return PlanStep(method, resolve_path(name, anchor), options, name)

    run = step.options.get("run", (cfg.get("distill") or {}).get("run", "K-1"))
    items, student = distill_cost(costing, sub("distill", "distill", "distill.yaml", {"run": run}), model, where)
    calib, _ = quantize_cost(costing, sub("quantize", "quantize", "quant.yaml", {"qat": "never"}), student, where)
    items = [replace(it, step="joint") for it in items + calib + calib]
    rho = float(step.options.get("rho", (cfg.get("prune") or {}).get("rho", 0.1)))
    pruned = CostModel(f"joint rho={rho:g} of {student.name}", pruned_copy(student.module, rho, costing))
    items.append(costing.evaluation(pruned, "evaluation of the joint model's FP32 reference"))
    return items, pruned


def _prunable_unit_count(model) -> int:
    try:
        from pqk.methods.prune import prunable_units

        return len(prunable_units(model, True, True))
    except Exception:  # a model the pruner does not know: one head and one FFN unit per block
        return 2 * sum(len(getattr(model, s, [])) for s in ("enc_blocks", "dec_blocks", "dec_blocks2"))


def pruned_copy(model, rho: float, costing: Costing):
    """The model with `rho` of its prunable parameters removed: L1 importance, uniform
    allocation (the sensitivity allocation removes the same share, so the FLOPs are close)."""
    try:
        from pqk.methods.prune import PruneSpec, allocate_uniform, apply_pruning, importance_scores, prunable_units

        spec = PruneSpec(rho=rho, allocation="uniform")
        # Torch-Pruning traces the graph through autograd: a frozen teacher has to thaw first.
        model = copy.deepcopy(model).requires_grad_(True)
        units = prunable_units(model, True, True)
        counts = allocate_uniform(units, rho, spec)
        return apply_pruning(model, units, importance_scores(model, units, "l1"), counts).eval().requires_grad_(False)
    except Exception as exc:  # never fail an estimate on this: the unpruned model is an upper bound
        costing.note(f"could not build a pruned copy ({type(exc).__name__}): pruned steps costed on the unpruned model")
        return model
