"""Where an INT8 pair spends its time, per operator kind, on OpenVINO and ONNX Runtime.

Quantizes a DUSt3R with pqk's PTQ path (the keep-list file, and with `--attention` the same
model with 8-bit attention), runs each QDQ file on both ONNX runtimes with their profilers on
(OpenVINO's PERF_COUNT, ONNX Runtime's enable_profiling) and prints, per runtime, the share of
the pair's time by operator kind: the Linear layers (FullyConnected / QGemm), the attention
core, convolutions (DPT head, patch embedding), normalisation, and the rest.

    python benchmarks/profile_int8.py                          # the bundled teacher, 512x384
    python benchmarks/profile_int8.py --full-size --calib 4    # DUSt3R 512 DPT (random weights)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from pqk.backends.onnx_export import INPUT_NAMES
from pqk.measure.machine import isa_label
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.methods.quantize.spec import ATTENTION_MODES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair_latency import add_model_choice, chosen_model  # noqa: E402

# OpenVINO layer types (after its fusions) and ONNX Runtime op types -> one kind.
KINDS = {
    "FullyConnected": "Linear (INT8 GEMM)", "QGemm": "Linear (INT8 GEMM)", "MatMulIntegerToFloat": "Linear (INT8 GEMM)",
    "Gemm": "Linear (float GEMM)",
    "MHA": "attention core", "ScaledAttn": "attention core", "Softmax": "attention core", "MatMul": "attention core",
    "MatMulInteger": "attention core",
    "Convolution": "convolutions", "Conv": "convolutions", "QLinearConv": "convolutions", "GroupConvolution": "convolutions",
    "MVN": "LayerNorm", "LayerNormalization": "LayerNorm", "RoPE": "RoPE",
}


def _kind(layer_type: str) -> str:
    return KINDS.get(layer_type, "other (element-wise, reshapes, Q/DQ)")


def openvino_profile(path: Path, feeds: dict, threads: int, runs: int) -> dict[str, float]:
    """ms per pair by kind (median-free: the mean of `runs` profiled calls after one warm-up)."""
    import openvino as ov

    from pqk.backends.openvino_runtime import int8_precision, matmul_form_model

    core = ov.Core()
    model, _ = matmul_form_model(core, path, core.read_model(str(path)))  # the form OvPairRunner compiles
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": int8_precision(), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    request.infer(feeds)
    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer(feeds)
        for info in request.get_profiling_info():
            kind = _kind(info.node_type)
            # OpenVINO fuses attention into a "Subgraph" (snippets) or MHA node: name it by its ops.
            if info.node_type == "Subgraph" and ("MatMul" in info.node_name or "Softmax" in info.node_name):
                kind = "attention core"
            totals[kind] += info.real_time.total_seconds() * 1e3 / runs
    return dict(totals)


def ort_profile(path: Path, feeds: dict, threads: int, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[_kind(e["args"]["op_name"])] += e["dur"] / 1e3 / (runs + 1)
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_choice(parser)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--calib", type=int, default=8, help="Calibration pairs (speed does not depend on them).")
    parser.add_argument("--runs", type=int, default=5, help="Profiled pairs per runtime (after one warm-up).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="int8_qk",
                        help="Also profile the model quantized with this 8-bit attention mode (float: only the keep-list file).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    model, name = chosen_model(args)
    modes = ["float"] + ([args.attention] if args.attention != "float" else [])
    report = {"machine": f"{isa_label()}, {args.threads} threads", "model": name, "shape": f"{args.width}x{args.height}",
              "runs": args.runs, "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="pqk-profile-") as tmp:
        for mode in modes:
            spec = QuantSpec(attention=mode, calibration={"size": args.calib, "method": "minmax"})
            calib = calibration_pairs(spec, args.width, args.height)
            made = quantize(model, spec, calib, Path(tmp) / mode, args.height, args.width)
            feeds = dict(zip(INPUT_NAMES, calib[0]))
            for runtime, profile in (("openvino", openvino_profile), ("onnxruntime", ort_profile)):
                report["profiles"][f"{runtime}, attention {mode}"] = profile(made["onnx_int8"], feeds, args.threads, args.runs)
    print(f"{report['machine']}, {name}, pair {report['shape']}, {args.runs} profiled pairs")
    for label, kinds in report["profiles"].items():
        total = sum(kinds.values())
        print(f"\n{label}: {total:.1f} ms per pair (sum of op times)")
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:40s} {ms:9.1f} ms  {ms / total:6.1%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
