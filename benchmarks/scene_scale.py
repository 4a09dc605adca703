"""Scene-scale DUSt3R on this CPU: how inference, global alignment and memory grow with the
number of views, and what the encoder-token cache, its compressed forms and the cascade buy.

Every configuration runs in a fresh subprocess (so its peak resident memory is its own) on a
generated orbit scene with exact ground truth, through the code `pqk infer` and `pqk eval` use
(pqk.recon.scene_run): all pairs of the graph, global alignment (300 iterations, cosine, at
stride 4, as the default workload), Chamfer against ground truth after a Sim(3) fit, and the
depth figures of view 1 of every pair (at the same stride). Parts:

  growth   swin-4 at 8/32/128 views, each without cache and with the exact (fp) cache, and
           complete at 8/16/32 (uncached up to 16): t_infer_s, t_ga_s, peak memory; at 128
           views also two cheaper global alignments of the same pairs (100 iterations; a
           stride-8 grid)
  share    the encoder's share of a pair (measured) against the cut the cache gives on the
           32-view swin-4 scene (the cache should cut inference by share x (1 - V / 2P))
  codecs   int8 / 1bit token caches at 32 views (fp from growth): cache bytes vs quality;
           int8 at 128 views for memory
  folder   (--folder DIR) your own images: time and memory without and with the caches
  cascade  32-view swin-4: a half-resolution draft on every pair, the full model on the pairs
           whose draft confidence is lowest, over a range of thresholds; the operating point
           is the cheapest one within 1 % of the full model (Chamfer and δ1)

    python benchmarks/scene_scale.py                   # everything (1 h 40 min on 2 cores)
    python benchmarks/scene_scale.py --parts growth --views 8 32
    python benchmarks/scene_scale.py --plot-only       # redraw the figure from the JSON

Writes benchmarks/results/scene_scale.json (one run, one file) and scene_scale.png beside it;
the judging (share check, cascade operating point) and the figure are pqk.report.scene_scale's,
which `pqk report RUN_DIR --scene-scale FILE` also puts in a plan's report.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from pqk.report.scene_scale import operating_point, plot, share_check, summary_text

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("growth", "share", "codecs", "cascade")
STRIDE = 4
SEED = 42


# --- one configuration, in its own process ---------------------------------------------------


def _setup(n_views: int, threads: int):
    import torch

    from pqk.assets import default_checkpoint
    from pqk.data.scenes import generate_scene
    from pqk.models.dust3r import load_checkpoint
    from pqk.tasks.dust3r.measure import scene_view

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    scene = generate_scene(SEED, n_views=n_views)
    model = load_checkpoint(default_checkpoint()[0]).eval()
    views = [scene_view(scene, i) | {"idx": i, "instance": str(i)} for i in range(n_views)]
    return scene, model, views


def _quality(run, scene, niter: int = 300, coarser: int = 1) -> dict:
    """Global alignment of `run` (at STRIDE x `coarser`), Chamfer and the pairs' depth figures."""
    from dataclasses import replace

    from pqk.recon.scene_run import GaSettings, align_scene
    from pqk.tasks.dust3r.measure import scene_chamfer, scene_pair_depth

    stride = STRIDE * coarser
    if coarser > 1:
        run = replace(run, results=[{**r, **{p: {k: v[::coarser, ::coarser].clone() for k, v in r[p].items()}
                                             for p in ("pred1", "pred2")}} for r in run.results])
    align_scene(run, GaSettings(niter=niter, seed=SEED))
    depth = scene_pair_depth(run.results, scene, stride)
    return {**scene_chamfer(run.aligned.pts3d, scene, stride), "absrel": depth["absrel"], "delta1": depth["delta1"],
            "t_ga_s": run.t_ga_s, "ga_final_loss": run.aligned.final_loss}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _folder_setup(folder: str, threads: int):
    """A user's image folder (no ground truth: time and memory only)."""
    import torch

    from pqk.assets import default_checkpoint
    from pqk.data.images import load_images
    from pqk.models.dust3r import load_checkpoint

    torch.set_num_threads(threads)
    views = load_images(folder, size=512)
    return None, load_checkpoint(default_checkpoint()[0]).eval(), views


def one(config: dict) -> dict:
    """growth / codecs: one scene (generated, or a user's folder), one graph, one cache."""
    from pqk.recon.scene_run import GaSettings, align_scene, infer_scene

    start = time.perf_counter()
    if "folder" in config:
        scene, model, views = _folder_setup(config["folder"], config["threads"])
        config = {**config, "views": len(views)}
    else:
        scene, model, views = _setup(config["views"], config["threads"])
    setup_s = time.perf_counter() - start
    base_mb = _peak_mb()
    run = infer_scene(views, model, config["graph"], cache=config["cache"], stride=STRIDE)
    summary = run.summary()
    if scene is None:
        align_scene(run, GaSettings(niter=config.get("ga_niter", 300), seed=SEED))
        return {**config, **summary, "t_ga_s": run.t_ga_s, "t_scene_s": run.t_scene_s,
                "ga_final_loss": run.aligned.final_loss, "peak_rss_MB": _peak_mb(), "setup_s": time.perf_counter() - start}
    quality = _quality(run, scene, config.get("ga_niter", 300))
    peak = _peak_mb()  # the scene's own peak, before the extra alignments below
    # cheaper global alignments of the same pairs: fewer iterations, or a coarser pixel grid
    variants = [{"niter": niter, "ga_stride": STRIDE * coarser, **_quality(run, scene, niter, coarser)}
                for niter, coarser in config.get("ga_variants", [])]
    return {**config, **summary, **quality, "t_scene_s": summary["t_infer_s"] + quality["t_ga_s"],
            "ga_variants": variants, "peak_rss_MB": peak, "rss_after_setup_MB": base_mb, "setup_s": setup_s}


def share(config: dict) -> dict:
    """The encoder's share of one pair's forward, timed directly (median of interleaved rounds)."""
    import statistics

    import torch

    from pqk.models.dust3r.model import true_shape_of

    scene, model, views = _setup(2, config["threads"])
    v1, v2 = views
    enc, full = [], []
    with torch.inference_mode():
        for _ in range(3):
            model(v1, v2)
        for _ in range(config["rounds"]):
            t = time.perf_counter()
            model.encode_image(v1["img"], true_shape_of(v1))
            model.encode_image(v2["img"], true_shape_of(v2))
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            model(v1, v2)
            full.append(time.perf_counter() - t)
    e, f = statistics.median(enc), statistics.median(full)
    return {**config, "encode_two_views_ms": 1000 * e, "pair_ms": 1000 * f, "encoder_share": e / f}


def cascade(config: dict) -> dict:
    """The full model once (exact cache), the draft once, then verification at each threshold."""
    import numpy as np

    from pqk.cascade import LowResolutionDraft, pair_confidence, verify
    from pqk.inference import EncoderCache
    from pqk.recon.scene_run import SceneRun, infer_scene

    scene, model, views = _setup(config["views"], config["threads"])
    full = infer_scene(views, model, config["graph"], cache="fp", stride=STRIDE)
    niter = config.get("ga_niter", 300)
    full_q = _quality(full, scene, niter)
    draft_model = LowResolutionDraft(model, 2)
    drafted = infer_scene(views, draft_model, config["graph"], cache="fp", stride=STRIDE)
    from scipy.stats import spearmanr

    from pqk.tasks.dust3r.measure import scene_pair_depth

    raw = [pair_confidence(r) for r in drafted.results]
    errors = [scene_pair_depth([r], scene, STRIDE)["absrel"] for r in drafted.results]
    full_errors = [scene_pair_depth([r], scene, STRIDE)["absrel"] for r in full.results]
    scores = sorted(raw)
    pairs = [(views[i], views[j]) for i, j in drafted.pairs]
    points = []
    for fraction in config["fractions"]:
        k = round(fraction * len(scores))
        threshold = 1.0 if k == 0 else (math.inf if k >= len(scores) else float(np.nextafter(scores[k - 1], np.inf)))
        run = verify(pairs, drafted.results, model, threshold, t_draft_s=drafted.t_infer_s,
                     cache=EncoderCache(model, "cpu", "fp"), reduce=lambda t: t[::STRIDE, ::STRIDE])
        merged = SceneRun(n_views=len(views), pairs=drafted.pairs, results=run.results,
                          t_infer_s=drafted.t_infer_s + run.t_verify_s, verified_pairs=run.verified,
                          t_draft_s=drafted.t_infer_s)
        q = _quality(merged, scene, niter)
        points.append({"verify_fraction": len(run.verified) / len(pairs), "threshold": threshold,
                       "t_infer_s": merged.t_infer_s, "t_scene_s": merged.t_infer_s + q["t_ga_s"], **q})
    gain = [d - f for d, f in zip(errors, full_errors)]
    return {**config, "full": {**full.summary(), **full_q, "t_scene_s": full.t_infer_s + full_q["t_ga_s"]},
            "draft_t_infer_s": drafted.t_infer_s, "points": points, "peak_rss_MB": _peak_mb(),
            # does a low draft confidence point at the pairs the draft gets wrong, or that the full model fixes?
            "spearman_score_vs_draft_absrel": float(spearmanr(raw, errors).statistic),
            "spearman_score_vs_absrel_gain": float(spearmanr(raw, gain).statistic)}


WORKERS = {"one": one, "share": share, "cascade": cascade}


# --- the driver --------------------------------------------------------------------------------


_EXTRA: dict = {}  # settings every configuration of this run shares (e.g. ga_niter)


def _spawn(kind: str, config: dict) -> dict:
    config = {**config, **_EXTRA}
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(config)]
    print(f"  {kind} {json.dumps(config)}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ("t_infer_s", "t_ga_s", "peak_rss_MB", "chamfer", "encoder_share")
    print("    " + ", ".join(f"{k} {result[k]:.3g}" for k in keys if isinstance(result.get(k), (int, float))), flush=True)
    return result


def _growth(args) -> list[dict]:
    rows = []
    largest = max(args.views)
    for n in args.views:
        for cache in ("none", "fp"):
            config = {"views": n, "graph": args.graph, "cache": cache, "threads": args.threads}
            if n == largest and cache == "fp":
                config["ga_variants"] = [[100, 1], [300, 2]]
            rows.append(_spawn("one", config))
    # the complete graph has V(V-1) pairs: the uncached loop only where it is affordable
    for n in args.complete_views:
        for cache in ("none", "fp") if n <= args.max_uncached_complete else ("fp",):
            rows.append(_spawn("one", {"views": n, "graph": "complete", "cache": cache, "threads": args.threads}))
    return rows


def _codecs(args) -> list[dict]:
    rows = [_spawn("one", {"views": n, "graph": args.graph, "cache": cache, "threads": args.threads})
            for n in args.codec_views for cache in ("int8", "1bit")]
    if args.codec_memory_views:
        rows.append(_spawn("one", {"views": args.codec_memory_views, "graph": args.graph, "cache": "int8", "threads": args.threads}))
    return rows


def _platform() -> dict:
    import platform

    import torch

    from pqk.measure.machine import isa_label, machine_info

    return {"cpu": machine_info().get("cpu"), "isa": isa_label(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--graph", default="swin-4-noncyclic",
                        help="The sliding-window graph (the generated cameras orbit on an open arc: a cyclic window would "
                        "pair the first and last views, which barely overlap).")
    parser.add_argument("--views", nargs="+", type=int, default=[8, 32, 128], help="Scene sizes of the growth part.")
    parser.add_argument("--complete-views", nargs="+", type=int, default=[8, 16, 32],
                        help="Scene sizes run with the complete graph (V(V-1) pairs).")
    parser.add_argument("--max-uncached-complete", type=int, default=16,
                        help="Largest complete-graph scene also run without the cache.")
    parser.add_argument("--codec-views", nargs="+", type=int, default=[32])
    parser.add_argument("--codec-memory-views", type=int, default=128,
                        help="Scene size run with the int8 cache for memory (0: skip).")
    parser.add_argument("--cascade-views", type=int, default=32)
    parser.add_argument("--folder", type=Path, help="Also run your own images (a folder, sorted by name; no ground truth: "
                        "time and memory only), without cache and with the fp and int8 caches.")
    parser.add_argument("--ga-niter", type=int, default=300,
                        help="Global-alignment iterations (the workload's default 300; 100 measured as good at 128 views).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scene_scale.json")
    parser.add_argument("--plot-only", action="store_true", help="Redraw the figure from --out.")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, config = args.worker
        print(json.dumps(WORKERS[kind](json.loads(config))))
        return 0
    if args.ga_niter != 300:
        _EXTRA["ga_niter"] = args.ga_niter
    if not args.plot_only:
        report = {"platform": _platform(), "stride": STRIDE, "seed": SEED, "swin_graph": args.graph, "ga_niter": args.ga_niter,
                  "command": "python benchmarks/scene_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        if "growth" in args.parts:
            print("growth", flush=True)
            report["growth"] = _growth(args)
        if "share" in args.parts:
            print("encoder share", flush=True)
            report["share"] = _spawn("share", {"threads": args.threads, "rounds": 15})
            report["share_check"] = share_check(report)
        if args.folder is not None:
            print(f"folder {args.folder}", flush=True)
            report["folder"] = [_spawn("one", {"folder": str(args.folder), "graph": args.graph, "cache": cache,
                                               "threads": args.threads}) for cache in ("none", "fp", "int8")]
        if "codecs" in args.parts:
            print("codecs", flush=True)
            report["codecs"] = _codecs(args)
        if "cascade" in args.parts:
            print("cascade", flush=True)
            report["cascade"] = _spawn("cascade", {"views": args.cascade_views, "graph": args.graph, "threads": args.threads,
                                                   "fractions": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]})
            report["cascade"]["operating_point"] = operating_point(report["cascade"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    report = json.loads(args.out.read_text())
    plot(report, args.out.with_suffix(".png"))
    print(summary_text(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
