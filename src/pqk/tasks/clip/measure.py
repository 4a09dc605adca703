"""How a CLIP-family model is measured on its frozen workload (the adapter's `measure`).

Every set of the workload is encoded once per model: its images, its captions, its zero-shot
prompts and its VQA candidate texts (each distinct text once). The metrics of
`pqk.tasks.clip.metrics` are computed from those embeddings, so PyTorch and ONNX Runtime
models are scored by the same code. The record's quality columns come from the workload's
main set (the generated test split, or the user's folder); the real-photograph check and the
trivial baselines (chance, and a bag-of-attributes matcher) go into the eval JSON's details.

Latency is one image through `encode_image` and one caption through `encode_text` at batch 1
(tokenisation excluded: it is the same Python code for every model of a tokenizer).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pqk.errors import InputError
from pqk.measure.latency import time_calls
from pqk.tasks.base import Measurement
from pqk.tasks.clip.metrics import (
    chance_recalls,
    class_embeddings,
    retrieval_recalls,
    vqa_accuracy,
    vqa_chance,
    vqa_texts,
    zero_shot_accuracy,
)

BACKENDS = ("torch", "onnxruntime")
BATCH = 64  # encoding batch for quality (latency is timed at batch 1)
RETRIEVAL = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean")


def model_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) RGB -> the normalised float input of CLIP-family image towers."""
    from pqk.models.clip import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class TorchTowers:
    """A PyTorch model's two towers, eager."""

    def __init__(self, model: torch.nn.Module, device: str, runtime: str):
        from pqk.models.clip.family import image_resolution, text_tokenizer

        self.model = model.to(device).eval()
        self.device = device
        self.tokenize = text_tokenizer(model)
        self.resolution = image_resolution(model)
        self.description = f"{runtime} ({device}, {torch.get_num_threads()} threads)"

    def images(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode_image(x.to(self.device)).float().cpu()

    def texts(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode_text(ids.to(self.device)).float().cpu()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class OrtTowers:
    """ONNX Runtime over the two towers' files (exported here from `model` when no file is
    given), so the quality measured is the deployed artifacts'."""

    def __init__(self, model: torch.nn.Module | None, onnx_path: Path | None, threads: int | None):
        from pqk.backends.clip_onnx import OrtTowerPair, export_towers

        self.tmp = None
        if onnx_path is None:
            if model is None:
                raise InputError("--backend onnxruntime needs a model or an exported image-tower .onnx file")
            self.tmp = tempfile.TemporaryDirectory(prefix="pqk-clip-ort-")
            onnx_path = export_towers(model, Path(self.tmp.name) / "model.onnx").image
        self.pair = OrtTowerPair(onnx_path, threads=threads)
        self.tokenize = self.pair.tokenize
        self.resolution = self.pair.resolution
        self.description = (f"onnxruntime {'fp32 export' if self.tmp else 'file ' + Path(onnx_path).name} "
                            f"(CPUExecutionProvider, {threads or 'default'} threads)")

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair.images(x)

    def texts(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pair.texts(ids)

    def sync(self) -> None:
        pass


def towers(model, backend: str, device: str, onnx_path: Path | None, threads: int | None, runtime: str | None):
    if backend == "torch":
        if model is None:
            raise InputError("--backend torch needs a PyTorch checkpoint, not an .onnx file")
        return TorchTowers(model, device, runtime or "torch eager fp32")
    if backend == "onnxruntime":
        if device != "cpu":
            raise InputError("--backend onnxruntime runs on the CPU here; use --device cpu")
        return OrtTowers(model, onnx_path, threads)
    raise InputError(f"backend {backend!r} is not known; accepted: {', '.join(BACKENDS)}")


# --- encoding a set ------------------------------------------------------------------------------


def _encode_images(runner, images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] != runner.resolution or images.shape[-2] != runner.resolution:
        raise InputError(f"the model takes {runner.resolution}x{runner.resolution} images, the workload holds "
                         f"{images.shape[-1]}x{images.shape[-2]}; freeze a workload with image_size {runner.resolution}")
    return torch.cat([runner.images(model_inputs(images[k:k + BATCH])) for k in range(0, len(images), BATCH)])


def _encode_texts(runner, texts: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct text once -> its embedding."""
    unique = list(dict.fromkeys(texts))
    out: dict[str, torch.Tensor] = {}
    for k in range(0, len(unique), BATCH):
        chunk = unique[k:k + BATCH]
        for text, emb in zip(chunk, runner.texts(runner.tokenize(chunk))):
            out[text] = emb
    return out


def set_quality(runner, data) -> dict[str, float | None]:
    """Retrieval, zero-shot and VQA figures of one ImageTextSet (None where the set has no such
    task: a folder of class folders has no captions, a questions-only folder no classes)."""
    tasks = data.tasks()
    image_emb = _encode_images(runner, data.images)
    captions = [c for caps in data.captions for c in caps] if "retrieval" in tasks else []
    owner = [i for i, caps in enumerate(data.captions) for _ in caps] if "retrieval" in tasks else []
    prompts = [p.format(name) for name in data.class_names for p in data.prompts] if "zero-shot" in tasks else []
    vqa_sets = [vqa_texts(item.question, item.choices) for item in data.vqa]
    table = _encode_texts(runner, captions + prompts + [t for texts in vqa_sets for t in texts])
    out: dict[str, float | None] = dict.fromkeys(RETRIEVAL, None)
    if captions:
        out.update(retrieval_recalls(image_emb, torch.stack([table[c] for c in captions]), owner))
    out.update(zs_top1=None, zs_top5=None)
    if prompts:
        classes = class_embeddings(torch.stack([table[p] for p in prompts]), len(data.class_names), len(data.prompts))
        out.update(zero_shot_accuracy(image_emb, classes, list(data.labels)))
    out.update(vqa_acc=None, vqa_yesno=None, vqa_number=None, vqa_other=None)
    if data.vqa:
        out.update(vqa_accuracy(
            image_emb[[item.image for item in data.vqa]], [torch.stack([table[t] for t in texts]) for texts in vqa_sets],
            [item.choices.index(item.answer) for item in data.vqa], [item.answer_type for item in data.vqa]))
    return out


def set_baselines(data) -> dict[str, dict]:
    """Trivial predictors scored by the same metric code: chance (exact expectation) and the
    bag-of-attributes matcher (a colour/shape word detector on the pixels against the words of
    each text), where the set's vocabulary allows it."""
    tasks = data.tasks()
    out: dict[str, dict] = {"chance": dict.fromkeys(RETRIEVAL, None)}
    if "retrieval" in tasks:
        out["chance"].update(chance_recalls(len(data.images), [len(c) for c in data.captions]))
    if data.vqa:
        out["chance"].update(vqa_chance([len(item.choices) for item in data.vqa], [item.answer_type for item in data.vqa]))
    if "zero-shot" in tasks:
        out["chance"].update(zs_top1=1.0 / len(data.class_names), zs_top5=min(5, len(data.class_names)) / len(data.class_names))
    from pqk.tasks.clip.baseline import AttributeMatcher

    out["bag_of_attributes"] = set_quality(AttributeMatcher(data), data)
    return out


# --- the measurement -----------------------------------------------------------------------------


def measure(model: torch.nn.Module | None, workload: Any, sets: dict, *, backend: str, device: str,
            onnx_path: Path | None, runtime: str | None, warmup: int, repeats: int, threads: int | None,
            say: Callable[[str], None]) -> Measurement:
    """Quality on the workload's main set (and the real-photograph check), latency per image and
    per text at batch 1."""
    runner = towers(model, backend, device, onnx_path, threads, runtime)
    main_name = next(iter(sets))
    main = sets[main_name]
    say(f"quality on {len(main.images)} images ({main_name})")
    quality = set_quality(runner, main)
    others = {}
    for name, data in list(sets.items())[1:]:
        say(f"real-photograph check ({name})")
        others[name] = set_quality(runner, data)

    say(f"latency: {warmup} warm-up + {repeats} timed images and texts, batch 1")
    n = min(len(main.images), 16)
    images = [model_inputs(main.images[k:k + 1]).to(device) for k in range(n)]
    sample = [caps[0] for caps in main.captions if caps] or [item.question for item in main.vqa] or \
        [p.format(c) for c in main.class_names for p in main.prompts]
    texts = [runner.tokenize([sample[k % len(sample)]]) for k in range(n)]
    image_latency = time_calls(lambda k: runner.images(images[k]), n, warmup, repeats, runner.sync)
    text_latency = time_calls(lambda k: runner.texts(texts[k]), n, warmup, repeats, runner.sync)
    notes = [] if all(torch.isfinite(torch.tensor([v for v in quality.values() if v is not None]))) \
        else ["non-finite quality figures"]
    details = {
        "backend": backend, "runtime": runner.description, "device": device,
        "workload": {"data_hash": workload.data_hash, "sets": {k: len(v.images) for k, v in sets.items()},
                     "image_size": int(main.images.shape[-1])},
        "quality": quality,
        "real_check": others,
        "baselines": {name: set_baselines(data) for name, data in sets.items()},
        "latency_text": text_latency,
    }
    return Measurement(
        quality=quality, latency=image_latency,
        efficiency={"t_text_p50_ms": text_latency["p50_ms"], "t_text_p95_ms": text_latency["p95_ms"],
                    "texts_per_sec": 1000.0 / text_latency["mean_ms"]},
        example=(images[0], texts[0]), notes=notes, details=details,
    )
