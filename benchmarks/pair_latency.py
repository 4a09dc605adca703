"""Pair latency of DUSt3R on this CPU, every runtime side by side in one process.

Default: the full-size DUSt3R_ViTLarge_BaseDecoder_512_dpt architecture with random weights
(speed does not depend on the weights) at 512x384, batch 1. For each model it builds the
INT8 variants with pqk's own quantization path (QDQ PTQ on a small calibration set, then the
oneDNN runtime of that file) and times, interleaved round-robin so that the shared machine's
slow spells hit every variant alike:

  torch eager fp32 | torch eager bf16 (autocast) | onnxruntime fp32 | onnxruntime int8 (QDQ)
  | torch oneDNN int8 + bf16 attention

and prints p50/p95 and the speed-up of each over eager fp32. `--model PATH` (repeatable) puts
trained checkpoints (the teacher, a distilled or pruned student) in the table instead.

    python benchmarks/pair_latency.py                       # full-size DUSt3R 512 DPT
    python benchmarks/pair_latency.py --model src/pqk/assets/teacher_dust3r.safetensors --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pqk.backends.torch_int8 import int8_model_from_qdq, onednn_int8_available
from pqk.measure.machine import isa_label
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.methods.quantize_step import side_by_side_latency
from pqk.models.dust3r import build_model, count_parameters, load_checkpoint

FULL_SIZE_512_DPT = dict(
    pos_embed="RoPE100", patch_embed_cls="PatchEmbedDust3R", img_size=(512, 512), head_type="dpt",
    output_mode="pts3d", depth_mode=("exp", "-inf", "inf"), conf_mode=("exp", 1, "inf"),
    enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12,
    landscape_only=False,
)


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace, work: Path) -> dict:
    height, width = args.height, args.width
    spec = QuantSpec(calibration={"size": args.calib, "method": "minmax"})
    t0 = time.perf_counter()
    print(f"[{name}] {count_parameters(model) / 1e6:.1f}M parameters: export + PTQ ({args.calib} calibration pairs)", flush=True)
    made = quantize(model, spec, calibration_pairs(spec, width, height), work / name, height, width)
    int8 = int8_model_from_qdq(model, made["onnx_int8"])[0] if onednn_int8_available() else None
    print(f"[{name}] built in {time.perf_counter() - t0:.0f}s; timing {args.rounds} interleaved rounds", flush=True)
    onnx_fp32 = None if args.skip_ort_fp32 else made["onnx_fp32"]
    result = side_by_side_latency(model, onnx_fp32, made["onnx_int8"], int8, height, width, rounds=args.rounds)
    result["params_M"] = count_parameters(model) / 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=Path, help="A DUSt3R checkpoint to time (repeatable). Default: full-size 512 DPT, random weights.")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=6, help="Interleaved timed rounds (each runs every variant once).")
    parser.add_argument("--calib", type=int, default=8, help="Calibration pairs for the INT8 scales (speed does not depend on them).")
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: all cores).")
    parser.add_argument("--skip-ort-fp32", action="store_true", help="Leave ONNX Runtime FP32 out (saves memory on the full-size model).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    models = {p.stem: load_checkpoint(p) for p in args.model} if args.model else {"dust3r_512_dpt_full_size": build_model(**FULL_SIZE_512_DPT)}
    report = {"machine": f"{isa_label()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "shape": f"{args.width}x{args.height}", "models": {}}
    with tempfile.TemporaryDirectory(prefix="pqk-bench-") as tmp:
        for name, model in models.items():
            report["models"][name] = bench_model(name, model.eval(), args, Path(tmp))
    print(f"\n{report['machine']}, torch {report['torch']}, pair {report['shape']}, batch 1")
    for name, res in report["models"].items():
        print(f"\n{name} ({res['params_M']:.1f}M params), {res['rounds']} interleaved rounds")
        print(f"  {'runtime':38s} {'p50 ms':>9s} {'p95 ms':>9s} {'vs eager fp32':>14s}")
        for variant, v in res["variants"].items():
            print(f"  {variant:38s} {v['p50_ms']:9.1f} {v['p95_ms']:9.1f} {v['speedup']:13.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
