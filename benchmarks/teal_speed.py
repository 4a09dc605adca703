"""Can TEAL's activation sparsity make a DUSt3R Linear faster on this CPU?

Per Linear shape of the full-size DUSt3R (ViT-L encoder, ViT-B decoder, 512x384: 768 tokens a
view), times y = x Wᵀ + b for one view, interleaved round-robin (every variant once per round,
median over rounds) at 25 / 40 / 50 % sparsity:

  dense fp32            F.linear, the reference
  (a) unstructured      SparseInputLinear: x * (|x| > t), then the same dense GEMM
  (b) sparse kernels    torch's own: the masked x as CSR @ Wᵀ, addmm(b, CSR, Wᵀ contiguous) and
                        torch.sparse.mm(COO, Wᵀ), each including the conversion (x changes
                        every call); on --sparse-shapes only (default: encoder fc1), they are slow
  (c) structured        SparseInputLinear(structured): per-view channel means, gather the kept
                        channels of x and W, a smaller dense GEMM
  (d) with INT8         Int8Linear (oneDNN, per-channel int8 weights) dense, with the unstructured
                        mask (pqk's INT8 runtime of a TEAL model), and on the gathered channels:
                        weight gathered and prepacked once (a lower bound) and per call (what a
                        per-view channel set costs)

x has log-normal per-channel scales (real activations have a few loud channels) so that the
structured threshold drops exactly the target share of channels. Prints one table per shape and
the Linear time of one pair (each shape times its calls per pair), writes --json.

    python benchmarks/teal_speed.py --threads 2 --rounds 5 --json benchmarks/results/teal_speed.json
    python benchmarks/teal_speed.py --shapes enc.fc1,dec.fc1 --sparse-shapes all --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pqk.backends.torch_int8 import Int8Linear, onednn_int8_available
from pqk.measure.latency import interleaved_latency
from pqk.measure.machine import Contention, isa_label, machine_info
from pqk.methods.teal import SparseInputLinear

TOKENS = 768  # 512x384 / 16²
# name: (in, out, calls per pair): encoder blocks run both views (24 blocks x 2), the decoders
# one view each (12 blocks x 2 decoders); 768->768 are self proj, cross projq/k/v and proj.
SHAPES = {
    "enc.qkv": (1024, 3072, 48), "enc.proj": (1024, 1024, 48), "enc.fc1": (1024, 4096, 48), "enc.fc2": (4096, 1024, 48),
    "dec.qkv": (768, 2304, 24), "dec.proj": (768, 768, 120), "dec.fc1": (768, 3072, 24), "dec.fc2": (3072, 768, 24),
}
SPARSITIES = (0.25, 0.4, 0.5)


def make_layer(n_in: int, n_out: int, seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out).eval().requires_grad_(False)
    x = torch.randn(1, TOKENS, n_in, generator=gen) * torch.exp(0.7 * torch.randn(n_in, generator=gen))
    return linear, x


def int8_of(linear: torch.nn.Linear, x: torch.Tensor, threshold: float = 0.0) -> Int8Linear:
    """Int8Linear with symmetric per-output-channel weights and x's asymmetric uint8 range."""
    w = linear.weight
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_scale = (hi - lo) / 255
    return Int8Linear(torch.round(w / scale[:, None]).to(torch.int8), scale, linear.bias, x_scale,
                      int(round(-lo / x_scale)), input_threshold=threshold)


def shape_calls(name: str, sparse_kernels: bool, with_int8: bool) -> dict:
    n_in, n_out, _ = SHAPES[name]
    linear, x = make_layer(n_in, n_out, seed=list(SHAPES).index(name))
    w, b = linear.weight, linear.bias
    wt = w.t().contiguous()
    calls = {"dense fp32": lambda: F.linear(x, w, b)}
    int8 = int8_of(linear, x) if with_int8 else None
    if int8 is not None:
        calls["int8 dense"] = lambda: int8(x)
    for s in SPARSITIES:
        pct = f"{round(100 * s)}%"
        t_entry = float(x.abs().flatten().quantile(s))
        t_channel = float(x.abs().mean(dim=1).flatten().quantile(s))
        unstructured = SparseInputLinear.from_linear(linear, t_entry)
        structured = SparseInputLinear.from_linear(linear, t_channel, structured=True)
        calls[f"(a) mask + dense {pct}"] = lambda m=unstructured: m(x)
        if sparse_kernels:
            masked = x[0] * (x[0].abs() > t_entry)
            calls[f"(b) csr @ Wt {pct}"] = lambda m=masked: m.to_sparse_csr() @ w.t()
            calls[f"(b) addmm csr {pct}"] = lambda m=masked: torch.addmm(b, m.to_sparse_csr(), wt)
            calls[f"(b) sparse.mm coo {pct}"] = lambda m=masked: torch.sparse.mm(m.to_sparse(), wt)
        calls[f"(c) structured gather {pct}"] = lambda m=structured: m(x)
        if int8 is not None:
            idx = (x[0].abs().mean(0) > t_channel).nonzero().squeeze(1)
            gathered = Int8Linear(int8.weight_int8.index_select(1, idx), int8.weight_scale, b, int8.input_scale,
                                  int8.input_zero_point)
            masked8 = int8_of(linear, x, t_entry)
            calls[f"(d) int8 + mask {pct}"] = lambda m=masked8: m(x)
            calls[f"(d) int8 gathered, prepacked once {pct}"] = lambda g=gathered, i=idx: g(x.index_select(-1, i))
            calls[f"(d) int8 gathered, prepack per call {pct}"] = lambda i=idx: Int8Linear(
                int8.weight_int8.index_select(1, i), int8.weight_scale, b, int8.input_scale, int8.input_zero_point,
            )(x.index_select(-1, i))
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default="all", help=f"comma-separated of {', '.join(SHAPES)} (default all)")
    parser.add_argument("--sparse-shapes", default="enc.fc1", help="shapes that also time torch's sparse kernels (or all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    sparse_shapes = set(SHAPES) if args.sparse_shapes == "all" else set(args.sparse_shapes.split(","))
    unknown = [s for s in shapes + sorted(sparse_shapes) if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]!r}; accepted: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with_int8 = onednn_int8_available()
    print(f"TEAL Linear speed, {TOKENS} tokens, {args.threads} threads, {args.rounds} rounds; {isa_label()}")
    rows, started = [], time.perf_counter()
    with Contention() as contention, torch.inference_mode():
        for name in shapes:
            n_in, n_out, per_pair = SHAPES[name]
            timed = interleaved_latency(shape_calls(name, name in sparse_shapes, with_int8), rounds=args.rounds,
                                        warmup=1, reference="dense fp32")["variants"]
            print(f"\n{name} ({n_in}->{n_out}, {per_pair} calls a pair)")
            print(f"  {'variant':44s} {'p50 ms':>9s} {'vs dense':>9s}")
            for variant, t in timed.items():
                print(f"  {variant:44s} {t['p50_ms']:9.2f} {t['speedup']:8.2f}x")
                rows.append({"shape": name, "in": n_in, "out": n_out, "calls_per_pair": per_pair, "variant": variant,
                             "p50_ms": round(t["p50_ms"], 3), "p95_ms": round(t["p95_ms"], 3),
                             "speedup": round(t["speedup"], 3)})
    # The Linears' time for one pair, per variant timed on every shape (each shape x its calls).
    per_pair = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) == len(shapes):
            per_pair[variant] = round(sum(r["p50_ms"] * r["calls_per_pair"] for r in mine), 1)
    dense = per_pair["dense fp32"]
    print(f"\nLinears of one pair ({', '.join(shapes)}):")
    for variant, ms in per_pair.items():
        print(f"  {variant:44s} {ms:9.0f} ms {dense / ms:8.2f}x")
    print(f"\n{time.perf_counter() - started:.0f} s; other processes took {contention.to_json()['others_share']} "
          f"of the cores{' (contended: ratios are indicative)' if contention.contended else ''}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "teal_speed", "tokens": TOKENS, "threads": args.threads, "rounds": args.rounds,
            "machine": machine_info(), "contention": contention.to_json(), "rows": rows, "per_pair_ms": per_pair,
            "median_speedups": {v: round(statistics.median(r["speedup"] for r in rows if r["variant"] == v), 3)
                                for v in per_pair},
        }, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
