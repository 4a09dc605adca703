"""Does ONNX Runtime's 4-bit-weight MatMul (com.microsoft MatMulNBits) beat a float32 MatMul on
this CPU at full-size DUSt3R shapes? One MLP fc1 of ViT-L: 768 tokens x 1024 -> 4096.

    python experiments/matmul_nbits_speed.py [--threads 1 2] [--runs 20]

The weights are packed here (symmetric 4-bit per block of 32 along K, the operator's default
zero point 8, two values per byte, low nibble first) rather than with ORT's
MatMulNBitsQuantizer, which needs the onnx_ir package that this environment lacks; the packing
is checked by comparing the operator's output with numpy on the dequantized weight.
accuracy_level 0 computes in float32 after unpacking; 4 quantizes the activations to int8 per
block and runs int8 dot products. The INT8 row is ORT's dynamic quantization of the same
MatMul (uint8 activations per tensor, int8 weights), for comparison with 8 bits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

M, K, N, BLOCK = 768, 1024, 4096, 32


def fp32_graph(w: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    graph = helper.make_graph([node], "fp32", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, M, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, M, N])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def pack_4bit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 [N, K/BLOCK, BLOCK/2], scales float32 [N*K/BLOCK], dequantized W [K, N])."""
    blocks = w.T.reshape(N, K // BLOCK, BLOCK)  # per output column, blocks along K
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale), -8, 7).astype(np.int16) + 8  # zero point 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    dequant = ((q - 8) * scale).reshape(N, K).T
    return packed, scale.reshape(-1).astype(np.float32), dequant.astype(np.float32)


def nbits_graph(packed: np.ndarray, scales: np.ndarray, accuracy_level: int) -> onnx.ModelProto:
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, M, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, M, N])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def session(proto_or_path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as pqk's runners
    data = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, a: np.ndarray, runs: int) -> float:
    for _ in range(3):
        sess.run(None, {"A": a})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"A": a})
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/matmul_nbits_speed.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, M, K), dtype=np.float32)
    w = (rng.standard_normal((K, N), dtype=np.float32) / np.sqrt(K)).astype(np.float32)
    packed, scales, dequant = pack_4bit(w)
    exact = a @ w
    graphs = {"fp32": fp32_graph(w), "nbits4_acc0": nbits_graph(packed, scales, 0),
              "nbits4_acc4": nbits_graph(packed, scales, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(graphs["fp32"], fp32_path)
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        graphs["int8_dynamic"] = onnx.load(str(int8_path))

    results = {}
    for name, proto in graphs.items():
        out = session(proto, 1).run(None, {"A": a})[0]
        target = a @ dequant if name.startswith("nbits") else exact
        results[name] = {"rel_err_vs_own_weights": float(np.linalg.norm(out - target) / np.linalg.norm(target)),
                         "rel_err_vs_fp32": float(np.linalg.norm(out - exact) / np.linalg.norm(exact))}
        for threads in args.threads:
            results[name][f"ms_{threads}t"] = median_ms(session(proto, threads), a, args.runs)
    for name, row in results.items():
        for threads in args.threads:
            row[f"speedup_vs_fp32_{threads}t"] = results["fp32"][f"ms_{threads}t"] / row[f"ms_{threads}t"]
        print(name, {k: round(v, 4) for k, v in row.items()})
    payload = {"shape": {"M": M, "K": K, "N": N, "block_size": BLOCK}, "onnxruntime": ort.__version__,
               "runs": args.runs, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
