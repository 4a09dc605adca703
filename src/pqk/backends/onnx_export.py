"""DUSt3R pair inference as a static-shape ONNX graph, and an ONNX Runtime runner with the
torch model's `model(view1, view2) -> (res1, res2)` interface.

The graph is exported with the legacy (TorchScript) exporter because the dynamo exporter
needs onnxscript. Shapes are static: `true_shape` only ever selects Python branches and
token grids, so it is baked in from the example inputs and the file is valid for exactly
the shapes it was exported for (stored in its metadata and checked by `OrtPairRunner`).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

import pqk
from pqk.errors import InputError

INPUT_NAMES = ("img1", "img2")
OUTPUT_NAMES = ("pts3d", "conf", "pts3d_in_other_view", "conf2")
MIN_OPSET = 17
# The legacy exporter's ceiling (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
MAX_OPSET = 20
# ONNX Runtime 1.31 refuses the IR 14 that onnx 1.23 writes by default.
MAX_IR_VERSION = 10
# Protobuf cannot serialize a message over 2 GiB; the ViT-L DPT checkpoint is ~2.3 GB of
# float32 weights, so large graphs keep their weights in one side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

META_PQK_VERSION = "pqk_version"
META_DUST3R_KWARGS = "dust3r_kwargs"
META_INPUT_SHAPES = "input_shapes"
META_OUTPUT_NAMES = "output_names"


# --- the exported module --------------------------------------------------------------------


class PairGraphModule(nn.Module):
    """Tensor-in, tensor-out DUSt3R pair for export.

    `true_shape` is taken from each image's static (H, W): the two views may differ
    (a landscape view 1 with a portrait view 2), but every image of one view batch shares
    its view's shape, as in the official `inference` with mixed pairs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, img1: torch.Tensor, img2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        res1, res2 = self.model(_view(img1), _view(img2))
        return res1["pts3d"], res1["conf"], res2["pts3d_in_other_view"], res2["conf"]


def _view(img: torch.Tensor) -> dict[str, torch.Tensor]:
    batch, _, height, width = (int(s) for s in img.shape)
    # A constant in the trace: the graph is only valid for this shape anyway.
    shape = torch.tensor([[height, width]], dtype=torch.int32, device=img.device).expand(batch, 2)
    return {"img": img, "true_shape": shape}


# --- export ---------------------------------------------------------------------------------


def _expm1_symbolic(g: Any, x: Any) -> Any:
    """aten::expm1 has no legacy-exporter symbolic. Plain exp(x) - 1 loses all relative
    precision for small x (short DUSt3R rays); Kahan's form (u - 1) * (x / log(u)),
    u = exp(x), is accurate because the rounding of u cancels between the two factors
    (x / log(u) is taken first so that (u - 1) * x cannot overflow near x = 88)."""
    one = g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0)), x)
    zero = g.op("CastLike", g.op("Constant", value_t=torch.tensor(0.0)), x)
    u = g.op("Exp", x)
    um1 = g.op("Sub", u, one)
    kahan = g.op("Mul", um1, g.op("Div", x, g.op("Log", u)))
    # u == 1: the quotient is 0/0 and expm1(x) ~ x; u == 0 or inf: the quotient is nan
    # while u - 1 (-1 or inf) is already exact.
    saturated = g.op("Or", g.op("IsInf", u), g.op("Equal", u, zero))
    out = g.op("Where", saturated, um1, kahan)
    return g.op("Where", g.op("Equal", um1, zero), x, out)


@contextlib.contextmanager
def _expm1_registered(opset: int) -> Iterator[None]:
    # Registered only for the duration of one export so no global exporter state leaks.
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::expm1", opset)


# DUSt3R is trained at 512 px; a side of 4096 px is already 65,536 tokens per view, whose attention
# maps alone exceed this project's machines. Larger sizes are refused before any tracing.
MAX_SIDE = 4096


def _check_size(name: str, value: Any, patch: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % patch:
        raise InputError(f"{name} must be a positive multiple of the patch size {patch}; got {value!r}")
    if value > MAX_SIDE:
        raise InputError(f"{name} {value} is above the {MAX_SIDE} px pqk exports (DUSt3R works at 512)")
    return int(value)


def _float32_model(model: nn.Module) -> nn.Module:
    """The model itself when already float32, else a float32 copy (the caller's model is
    never converted in place)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def lower_ir_version(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Cap the IR version at one ONNX Runtime 1.31 loads (in place; also returned). The
    graph's content does not change: opsets up to 22 are valid under IR 10."""
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def _check_export_args(
    model: nn.Module, height: int, width: int, height2: int | None, width2: int | None, opset: int, batch: int
) -> tuple[int, int, int, int, int, int]:
    """`export_onnx`'s sizes, opset and batch checked and made ints:
    (height, width, height2, width2, opset, batch)."""
    patch = int(model.config.patch_size)
    height = _check_size("height", height, patch)
    width = _check_size("width", width, patch)
    if (height2 is None) != (width2 is None):
        raise InputError("give both height2 and width2 for view 2, or neither")
    height2 = height if height2 is None else _check_size("height2", height2, patch)
    width2 = width if width2 is None else _check_size("width2", width2, patch)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch <= 0:
        raise InputError(f"batch must be a positive integer; got {batch!r}")
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be between {MIN_OPSET} and {MAX_OPSET}; got {opset!r}")
    batch, opset = int(batch), int(opset)
    return height, width, height2, width2, opset, batch


def _trace_to_onnx(net: nn.Module, img1: torch.Tensor, img2: torch.Tensor, raw: Path, opset: int) -> None:
    """Trace `net` in eval mode on the example pair into the raw, unchecked graph `raw`;
    restoring the training mode is left to the caller."""
    net.eval()
    with torch.no_grad(), warnings.catch_warnings(), _expm1_registered(opset):
        # Expected: true_shape is read as Python ints on purpose (static graph).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Expected: the legacy exporter is chosen on purpose (no onnxscript here).
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(
            PairGraphModule(net),
            (img1, img2),
            str(raw),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
        )


def _stamped_proto(raw: Path, model: nn.Module, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The raw graph with its IR version lowered and pqk's metadata in place of any other."""
    proto = onnx.load(str(raw))
    lower_ir_version(proto)
    meta = {
        META_PQK_VERSION: pqk.__version__,
        META_DUST3R_KWARGS: json.dumps(model.config.to_kwargs(), sort_keys=True),
        META_INPUT_SHAPES: json.dumps(shapes),
        META_OUTPUT_NAMES: json.dumps(list(OUTPUT_NAMES)),
    }
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = "DUSt3R image pair -> pointmaps and confidences, exported by pqk"
    return proto


def _save_checked(raw: Path, tmp_dir: Path, path: Path, model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Stamp the raw graph, save and check it in `tmp_dir`, then move it (and its weights
    file when large) to `path`."""
    # The proto is only referenced here, so `del proto` below frees it before the check.
    proto = _stamped_proto(raw, model, shapes)
    data_name = path.name + ".data"
    external = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    staged = tmp_dir / path.name
    onnx.save_model(
        proto,
        str(staged),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_name,
    )
    del proto
    # The path form also checks graphs over 2 GiB.
    onnx.checker.check_model(str(staged))
    # Two files cannot be swapped atomically together: move the weights first so the
    # new graph never points at missing or stale data.
    stale_data = path.parent / data_name
    if external:
        # onnx creates the side file owner-only; give it the .onnx file's (umask) mode.
        shutil.copymode(staged, tmp_dir / data_name)
        os.replace(tmp_dir / data_name, stale_data)
    os.replace(staged, path)
    if not external and stale_data.exists():
        stale_data.unlink()  # left by an earlier large export to the same name


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    height: int,
    width: int,
    height2: int | None = None,
    width2: int | None = None,
    opset: int = 17,
    batch: int = 1,
) -> Path:
    """Export a DUSt3R pair (view 1 `batch`x3x`height`x`width`, view 2 the same unless
    `height2`/`width2` are given) to `path` as a float32 ONNX graph; returns the path.

    Written atomically: a failed export or check leaves any previous file untouched.
    """
    height, width, height2, width2, opset, batch = _check_export_args(
        model, height, width, height2, width2, opset, batch
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _float32_model(model)
    device = next(net.parameters()).device
    # Values do not matter for a static trace; a private generator keeps the global RNG intact.
    gen = torch.Generator().manual_seed(0)
    img1 = (torch.rand(batch, 3, height, width, generator=gen) * 2 - 1).to(device)
    img2 = (torch.rand(batch, 3, height2, width2, generator=gen) * 2 - 1).to(device)
    shapes = {INPUT_NAMES[0]: list(img1.shape), INPUT_NAMES[1]: list(img2.shape)}

    # Same folder as the target so the final os.replace is a rename on one filesystem; a
    # folder rather than a file because large graphs spill their weights beside the .onnx.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    was_training = net.training
    try:
        raw = tmp_dir / "raw.onnx"
        _trace_to_onnx(net, img1, img2, raw, opset)
        _save_checked(raw, tmp_dir, path, model, shapes)
    finally:
        net.train(was_training)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# --- running --------------------------------------------------------------------------------


def _fmt(shape: tuple[int, ...] | list[int]) -> str:
    return "×".join(str(s) for s in shape)


def _as_numpy(img: Any, view: int) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        floating = img.is_floating_point()
        img = img.detach().cpu()
    else:
        img = np.asarray(img)
        floating = np.issubdtype(img.dtype, np.floating)
    # uint8 pixels would run without error and give meaningless pointmaps.
    if not floating:
        raise InputError(f"view {view}: img must be float, normalized to [-1, 1]; got {img.dtype}")
    if isinstance(img, torch.Tensor):
        img = img.float().numpy()
    return np.ascontiguousarray(img, dtype=np.float32)


class PairGraphRunner:
    """What every runtime of a pqk pair graph shares: `runner(view1, view2) -> (res1, res2)`.

    Views are dicts with `img` (torch or numpy); outputs are torch tensors, on the device
    of view 1's image when that is a torch tensor. A subclass opens the file and sets
    `input_shapes` and `metadata`; `_infer(imgs)` runs it and returns the four outputs in
    OUTPUT_NAMES order as numpy arrays.
    """

    engine = "a runtime"
    input_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    metadata: dict[str, str]

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ONNX model not found: {self.path}")
        if threads is not None and (isinstance(threads, bool) or int(threads) <= 0):
            raise InputError(f"threads must be a positive integer; got {threads!r}")

    def _infer(self, imgs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _check_io(self, inputs, outputs) -> None:
        if set(INPUT_NAMES) - set(inputs) or set(OUTPUT_NAMES) - set(outputs):
            raise InputError(
                f"{self.path} is not a pqk DUSt3R pair graph: expected inputs {', '.join(INPUT_NAMES)} "
                f"and outputs {', '.join(OUTPUT_NAMES)}"
            )

    def _check_shapes(self, got: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        want = self.input_shapes
        if got == want:
            return
        if want[0] == want[1]:
            exported = f"{_fmt(want[0])} inputs"
        else:
            exported = f"{_fmt(want[0])} (view 1) and {_fmt(want[1])} (view 2) inputs"
        given = _fmt(got[0]) if got[0] == got[1] else f"{_fmt(got[0])} and {_fmt(got[1])}"
        only_batch = all(len(g) == 4 and g[1:] == w[1:] for g, w in zip(got, want))
        hint = "--batch" if only_batch else "--height/--width"
        raise InputError(f"this ONNX model was exported for {exported}; got {given} — re-export with {hint}")

    def __call__(self, view1: Mapping[str, Any], view2: Mapping[str, Any]) -> tuple[dict, dict]:
        imgs = [_as_numpy(v["img"], i) for i, v in enumerate((view1, view2), start=1)]
        self._check_shapes((tuple(imgs[0].shape), tuple(imgs[1].shape)))
        for i, (view, img) in enumerate(zip((view1, view2), imgs), start=1):
            shape = view.get("true_shape")
            if shape is not None:
                shape = np.asarray(shape.cpu() if isinstance(shape, torch.Tensor) else shape).reshape(-1, 2)
                if not (shape == np.array(img.shape[-2:])).all():
                    raise InputError(
                        f"view {i}: true_shape {shape.tolist()} differs from the image size "
                        f"{_fmt(img.shape[-2:])}; the ONNX graph assumes they are equal"
                    )
        out = self._infer(imgs)
        device = view1["img"].device if isinstance(view1["img"], torch.Tensor) else torch.device("cpu")
        pts1, conf1, pts2, conf2 = (torch.from_numpy(o).to(device) for o in out)
        return {"pts3d": pts1, "conf": conf1}, {"pts3d_in_other_view": pts2, "conf": conf2}


class OrtPairRunner(PairGraphRunner):
    """ONNX Runtime (CPU) twin of the torch model."""

    engine = "ONNX Runtime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None):
        import onnxruntime as ort

        super().__init__(path, threads)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        # Worker threads must not spin after a call: pqk holds several sessions (FP32, INT8) and times
        # them side by side with PyTorch; a spinning pool takes the cores from whatever runs next
        # (measured on the embedded teacher, 2 threads: INT8 1.39-1.52x eager with spinning,
        # 1.70-1.84x without; oneDNN INT8, timed after it, 0.89-0.94x -> 1.12-1.17x).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A file ORT rejects (not ONNX, IR or opset too new, an op it lacks) is a bad input;
        # other ORT failures (RuntimeException, EPFail) are bugs and keep their traceback.
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        load_errors = (
            ort_state.Fail,
            ort_state.InvalidArgument,
            ort_state.InvalidGraph,
            ort_state.InvalidProtobuf,
            ort_state.NoSuchFile,
            ort_state.NotImplemented,
        )
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except load_errors as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime cannot load {self.path}: {first}") from exc

        inputs = {i.name: i for i in self.session.get_inputs()}
        self._check_io(inputs, {o.name for o in self.session.get_outputs()})
        self.input_shapes = tuple(tuple(inputs[n].shape) for n in INPUT_NAMES)  # type: ignore[assignment]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _infer(self, imgs: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, imgs)))


# --- one deployed model, one static file per pair shape --------------------------------------

PairShapes = tuple[tuple[int, int], tuple[int, int]]  # ((H1, W1), (H2, W2)) of view 1 and view 2
_VARIANT_TAG = re.compile(r"^(\d+)x(\d+)(?:_(\d+)x(\d+))?$")


def shape_variant_path(path: str | os.PathLike[str], shapes: PairShapes) -> Path:
    """Where the file of `path`'s model for another pair shape lives: `<stem>.<H>x<W>.onnx`
    (both views alike) or `<stem>.<H1>x<W1>_<H2>x<W2>.onnx`, beside `path`."""
    path = Path(path)
    (h1, w1), (h2, w2) = shapes
    tag = f"{h1}x{w1}" if (h1, w1) == (h2, w2) else f"{h1}x{w1}_{h2}x{w2}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def shape_variants(path: str | os.PathLike[str]) -> dict[PairShapes, Path]:
    """The files beside `path` that hold its model at other pair shapes, by shape."""
    path = Path(path)
    found: dict[PairShapes, Path] = {}
    for candidate in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*{path.suffix}")):
        tag = candidate.name[len(path.stem) + 1: -len(path.suffix)]
        match = _VARIANT_TAG.match(tag)
        if match:
            h1, w1, h2, w2 = (int(g) if g else None for g in match.groups())
            found[((h1, w1), (h2 or h1, w2 or w1))] = candidate  # type: ignore[assignment]
    return found


def pair_shapes_of(view1: Mapping[str, Any], view2: Mapping[str, Any]) -> PairShapes:
    (h1, w1), (h2, w2) = (tuple(int(s) for s in v["img"].shape[-2:]) for v in (view1, view2))
    return (h1, w1), (h2, w2)


class ShapeRoutedRunner:
    """A deployed model kept as one static-shape file per pair shape: the primary file (the
    workload's generated shape) and the variants the quantizer wrote beside it for the
    workload's other shapes (`shape_variant_path`), all with the same weights and activation
    scales. Each pair runs on the file exported for its views' shapes, opened on first use by
    `open_file` (an ONNX Runtime or OpenVINO runner class)."""

    def __init__(self, path: str | os.PathLike[str], open_file: Callable[[Path], PairGraphRunner]):
        self.primary = open_file(Path(path))
        self.files = shape_variants(path)
        self._open = open_file
        first = tuple((int(s[-2]), int(s[-1])) for s in self.primary.input_shapes)
        self.runners: dict[PairShapes, PairGraphRunner] = {first: self.primary}  # type: ignore[dict-item]

    def supports(self, view1: Mapping[str, Any], view2: Mapping[str, Any]) -> bool:
        shapes = pair_shapes_of(view1, view2)
        if shapes in self.runners:
            return tuple(self.runners[shapes].input_shapes[0]) == tuple(view1["img"].shape)
        return shapes in self.files and int(view1["img"].shape[0]) == int(self.primary.input_shapes[0][0])

    def __call__(self, view1: Mapping[str, Any], view2: Mapping[str, Any]) -> tuple[dict, dict]:
        shapes = pair_shapes_of(view1, view2)
        if shapes not in self.runners and shapes in self.files:
            self.runners[shapes] = self._open(self.files[shapes])
        # A shape without a file falls to the primary runner, whose error names the shapes it takes.
        return self.runners.get(shapes, self.primary)(view1, view2)


# --- agreement with torch -------------------------------------------------------------------


def _errors(ort_out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, b = ort_out.detach().cpu().double(), ref.detach().cpu().double()
    # Identical infinities (an overflowed conf in both) are agreement, not nan.
    diff = torch.where(a == b, torch.zeros_like(a), a - b)
    ref_norm, ref_max = b.norm().item(), b.abs().max().item()
    rel_l2 = diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item()
    max_ratio = diff.abs().max().item() / ref_max if ref_max > 0 else diff.abs().max().item()
    return rel_l2, max_ratio


def compare_with_torch(
    model: nn.Module,
    onnx_path: str | os.PathLike[str] | PairGraphRunner,
    view1: Mapping[str, Any],
    view2: Mapping[str, Any],
) -> dict[str, float]:
    """Per ONNX output name: `<name>_rel_l2` = ‖ort − torch‖/‖torch‖ and
    `<name>_max_abs_ratio` = max|ort − torch| / max|torch|; `max_rel_l2` is the worst.

    `onnx_path` may also be an open `OrtPairRunner`: a session takes seconds to build for
    a large graph, so callers comparing several pairs should open it once.
    """
    runner = onnx_path if isinstance(onnx_path, PairGraphRunner) else OrtPairRunner(onnx_path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref1, ref2 = model(dict(view1), dict(view2))
    finally:
        model.train(was_training)
    got1, got2 = runner(view1, view2)
    pairs = {
        "pts3d": (got1["pts3d"], ref1["pts3d"]),
        "conf": (got1["conf"], ref1["conf"]),
        "pts3d_in_other_view": (got2["pts3d_in_other_view"], ref2["pts3d_in_other_view"]),
        "conf2": (got2["conf"], ref2["conf"]),
    }
    report: dict[str, float] = {}
    for name, (got, ref) in pairs.items():
        if got.shape != ref.shape:
            raise InputError(f"{name}: ONNX output shape {tuple(got.shape)} differs from torch {tuple(ref.shape)}")
        report[f"{name}_rel_l2"], report[f"{name}_max_abs_ratio"] = _errors(got, ref)
    report["max_rel_l2"] = max(report[f"{n}_rel_l2"] for n in OUTPUT_NAMES)
    return report


__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "OrtPairRunner",
    "PairGraphRunner",
    "PairGraphModule",
    "PairShapes",
    "ShapeRoutedRunner",
    "compare_with_torch",
    "export_onnx",
    "lower_ir_version",
    "shape_variant_path",
    "shape_variants",
]
