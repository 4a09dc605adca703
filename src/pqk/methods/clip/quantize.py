"""INT8 post-training quantization of a CLIP-family model's two towers with ONNX Runtime.

Each tower is exported to ONNX (`pqk.backends.clip_onnx`), then quantized statically in the
QDQ format: weights INT8 per output channel (symmetric), activations INT8 per tensor, ranges
calibrated on generated training images and captions (never the workload). The matrix
products (MatMul, Gemm, the patch Conv) run in INT8, the token embedding is stored in INT8; LayerNorm, softmax, GELU and the text
pooling stay in float, as ONNX Runtime's CPU kernels want them. The result is the pair
`model_int8.image.onnx` / `model_int8.text.onnx`, which `pqk eval --backend onnxruntime` runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from pqk.backends.clip_onnx import TowerFiles, export_towers, read_meta, tower_files

# Gather: the text tower's token embedding (a CLIP student's largest tensor: 49408 rows) is stored
# in INT8 too and dequantized row by row on lookup.
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv", "Gather"]


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input batches."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.batches, self.k = name, batches, 0

    def get_next(self):
        if self.k >= len(self.batches):
            return None
        self.k += 1
        return {self.name: self.batches[self.k - 1]}

    def rewind(self) -> None:
        self.k = 0


def _quantize_file(source: Path, target: Path, reader: _Reader) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.name + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    prepared.unlink(missing_ok=True)


def quantize_towers(model: torch.nn.Module, out: Path, n_calib: int = 64, batch: int = 16) -> TowerFiles:
    """`model`'s two towers in INT8 at `out` (`<stem>.image.onnx` + `<stem>.text.onnx`)."""
    import onnx

    from pqk.data.captions import generate_caption_set
    from pqk.models.clip.family import image_resolution, text_tokenizer
    from pqk.tasks.clip.measure import model_inputs
    from pqk.train.clip_teacher import TRAIN_SEED

    target = tower_files(out)
    work = target.image.parent / ".fp32"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_towers(model, work / "model.onnx")
    calib = generate_caption_set(n_calib, TRAIN_SEED + 7, "train", image_resolution(model))
    images = [model_inputs(calib.images[k:k + batch]).numpy() for k in range(0, n_calib, batch)]
    tokenize = text_tokenizer(model)
    captions = [caps[0] for caps in calib.captions]
    texts = [tokenize(captions[k:k + batch]).long().numpy() for k in range(0, n_calib, batch)]
    _quantize_file(fp32.text, target.text, _Reader("text", texts))
    _quantize_file(fp32.image, target.image, _Reader("image", images))
    # The quantized image file keeps the pair's metadata (text file name, tokenizer, resolution).
    meta = read_meta(fp32.image)
    meta["pqk_text_tower"] = target.text.name
    for path in (target.image, target.text):
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, meta if path == target.image else {k: meta[k] for k in ("pqk_family", "pqk_tokenizer")})
        onnx.save_model(proto, str(path))
    shutil.rmtree(work, ignore_errors=True)
    return target
