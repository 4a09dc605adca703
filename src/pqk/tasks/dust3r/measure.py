"""How DUSt3R is measured on its frozen workload (the DUSt3R adapter's `measure`).

Quality: depth of view 1 of each of the workload's pairs (z of `pred1['pts3d']`, in its own
camera), aligned to ground truth by one scale per view, the median of GT/pred over valid
pixels (the per-image median scaling of monocular and multi-view depth benchmarks; DUSt3R's
pointmaps have no metric scale); AbsRel, RMSE, δ<1.25 pooled over all pixels. Chamfer: the
scene-level scenes are reconstructed (all pairs of the workload's graph + global alignment),
the world pointmaps are brought into the GT frame by the Sim(3) fitted (Umeyama) on pixel
correspondences, then accuracy/completeness/Chamfer over GT-valid pixels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pqk.data.images import normalize_array
from pqk.errors import InputError
from pqk.measure.latency import time_calls
from pqk.tasks.base import Measurement
from pqk.tasks.dust3r.metrics import aggregate_depth_metrics, chamfer, depth_metrics
from pqk.tasks.dust3r.workload import Workload

BACKENDS = ("torch", "onnxruntime", "openvino")


def scene_view(scene, i: int, device: str = "cpu") -> dict:
    view = scene.views[i]
    h, w = view.img.shape[:2]
    return {
        "img": normalize_array(view.img)[None].to(device),
        "true_shape": torch.tensor([[h, w]], dtype=torch.int32, device=device),
        "idx": [i],
        "instance": [str(i)],
    }


# --- runners: one callable (view1, view2) -> (res1, res2) per backend ----------------------


class TorchRunner:
    def __init__(self, model: torch.nn.Module, device: str, runtime: str = "torch eager fp32"):
        self.model = model.to(device).eval()
        self.device = device
        self.description = f"{runtime} ({device}, {torch.get_num_threads()} threads)"

    def __call__(self, view1: dict, view2: dict):
        with torch.inference_mode():
            return self.model(view1, view2)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class OrtRunner:
    """An ONNX runtime (ONNX Runtime, or OpenVINO: `engine`) over static-shape exports:
    one exported file per pair of view shapes, so the quality measured is the deployed artifact's."""

    def __init__(self, model: torch.nn.Module | None, onnx_path: Path | None, threads: int | None,
                 engine: str = "onnxruntime"):
        from pqk.backends.onnx_export import OrtPairRunner

        if engine == "openvino":
            from pqk.backends.openvino_runtime import OvPairRunner

            self._cls = OvPairRunner  # f32 for the exported FP32 model, bf16 around a QDQ file's INT8 layers
        else:
            self._cls = OrtPairRunner
        self.model = model
        self.threads = threads
        self.tmp = tempfile.TemporaryDirectory(prefix="pqk-ort-")
        self.sessions: dict[tuple, object] = {}
        self.fixed = None
        if onnx_path is not None:
            from pqk.backends.onnx_export import ShapeRoutedRunner

            self.fixed = ShapeRoutedRunner(onnx_path, lambda path: self._cls(path, threads=threads))
        self.exported: list[str] = []
        kind = "fp32" if onnx_path is None else f"file {Path(onnx_path).name}"
        if self.fixed is not None and self.fixed.files:
            kind += f" (+{len(self.fixed.files)} static-shape variant{'s' if len(self.fixed.files) > 1 else ''})"
        if engine == "openvino":
            kind += f", {self.fixed.primary.precision}" if self.fixed is not None else ", f32"
        device = "CPU" if engine == "openvino" else "CPUExecutionProvider"
        self.description = f"{engine} {kind} ({device}, {threads or 'default'} threads)"

    def supports(self, view1: dict, view2: dict) -> bool:
        return self.fixed is None or self.fixed.supports(view1, view2)

    def __call__(self, view1: dict, view2: dict):
        if self.fixed is not None:
            return self.fixed(view1, view2)
        key = tuple(view1["img"].shape[-2:]) + tuple(view2["img"].shape[-2:])
        if key not in self.sessions:
            from pqk.backends.onnx_export import export_onnx

            path = Path(self.tmp.name) / f"model_{'x'.join(map(str, key))}.onnx"
            export_onnx(self.model, path, key[0], key[1], height2=key[2], width2=key[3])
            self.exported.append(path.name)
            self.sessions[key] = self._cls(path, threads=self.threads)
        return self.sessions[key](view1, view2)

    def sync(self) -> None:
        pass


def _runner(model, backend: str, device: str, onnx_path: Path | None, threads: int | None, runtime: str | None):
    if backend == "torch":
        if model is None:
            raise InputError("--backend torch needs a PyTorch checkpoint, not an .onnx file")
        return TorchRunner(model, device, runtime or "torch eager fp32")
    if backend == "onnxruntime":
        if device != "cpu":
            raise InputError("--backend onnxruntime runs on the CPU here; use --device cpu")
        return OrtRunner(model, onnx_path, threads)
    if backend == "openvino":
        if device != "cpu":
            raise InputError("--backend openvino runs on the CPU here; use --device cpu")
        return OrtRunner(model, onnx_path, threads, engine="openvino")
    raise InputError(f"backend {backend!r} is not known; accepted: {', '.join(BACKENDS)}")


# --- the measurements ----------------------------------------------------------------------


def _pair_quality(runner, scenes: dict, pairs: list, skipped: list) -> tuple[dict, bool]:
    per_view, finite = [], True
    for name, i, j in pairs:
        scene = scenes[name]
        v1, v2 = scene_view(scene, i), scene_view(scene, j)
        if hasattr(runner, "supports") and not runner.supports(v1, v2):
            skipped.append(f"{name}:{i}-{j}")
            continue
        res1, _ = runner(v1, v2)
        depth = res1["pts3d"][0, ..., 2].float().cpu().numpy()
        finite &= bool(np.isfinite(depth).all())
        per_view.append(depth_metrics(depth, scene.views[i].depth, scene.views[i].valid))
    return aggregate_depth_metrics(per_view), finite


def depth_baselines(scenes: dict, pairs: list) -> dict:
    """Trivial predictors scored by the same metric code: a constant depth (the mean GT depth
    of the workload, no per-view alignment) and the per-view GT median (the best a constant
    can do with median alignment)."""
    views = [scenes[n].views[i] for n, i, _ in pairs]
    mean_depth = float(np.mean([v.depth[v.valid].mean() for v in views]))
    constant = [depth_metrics(np.full(v.depth.shape, mean_depth, np.float32), v.depth, v.valid, align="none") for v in views]
    median = [depth_metrics(np.ones(v.depth.shape, np.float32), v.depth, v.valid, align="median") for v in views]
    keep = ("absrel", "rmse", "delta1")
    return {
        "constant_depth": {k: aggregate_depth_metrics(constant)[k] for k in keep} | {"depth": mean_depth},
        "median_depth": {k: aggregate_depth_metrics(median)[k] for k in keep},
    }


def scene_chamfer(world_pts3d: list, scene, stride: int) -> dict:
    """Accuracy / completeness / Chamfer of aligned world pointmaps (one per view, at `stride`)
    against the scene's ground truth, after the Sim(3) fitted on pixel correspondences."""
    valid = [v.valid[::stride, ::stride] for v in scene.views]
    pred = np.concatenate([p.detach().cpu().numpy()[m] for p, m in zip(world_pts3d, valid)])
    gt = np.concatenate([v.pts3d[::stride, ::stride][m] for v, m in zip(scene.views, valid)])
    return chamfer(pred, gt, align=True, correspondences=(pred, gt))


def scene_pair_depth(results: list[dict], scene, stride: int) -> dict:
    """Depth figures of view 1 of every pair result (predictions at `stride`), pooled."""
    per_view = []
    for r in results:
        i = int(r["view1"]["idx"])
        view = scene.views[i]
        per_view.append(depth_metrics(r["pred1"]["pts3d"][..., 2].numpy(), view.depth[::stride, ::stride],
                                      view.valid[::stride, ::stride]))
    return aggregate_depth_metrics(per_view)


def _scene_level(runner, scene, workload: Workload) -> dict:
    """All pairs of the workload's graph over one scene, then global alignment and Chamfer.
    A PyTorch model encodes each view once (exact tokens: the same outputs as the official
    per-pair loop, up to GEMM batching); an ONNX file runs whole pairs."""
    from pqk.recon.scene_run import GaSettings, align_scene, infer_scene, predictions_finite

    n = len(scene.views)
    views = [scene_view(scene, i) | {"idx": i, "instance": str(i)} for i in range(n)]
    model = runner.model if isinstance(runner, TorchRunner) else runner
    s = workload.ga_stride
    run = infer_scene(views, model, workload.scene_graph, symmetrize=workload.symmetrize, cache="fp", stride=s,
                      device=runner.device if isinstance(runner, TorchRunner) else "cpu")
    figures = {"scene": scene.name, "n_pairs": len(run.pairs), "t_pairs_s": run.t_infer_s,
               "encoded_views": run.encoded_views, "encoder_cache": run.cache_bytes is not None}
    if not predictions_finite(run.results):
        nan = float("nan")
        return figures | {"t_scene_s": nan, "ga_final_loss": nan, "accuracy": nan, "completeness": nan,
                          "chamfer": nan, "note": "non-finite predictions: no global alignment"}
    align_scene(run, GaSettings(workload.ga_niter, workload.ga_lr, workload.ga_schedule, workload.seed))
    cd = scene_chamfer(run.aligned.pts3d, scene, s)
    return figures | {"t_ga_s": run.t_ga_s, "t_scene_s": run.t_scene_s, "ga_final_loss": run.aligned.final_loss, **cd}


def measure(model: torch.nn.Module | None, workload: Workload, scenes: dict, *, backend: str, device: str,
            onnx_path: Path | None, runtime: str | None, warmup: int, repeats: int, threads: int | None,
            say: Callable[[str], None]) -> Measurement:
    """Pair quality (and the real-photograph check), pair latency at batch 1 and the
    scene-level figures of one model on the workload."""
    runner = _runner(model, backend, device, onnx_path, threads, runtime)
    notes: list[str] = []
    skipped: list[str] = []
    say(f"quality on {len(workload.pairs)} pairs")
    quality, finite = _pair_quality(runner, scenes, workload.pairs, skipped)
    if not finite:
        notes.append("non-finite values in predictions")
    real = None
    if workload.real_pairs:
        say("real-photograph check (Middlebury motorcycle)")
        real, _ = _pair_quality(runner, scenes, workload.real_pairs, skipped)
    if skipped:
        notes.append(f"pairs skipped (no static-shape file of the ONNX model for their shape): {len(skipped)}")

    say(f"latency: {warmup} warm-up + {repeats} timed pairs, batch 1")
    timed = [(scene_view(scenes[n], i, device), scene_view(scenes[n], j, device)) for n, i, j in workload.pairs]
    if hasattr(runner, "supports"):
        timed = [p for p in timed if runner.supports(*p)]
    if not timed:
        raise InputError("no workload pair fits this model's input shape; re-export it at the workload's resolution")
    latency = time_calls(lambda k: runner(*timed[k]), len(timed), warmup, repeats, runner.sync)

    scene_figures = []
    for name in workload.scene_level:
        say(f"scene {name}: all pairs + global alignment ({workload.ga_niter} iterations)")
        scene_figures.append(_scene_level(runner, scenes[name], workload))

    def mean_of(key: str) -> float | None:
        return float(np.mean([s[key] for s in scene_figures])) if scene_figures else None

    details = {
        "backend": backend,
        "runtime": runner.description,
        "device": device,
        "workload": {"data_hash": workload.data_hash, "n_pairs": len(workload.pairs), "resolution": workload.resolution},
        "quality": quality,
        "real_check_motorcycle": real,
        "baselines": depth_baselines(scenes, workload.pairs),
        "baselines_motorcycle": depth_baselines(scenes, workload.real_pairs) if workload.real_pairs else None,
        "scene_level": scene_figures,
        "chamfer": {"accuracy": mean_of("accuracy"), "completeness": mean_of("completeness"), "chamfer": mean_of("chamfer")},
        "skipped_pairs": skipped,
    }
    return Measurement(
        quality={"chamfer": mean_of("chamfer"), "absrel": quality["absrel"], "rmse": quality["rmse"], "delta1": quality["delta1"]},
        latency=latency, efficiency={"t_scene_s": mean_of("t_scene_s")}, example=timed[0], notes=notes, details=details,
    )
