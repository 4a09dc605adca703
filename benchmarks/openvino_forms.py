"""pqk's INT8 file on OpenVINO, as written and in the form OpenVINO compiles, against the peer.

Quantizes a DUSt3R with pqk's PTQ path, builds the peer (NNCF's PTQ of the same FP32 ONNX,
`ModelType.TRANSFORMER`, the same calibration pairs) and times, interleaved round-robin in one
process at 512x384, batch 1, three OpenVINO models:

  pqk's file as written (each Linear a Gemm between Reshapes, the form ONNX Runtime needs)
  | pqk's file with its Linears as MatMuls on the token tensor (what `OvPairRunner` compiles)
  | the peer

It also counts the layers of each compiled graph by type and runtime precision, so a speed
difference can be traced to the kernels OpenVINO runs (pqk.backends.openvino_form).

    python benchmarks/openvino_forms.py --rounds 40                            # the bundled teacher
    python benchmarks/openvino_forms.py --full-size --rounds 6 --calib 2       # DUSt3R 512 DPT, random weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair_latency import add_model_choice, chosen_model, nncf_peer  # noqa: E402

from pqk.backends.openvino_runtime import OvPairRunner  # noqa: E402
from pqk.measure.machine import Contention, isa_label  # noqa: E402
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize  # noqa: E402

COUNTED = ("FullyConnected", "Reshape", "Subgraph", "Eltwise", "Transpose", "Reorder", "FakeQuantize", "Convolution")


def layer_counts(compiled) -> dict[str, int]:
    """Layers of a compiled model by 'type precision', for the types in COUNTED."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in COUNTED:
            counts[f"{kind} {info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_choice(parser)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=20, help="Interleaved timed rounds (each runs every model once).")
    parser.add_argument("--calib", type=int, default=4, help="Calibration pairs (speed does not depend on them).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calib < 1:
        parser.error(f"--rounds {args.rounds} / --calib {args.calib}: expected integers >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    model, name = chosen_model(args)
    spec = QuantSpec(calibration={"size": args.calib, "method": "minmax"})
    calib = calibration_pairs(spec, args.width, args.height)
    img1, img2 = calib[0]
    feeds = {"img1": img1, "img2": img2}
    with tempfile.TemporaryDirectory(prefix="pqk-ovforms-") as tmp:
        t0 = time.perf_counter()
        made = quantize(model, spec, calib, Path(tmp), args.height, args.width)
        del model
        as_written = OvPairRunner(made["onnx_int8"], threads=args.threads, linears_as_matmul=False)
        as_matmul = OvPairRunner(made["onnx_int8"], threads=args.threads)
        peer = nncf_peer(made["onnx_fp32"], calib, args.threads)
        print(f"[{name}] built in {time.perf_counter() - t0:.0f}s; {as_matmul.rewritten_linears} Linears rewritten; "
              f"timing {args.rounds} interleaved rounds", flush=True)
        calls = {"pqk file as written (Gemm + Reshapes)": lambda: as_written.request.infer(feeds),
                 "pqk file, Linears as MatMuls (OvPairRunner)": lambda: as_matmul.request.infer(feeds),
                 "openvino+NNCF int8 (peer)": lambda: peer.infer(feeds)}
        graphs = {"pqk file as written (Gemm + Reshapes)": layer_counts(as_written.compiled),
                  "pqk file, Linears as MatMuls (OvPairRunner)": layer_counts(as_matmul.compiled),
                  "openvino+NNCF int8 (peer)": layer_counts(peer.get_compiled_model())}
        for call in calls.values():
            call()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in calls}
        with Contention() as contention:
            for r in range(args.rounds):
                for label in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                    start = time.perf_counter()
                    calls[label]()
                    times[label].append((time.perf_counter() - start) * 1e3)
    peer_p50 = statistics.median(times["openvino+NNCF int8 (peer)"])
    report = {"machine": f"{isa_label()}, {args.threads} threads", "model": name, "shape": f"{args.width}x{args.height}",
              "rounds": args.rounds, "contention": contention.to_json(), "variants": {}}
    print(f"{report['machine']}, {name}, pair {report['shape']}, {args.rounds} interleaved rounds")
    for label, ts in times.items():
        p50 = statistics.median(ts)
        report["variants"][label] = {"p50_ms": p50, "vs_peer": peer_p50 / p50, "layers": graphs[label]}
        print(f"  {label:45s} p50 {p50:9.1f} ms  {peer_p50 / p50:5.3f}x the peer's speed")
    for label, counts in graphs.items():
        print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
