"""A CLIP-family model as two ONNX files, one per tower, and ONNX Runtime over them.

`export_towers(model, "model.onnx")` writes `model.image.onnx` (normalised images (B,3,R,R) ->
unnormalised image features) and `model.text.onnx` (token ids (B,L) int64 -> unnormalised text
features), batch dynamic. The image file carries what a deployment needs to use the pair
without pqk's model code: the text file's name, the tokenizer (`clip-bpe:77`, `minilm:32`),
the image resolution and the embedding width. A quantized pair keeps the same layout.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from pqk.backends.onnx_export import lower_ir_version
from pqk.errors import InputError

META_FAMILY = "pqk_family"
META_TEXT_FILE = "pqk_text_tower"
META_TOKENIZER = "pqk_tokenizer"
META_RESOLUTION = "pqk_image_resolution"
OPSET = 17


@dataclass(frozen=True)
class TowerFiles:
    image: Path
    text: Path


def tower_files(path: str | Path) -> TowerFiles:
    """The two files of a pair named `path` (`x.onnx`, `x.image.onnx` or `x.text.onnx`)."""
    path = Path(path)
    stem = path.name.removesuffix(".onnx").removesuffix(".image").removesuffix(".text")
    return TowerFiles(path.with_name(f"{stem}.image.onnx"), path.with_name(f"{stem}.text.onnx"))


class _ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class _TextTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


def _export(net: nn.Module, example: torch.Tensor, path: Path, input_name: str, meta: dict[str, str]) -> None:
    net.eval()
    raw = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices: the graph is checked below
        torch.onnx.export(net, (example,), str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                          input_names=[input_name], output_names=["features"],
                          dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}})
    proto = lower_ir_version(onnx.load(str(raw)))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(raw))
    raw.replace(path)


def export_towers(model: nn.Module, path: str | Path) -> TowerFiles:
    """Export both towers of `model` beside `path` (see the module docstring)."""
    from pqk.models.clip.family import image_resolution, text_tokenizer, tokenizer_spec

    files = tower_files(path)
    files.image.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    res = image_resolution(model)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, res, res, generator=gen)
    text = text_tokenizer(model)(["a photo", "two red circles"]).long()
    spec = tokenizer_spec(model)
    _export(_TextTower(model), text, files.text, "text", {META_FAMILY: "clip", META_TOKENIZER: spec})
    _export(_ImageTower(model), image, files.image, "image",
            {META_FAMILY: "clip", META_TEXT_FILE: files.text.name, META_TOKENIZER: spec, META_RESOLUTION: str(res)})
    return files


def read_meta(path: Path) -> dict[str, str]:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a damaged file
        raise InputError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


class OrtTowerPair:
    """ONNX Runtime sessions over an exported (or quantized) pair of towers."""

    def __init__(self, image_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        from pqk.models.clip.family import tokenizer_from_spec

        files = tower_files(image_path)
        for f in (files.image, files.text):
            if not f.is_file():
                raise InputError(f"{f} does not exist: a CLIP-family ONNX model is two files, "
                                 f"{files.image.name} and {files.text.name}")
        meta = read_meta(files.image)
        if meta.get(META_FAMILY) != "clip" or META_TOKENIZER not in meta:
            raise InputError(f"{files.image} is not a CLIP-family tower exported by pqk (no {META_TOKENIZER} metadata)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Its worker threads must not spin after a call: the towers are small (a few ms), and a
        # spinning pool takes the cores from whatever runs next (PyTorch, timed side by side).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(files.image), options, providers=providers)
        self.text_session = ort.InferenceSession(str(files.text), options, providers=providers)
        self.tokenize = tokenizer_from_spec(meta[META_TOKENIZER])
        self.resolution = int(meta[META_RESOLUTION])
        self.files = files
        self.meta = json.loads(json.dumps(meta))

    def images(self, x: torch.Tensor) -> torch.Tensor:
        out = self.image_session.run(None, {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)

    def texts(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.text_session.run(None, {"text": ids.detach().long().cpu().numpy()})[0]
        return torch.from_numpy(out)
