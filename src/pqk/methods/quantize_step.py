"""Q as a step of a plan (protocol stage P2; P3 when the model is a student): PTQ to the QDQ
artifact, the INT8 runtimes that run it, and the side-by-side latency that the Q gate reads.

Runtimes of one quantized model (the QDQ file `ptq_int8.onnx`):
- "onnxruntime": ONNX Runtime runs the file itself (the portable artifact's own quality);
- "onednn": PyTorch runs the file's int8 weights and activation scales on oneDNN's INT8 GEMM
  with bf16 attention (`pqk.backends.torch_int8`);
- "openvino": OpenVINO runs the file itself, its float parts in bf16 (`pqk.backends.openvino_runtime`;
  where the `openvino` package is importable).
The step is measured on the fastest of them (`fastest_runtime`).

Latency for the gate comes from `interleaved_latency` in one process (eager FP32 and bf16,
ONNX Runtime FP32 and INT8, oneDNN INT8, OpenVINO INT8 on the same pair, round-robin), because the shared
machine's speed drifts between separately timed runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from pqk.errors import ConfigError
from pqk.measure.latency import interleaved_latency
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.methods.base import StepContext, StepResult
from pqk.tasks.dust3r.workload import Workload

RUNTIMES = ("onnxruntime", "onednn", "openvino")
DEFAULT_RUNTIMES = "onednn,onnxruntime,openvino"  # a plan step's / the CLI's default: measure all, deploy the fastest
QAT_MODES = ("auto", "always", "never")
MIN_CALIBRATION_PAIRS = 16


@dataclass
class QuantRun:
    """How a quantization step runs, beyond the spec (the CLI's options)."""

    runtimes: tuple[str, ...] = RUNTIMES  # the first is the step's primary runtime
    qat: str = "auto"
    bf16_attention: bool = True
    latency_rounds: int = 8
    fixed_calibration: bool = False  # the calibration size is the experiment's subject (ABL-2): no budget scaling

    def __post_init__(self) -> None:
        self.runtimes = tuple(self.runtimes)
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad or not self.runtimes:
            raise ConfigError(f"unknown runtime {bad[0] if bad else '(none)'!r}; expected one or more of {', '.join(RUNTIMES)}")
        if self.qat not in QAT_MODES:
            raise ConfigError(f"unknown --qat mode {self.qat!r}; expected one of {', '.join(QAT_MODES)}")


def workload_shape(workload: Workload) -> tuple[int, int]:
    """(height, width) of the workload's generated views: the INT8 graph's static input shape."""
    data = workload.data or {}
    if "width" in data and "height" in data:
        return int(data["height"]), int(data["width"])
    res = int(workload.resolution)
    return res * 3 // 4, res  # 4:3 landscape, the generated scenes' aspect


def other_shapes(workload: Workload, height: int, width: int) -> list:
    """The workload's pair shapes other than the main (height, width) one: each gets its own
    static file of the quantized model, so every pair (the real photographs included) is
    measured on the deployed runtime."""
    from pqk.tasks.dust3r.workload import pair_shapes

    main = ((height, width), (height, width))
    return [s for s in pair_shapes(workload) if s != main]


def budget_calibration(spec: QuantSpec, budget: float) -> tuple[QuantSpec, list[str]]:
    """The spec with its calibration size scaled down by a budget < 1 (never below 16 pairs)."""
    if budget >= 1.0:
        return spec, []
    size = max(MIN_CALIBRATION_PAIRS, round(spec.calibration.size * budget))
    if size >= spec.calibration.size:
        return spec, []
    scaled = replace(spec, calibration=replace(spec.calibration, size=size))
    return scaled, [f"calibration {size} of {spec.calibration.size} pairs (budget {budget:g})"]


def timing_pair(height: int, width: int) -> tuple[dict, dict]:
    from pqk.data.scenes import generate_scene
    from pqk.tasks.dust3r.measure import scene_view

    seed = 3_999_999  # a calibration-range scene: never an evaluation pair
    scene = generate_scene(seed, n_views=2, width=width, height=height)
    return scene_view(scene, 0), scene_view(scene, 1)


def side_by_side_latency(
    model: torch.nn.Module, onnx_fp32: Path | None, onnx_int8: Path | None, int8_model: torch.nn.Module | None,
    height: int, width: int, rounds: int = 8, openvino: bool = True, extra: dict[str, Callable[[], object]] | None = None,
) -> dict:
    """Interleaved p50/p95 of every runtime available for this model on one pair at the
    workload's shape, with speed-ups over PyTorch eager FP32. `openvino`: OpenVINO runs the
    INT8 file too (when installed); `extra` adds named calls (a benchmark's peer rows)."""
    from pqk.backends.onnx_export import OrtPairRunner
    from pqk.backends.openvino_runtime import OvPairRunner, openvino_available

    view1, view2 = timing_pair(height, width)
    model = model.eval()
    calls: dict[str, Callable[[], object]] = {}

    def eager():
        with torch.inference_mode():
            model(view1, view2)

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(view1, view2)

    calls["torch eager fp32"] = eager
    calls["torch eager bf16 (autocast)"] = bf16
    threads = torch.get_num_threads()  # every runtime gets the same threads
    if onnx_fp32 is not None:
        ort_fp32 = OrtPairRunner(onnx_fp32, threads=threads)
        calls["onnxruntime fp32"] = lambda: ort_fp32(view1, view2)
    if onnx_int8 is not None:
        ort_int8 = OrtPairRunner(onnx_int8, threads=threads)
        calls["onnxruntime int8 (QDQ)"] = lambda: ort_int8(view1, view2)
    if int8_model is not None:
        def onednn():
            with torch.inference_mode():
                int8_model(view1, view2)

        calls["torch oneDNN int8 + bf16 attention"] = onednn
    if onnx_int8 is not None and openvino and openvino_available():
        ov_int8 = OvPairRunner(onnx_int8, threads=threads)
        calls[RUNTIME_LATENCY_KEY["openvino"]] = lambda: ov_int8(view1, view2)
    calls.update(extra or {})
    from pqk.measure.machine import Contention, machine_info

    with Contention() as contention:
        result = interleaved_latency(calls, rounds=rounds, reference="torch eager fp32")
    result.update(threads=torch.get_num_threads(), shape=[height, width], contention=contention.to_json(),
                  machine=machine_info())
    return result


# Each runtime's name in the side-by-side table, also the record's runtime label.
RUNTIME_LATENCY_KEY = {"onnxruntime": "onnxruntime int8 (QDQ)", "onednn": "torch oneDNN int8 + bf16 attention",
                       "openvino": "openvino int8 (QDQ)"}  # its float parts' precision: the eval JSON's runtime
RUNTIME_LABEL = RUNTIME_LATENCY_KEY


@dataclass
class PtqOutcome:
    float_model: torch.nn.Module
    onnx_fp32: Path
    onnx_int8: Path
    int8_model: torch.nn.Module | None  # the oneDNN runtime of onnx_int8 (None: not available)
    record_fields: dict
    details: dict
    notes: list[str]
    device_hours: float

    def runtimes(self) -> list[str]:
        from pqk.backends.openvino_runtime import openvino_available

        return ["onnxruntime"] + (["onednn"] if self.int8_model is not None else []) \
            + (["openvino"] if openvino_available() else [])

    def step_result(self, runtime: str) -> StepResult:
        """What `evaluate` needs to measure this quantized model on one runtime."""
        notes = [*self.notes, f"runtime: {RUNTIME_LABEL[runtime]}"]
        common = dict(artifact=self.onnx_int8, fields=dict(self.record_fields), device_hours=self.device_hours,
                      count_model=self.float_model, runtime=RUNTIME_LABEL[runtime], notes=notes,
                      details={**self.details, "runtime": runtime})
        if runtime == "onednn":
            if self.int8_model is None:
                raise ConfigError("runtime onednn is not available in this PyTorch build")
            return StepResult(model=self.int8_model, backend="torch", **common)
        if runtime == "openvino" and runtime not in self.runtimes():
            raise ConfigError("runtime openvino is not available: pip install openvino")
        return StepResult(model=None, backend=runtime, onnx_path=self.onnx_int8, **common)


def ptq(
    model: torch.nn.Module, ctx: StepContext, spec: QuantSpec, run: QuantRun | None = None,
    float_groups: list[str] | None = None,
) -> PtqOutcome:
    """PTQ (Q-1) of `model` at the workload's shape into `ctx.out_dir/ptq_int8.onnx`, its INT8
    runtimes and the side-by-side latency of every runtime. `float_groups` (layer groups of
    `auto_keep`) stay float; that variant is written to `ptq_int8_autokeep.onnx`."""
    run = run or QuantRun()
    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = workload_shape(ctx.workload)
    spec, notes = (spec, []) if run.fixed_calibration else budget_calibration(spec, ctx.budget)
    ctx.log(f"calibration: {spec.calibration.size} pairs at {width}x{height} ({spec.calibration.method})")
    calib = calibration_pairs(spec, width, height)
    ctx.log("PTQ: export, calibrate, quantize")
    float_modules = []
    if float_groups:
        from pqk.methods.auto_keep import float_modules_of

        float_modules = float_modules_of(model, float_groups)
    name = "ptq_int8_autokeep.onnx" if float_groups else "ptq_int8.onnx"
    result = quantize(model, spec, calib, out_dir, height, width, float_modules=float_modules, name=name,
                      other_shapes=other_shapes(ctx.workload, height, width))
    if float_groups:
        result["record_fields"]["keep_list"] += "+float:" + ",".join(float_groups)
    summary = result["summary"]
    notes += list(summary.get("notes", []))
    int8_model = None
    details: dict = {"ptq": summary, "onnx_fp32": str(result["onnx_fp32"])}
    if "onednn" in run.runtimes:
        from pqk.backends.torch_int8 import int8_model_from_qdq, onednn_int8_available

        if onednn_int8_available():
            int8_model, details["onednn"] = int8_model_from_qdq(model, result["onnx_int8"], bf16_attention=run.bf16_attention)
        else:
            notes.append("no oneDNN INT8 kernels in this PyTorch: runtime onednn skipped")
    from pqk.backends.tensorrt_engine import ENGINE_NAME, build_engine

    engine, engine_note = build_engine(result["onnx_int8"], out_dir / ENGINE_NAME)
    notes.append(engine_note)
    details["tensorrt_engine"] = None if engine is None else str(engine)
    ctx.log("latency side by side")
    details["latency_side_by_side"] = side_by_side_latency(
        model, result["onnx_fp32"], result["onnx_int8"], int8_model, height, width, run.latency_rounds,
        openvino="openvino" in run.runtimes,
    )
    return PtqOutcome(model, Path(result["onnx_fp32"]), Path(result["onnx_int8"]), int8_model,
                      dict(result["record_fields"]), details, notes, (time.perf_counter() - start) / 3600.0)


def heldout_examples(ctx: StepContext, n_pairs: int = 8) -> list[dict]:
    """Neighbouring pairs of two validation-range scenes at the workload's shape: the held-out
    set that Q's own decisions (auto-keep, QAT auto) are taken on, never the workload's pairs."""
    from pqk.data.pair_batches import pair_example, window_pairs
    from pqk.data.scenes import generate_scene
    from pqk.train.teacher import VAL_SEED_BASE

    height, width = workload_shape(ctx.workload)
    scenes = [generate_scene(VAL_SEED_BASE + 500 + k, n_views=4, width=width, height=height) for k in range(2)]
    pairs = [(s, i, j) for s in range(len(scenes)) for i, j in window_pairs(4, 1)][:n_pairs]
    return [pair_example(scenes[s], i, j) for s, i, j in pairs]


def auto_keep_groups(float_model: torch.nn.Module, outcome: PtqOutcome, ctx: StepContext, max_drop: float = 0.01,
                     n_pairs: int = 8) -> dict:
    """Probe each layer group of the PTQ model and choose the groups to keep in float
    (`pqk.methods.auto_keep`), on held-out generated pairs at the workload's shape."""
    from pqk.methods.auto_keep import choose_float_groups, probe_groups

    height, width = workload_shape(ctx.workload)
    probes = probe_groups(float_model, outcome.onnx_int8, heldout_examples(ctx, n_pairs), timing_pair(height, width),
                          log=ctx.log)
    chosen, reasons = choose_float_groups(probes, max_drop)
    return {"probes": probes, "float_groups": chosen, "reasons": reasons, "max_drop": max_drop}


def qat_after_ptq(
    ptq_outcome: PtqOutcome, ctx: StepContext, spec: QuantSpec, run: QuantRun | None = None,
    teacher: torch.nn.Module | None = None, show_progress: bool = True,
) -> PtqOutcome:
    """QAT (Q-2) from a PTQ outcome: fake-quant training initialised from its scales, then the
    QAT model's own QDQ file (`qat_int8.onnx`) and its INT8 runtimes. Latency is the PTQ
    outcome's side-by-side figure: the two files have the same graph, only the numbers differ."""
    from pqk.methods.qat import QatSpec, export_qat, train_qat

    run = run or QuantRun()
    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    height, width = workload_shape(ctx.workload)
    qat_spec = QatSpec.from_dict(dict(spec.qat), ctx.budget)
    spec = spec if run.fixed_calibration else budget_calibration(spec, ctx.budget)[0]
    ctx.log(f"QAT: {qat_spec.train.epochs} epochs x {qat_spec.train.steps_per_epoch} steps, fake quantization "
            f"from {qat_spec.fake_quant_from:.0%} of the run")
    qat_model, fit = train_qat(ptq_outcome.float_model, ptq_outcome.onnx_int8, qat_spec, out_dir / "qat",
                               teacher=teacher, resume=ctx.resume, log=ctx.log, show_progress=show_progress)
    ctx.log("QAT: export to QDQ with the trained scales")
    exported = export_qat(qat_model, spec, calibration_pairs(spec, width, height), out_dir, height, width,
                          other_shapes=other_shapes(ctx.workload, height, width))
    int8_model = None
    details = {"ptq": exported["summary"], "onnx_fp32": str(exported["onnx_fp32"]),
               "qat": {"epochs": len(fit.history), "steps": fit.steps_done, "wall_time_s": fit.wall_time_s,
                       "fake_quant_from": qat_spec.fake_quant_from, "teacher_weight": qat_spec.teacher_weight,
                       "history": fit.history, "checkpoint": str(exported["checkpoint"])},
               "latency_side_by_side": ptq_outcome.details.get("latency_side_by_side")}
    if "onednn" in run.runtimes and ptq_outcome.int8_model is not None:
        from pqk.backends.torch_int8 import int8_model_from_qdq

        int8_model, details["onednn"] = int8_model_from_qdq(exported["float_model"], exported["onnx_int8"],
                                                            bf16_attention=run.bf16_attention)
    notes = [*ptq_outcome.notes, f"QAT {fit.steps_done} steps after PTQ"]
    hours = ptq_outcome.device_hours + (time.perf_counter() - start) / 3600.0
    return PtqOutcome(exported["float_model"], Path(exported["onnx_fp32"]), Path(exported["onnx_int8"]), int8_model,
                      dict(ptq_outcome.record_fields), details, notes, hours)


def heldout_delta1_drop(float_model: torch.nn.Module, int8_model: torch.nn.Module, ctx: StepContext, n_pairs: int = 8) -> dict:
    """δ1 of the FP32 and INT8 models on held-out generated pairs at the workload's shape (never
    the workload's pairs): what `--qat auto` decides on inside a plan, before `evaluate` runs."""
    from pqk.measure.quality import quality_drop
    from pqk.train.teacher import validate

    examples = heldout_examples(ctx, n_pairs)
    # Batch 1: the ONNX Runtime model has the workload's static shape.
    ref = float(validate(float_model.eval(), examples, batch_size=1)["delta1"])
    new = float(validate(int8_model.eval(), examples, batch_size=1)["delta1"])
    return {"delta1_fp32": ref, "delta1_int8": new, "drop": quality_drop(new, ref, "delta1"), "pairs": len(examples)}


# A runtime must beat the preferred one (OpenVINO, else ONNX Runtime: both run the deployed QDQ
# file itself) by this much to be chosen: which runtime's quality a record reports must not flip
# with timing noise (measured: oneDNN 240 ms vs ORT 250 ms on one ablation changed its δ1 from
# 0.834 to 0.890; with a 10 % margin the plan test's tiny K→Q, ORT 1.38-1.43 ms vs OpenVINO
# 1.46-1.49 ms, still flipped between a run and its rerun on a quiet machine).
TIE_MARGIN = 0.30


def fastest_runtime(outcome: PtqOutcome, wanted: tuple[str, ...]) -> str:
    """The asked-for runtime the step deploys: OpenVINO where it is asked for and installed (the
    fastest runtime of the QDQ file on every model timed here: full-size 1.54x ONNX Runtime,
    student 1.45x, embedded and tiny teachers 1.3-2x), else ONNX Runtime, each unless another
    asked-for runtime is more than `TIE_MARGIN` faster in the side-by-side timing (ignored when
    that timing was contended). A fixed preference, not the raw fastest: which runtime's quality
    a record reports must not flip with the timing noise of a near-tie or of a loaded machine, so
    a rerun of a plan gives the same quality figures."""
    available = [r for r in wanted if r in outcome.runtimes()] or outcome.runtimes()
    side = outcome.details.get("latency_side_by_side") or {}
    preferred = next((r for r in ("openvino", "onnxruntime") if r in available), available[0])
    if (side.get("contention") or {}).get("contended"):
        # Timings taken while other processes held the cores say nothing about the runtimes.
        return preferred
    variants = side.get("variants", {})

    def p50(runtime: str) -> float:
        return variants.get(RUNTIME_LATENCY_KEY[runtime], {}).get("p50_ms", float("inf"))

    best = min(available, key=p50)
    return best if p50(best) < p50(preferred) * (1.0 - TIE_MARGIN) else preferred


class _OrtAsModule(torch.nn.Module):
    """An ONNX Runtime pair runner behind the module interface `validate` calls."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, view1: dict, view2: dict):
        return self.runner(view1, view2)
