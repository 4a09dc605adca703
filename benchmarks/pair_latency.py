"""Pair latency of DUSt3R on this CPU, every runtime side by side in one process.

Default: the full-size DUSt3R_ViTLarge_BaseDecoder_512_dpt architecture with random weights
(speed does not depend on the weights) at 512x384, batch 1. For each model it builds the
INT8 variants with pqk's own quantization path (QDQ PTQ on a small calibration set, then the
oneDNN runtime of that file) and times, interleaved round-robin so that the shared machine's
slow spells hit every variant alike:

  torch eager fp32 | torch eager bf16 (autocast) | onnxruntime fp32 | onnxruntime int8 (QDQ)
  | torch oneDNN int8 + bf16 attention | openvino int8 (QDQ) | openvino+NNCF int8 (the peer)

and prints p50/p95 and the speed-up of each over eager fp32. The peer row is what an Intel/AMD
CPU user would deploy without pqk: NNCF's PTQ (`ModelType.TRANSFORMER`, the same calibration
pairs) of the FP32 ONNX file, run by OpenVINO (needs `pip install nncf`; left out with a note
otherwise). `--student RATIO` adds the K student derived from the model (`derive_student`,
random weights are fine for speed) with its own rows, so a K->Q deployment is compared with
the teacher's eager FP32 in the same run. `--model PATH` (repeatable) puts trained
checkpoints (the teacher, a distilled or pruned student) in the table instead.

    python benchmarks/pair_latency.py --threads 2 --rounds 4 --student 0.3 --json benchmarks/results/pair_latency.json
    python benchmarks/pair_latency.py --model src/pqk/assets/teacher_dust3r.safetensors --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pqk.backends.torch_int8 import int8_model_from_qdq, onednn_int8_available
from pqk.measure.machine import isa_label
from pqk.backends.onnx_export import OrtPairRunner
from pqk.backends.openvino_runtime import OvPairRunner
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.methods.quantize.spec import ATTENTION_MODES
from pqk.methods.quantize_step import timing_pair, side_by_side_latency
from pqk.models.dust3r import build_model, count_parameters, load_checkpoint

FULL_SIZE_512_DPT = dict(
    pos_embed="RoPE100", patch_embed_cls="PatchEmbedDust3R", img_size=(512, 512), head_type="dpt",
    output_mode="pts3d", depth_mode=("exp", "-inf", "inf"), conf_mode=("exp", 1, "inf"),
    enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12,
    landscape_only=False,
)


PEER = "openvino+NNCF int8 (peer)"


def add_model_choice(parser: argparse.ArgumentParser) -> None:
    """--model / --full-size, as the single-model benchmarks (profile_int8, openvino_forms) take them."""
    parser.add_argument("--model", type=Path, default=None, help="A DUSt3R checkpoint (default: the bundled teacher).")
    parser.add_argument("--full-size", action="store_true", help="The full-size DUSt3R 512 DPT architecture, random weights.")


def chosen_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, its name) for `add_model_choice`'s arguments."""
    if args.full_size:
        model, name = build_model(**FULL_SIZE_512_DPT), "dust3r_512_dpt_full_size"
    else:
        from pqk.assets import default_checkpoint

        path = args.model or default_checkpoint()[0]
        model, name = load_checkpoint(path), Path(path).stem
    return model.eval(), name


def nncf_peer(onnx_fp32: Path, calib: list, threads: int):
    """The peer's INT8 model: NNCF PTQ of the FP32 ONNX file on pqk's calibration pairs, compiled
    by OpenVINO with its INT8 precision setting (bf16 float parts where the CPU has bf16)."""
    import nncf
    import openvino as ov

    from pqk.backends.openvino_runtime import int8_precision

    core = ov.Core()
    model = core.read_model(str(onnx_fp32))
    data = nncf.Dataset([{"img1": a, "img2": b} for a, b in calib])
    quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    compiled = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": int8_precision(),
                                                     "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                                                     "INFERENCE_NUM_THREADS": str(threads)})
    request = compiled.create_infer_request()
    return request


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace, work: Path,
                reference: float | None = None) -> dict:
    """Every runtime of `model` side by side; `reference`: another model's eager-FP32 p50 (the
    teacher's, for a student) that speed-ups are also given against."""
    height, width = args.height, args.width
    spec = QuantSpec(calibration={"size": args.calib, "method": "minmax"})
    t0 = time.perf_counter()
    print(f"[{name}] {count_parameters(model) / 1e6:.1f}M parameters: export + PTQ ({args.calib} calibration pairs)", flush=True)
    calib = calibration_pairs(spec, width, height)
    made = quantize(model, spec, calib, work / name, height, width)
    int8 = int8_model_from_qdq(model, made["onnx_int8"])[0] if onednn_int8_available() else None
    extra, notes = {}, []
    pair_views = timing_pair(height, width)  # the pair side_by_side_latency times
    if args.peer:
        try:
            request = nncf_peer(made["onnx_fp32"], calib, torch.get_num_threads())
        except ImportError:
            notes.append("peer row left out: pip install nncf")
        else:
            img1, img2 = calib[0]
            extra[PEER] = lambda: request.infer({"img1": img1, "img2": img2})
    if args.attention != "float":
        # The same model with 8-bit attention in its QDQ file (QuantSpec.attention), on both ONNX runtimes.
        attn = quantize(model, replace(spec, attention=args.attention), calib, work / f"{name}_{args.attention}", height, width)
        for label, runner in ((f"openvino int8 + {args.attention} attention", OvPairRunner(attn["onnx_int8"], threads=torch.get_num_threads())),
                              (f"onnxruntime int8 + {args.attention} attention", OrtPairRunner(attn["onnx_int8"], threads=torch.get_num_threads()))):
            extra[label] = (lambda r: lambda: r(*pair_views))(runner)
    print(f"[{name}] built in {time.perf_counter() - t0:.0f}s; timing {args.rounds} interleaved rounds", flush=True)
    onnx_fp32 = None if args.skip_ort_fp32 else made["onnx_fp32"]
    result = side_by_side_latency(model, onnx_fp32, made["onnx_int8"], int8, height, width, rounds=args.rounds,
                                  extra=extra)
    result["params_M"] = count_parameters(model) / 1e6
    result["notes"] = notes
    if reference is not None:
        for v in result["variants"].values():
            v["speedup_vs_teacher_fp32"] = reference / v["p50_ms"]
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
    parser.add_argument("--student", type=float, default=None, metavar="RATIO",
                        help="Also time the K student derived from each model with this ratio (e.g. 0.3), with speed-ups vs the model's eager FP32.")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="Leave out the OpenVINO+NNCF peer row.")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="int8_qk",
                        help="Also time the model quantized with this 8-bit attention mode (float: leave those rows out).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.student is not None and not 0 < args.student < 1:
        parser.error(f"--student {args.student} is not a ratio in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    models = {p.stem: load_checkpoint(p) for p in args.model} if args.model else {"dust3r_512_dpt_full_size": build_model(**FULL_SIZE_512_DPT)}
    report = {"machine": f"{isa_label()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "shape": f"{args.width}x{args.height}", "models": {}}
    with tempfile.TemporaryDirectory(prefix="pqk-bench-") as tmp:
        for name, model in models.items():
            res = report["models"][name] = bench_model(name, model.eval(), args, Path(tmp))
            if args.student is not None:
                from pqk.methods.distill.student import derive_student

                teacher_fp32 = res["variants"]["torch eager fp32"]["p50_ms"]
                student = derive_student(model, args.student).eval()
                del model
                report["models"][f"{name}_student_{args.student:g}"] = bench_model(
                    f"{name}_student_{args.student:g}", student, args, Path(tmp), reference=teacher_fp32)
    print(f"\n{report['machine']}, torch {report['torch']}, pair {report['shape']}, batch 1")
    for name, res in report["models"].items():
        vs_teacher = any("speedup_vs_teacher_fp32" in v for v in res["variants"].values())
        print(f"\n{name} ({res['params_M']:.1f}M params), {res['rounds']} interleaved rounds")
        print(f"  {'runtime':38s} {'p50 ms':>9s} {'p95 ms':>9s} {'vs eager fp32':>14s}" + ("  vs teacher fp32" if vs_teacher else ""))
        for variant, v in res["variants"].items():
            line = f"  {variant:38s} {v['p50_ms']:9.1f} {v['p95_ms']:9.1f} {v['speedup']:13.2f}x"
            print(line + (f" {v['speedup_vs_teacher_fp32']:16.2f}x" if vs_teacher else ""))
        for note in res.get("notes", []):
            print(f"  note: {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
