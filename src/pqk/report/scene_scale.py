"""The report's scene-scale section: how DUSt3R's time and memory grow with the number of views,
with and without the encoder-token cache, the compressed caches and the cascade, from the JSON
that benchmarks/scene_scale.py writes (the measurements are that script's; this module reads,
judges and draws them).

`pqk report RUN_DIR` adds the section when RUN_DIR holds scene_scale.json (or `--scene-scale
FILE` names one)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from pqk.errors import InputError
from pqk.report.plots import _pyplot
from pqk.report.tables import Table

SECTION_TITLE = "Scene scale: encoder cache, compressed cache, cascade"
FILE_NAME = "scene_scale.json"
FIGURE = "scene_scale.png"


def load_scene_scale(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"scene-scale results {path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict) or "platform" not in data:
        raise InputError(f"{path} is not a benchmarks/scene_scale.py result (no 'platform')")
    return data


def share_check(report: dict) -> dict | None:
    """The cut the cache gives on the 32-view swin-4 scene against the cut the encoder's share of
    a pair predicts: uncached, 2P encoder calls; cached, V; so the time falls by
    share x (1 - V / 2P)."""
    rows = {(r["graph"], r["views"], r["cache"]): r for r in report.get("growth", [])}
    swin = swin_graph(report)
    plain, cached = rows.get((swin, 32, "none")), rows.get((swin, 32, "fp"))
    if not plain or not cached or "share" not in report:
        return None
    s = report["share"]["encoder_share"]
    predicted = s * (1 - cached["views"] / (2 * cached["n_pairs"]))
    measured = 1 - cached["t_infer_s"] / plain["t_infer_s"]
    gap = abs(measured - predicted) / predicted
    return {"encoder_share": s, "predicted_cut": predicted, "measured_cut": measured, "relative_gap": gap,
            "within_20_percent": gap <= 0.2}


def swin_graph(report: dict) -> str:
    """The sliding-window graph the benchmark ran (swin-4 noncyclic by default)."""
    return report.get("swin_graph", "swin-4")


def within_one_percent(point: dict, full: dict) -> bool:
    """Scene quality kept: Chamfer (per scene) at most 1 % above the full model's and δ1 (per
    pair) at most 1 % below it. Chamfer alone is not enough: after the Sim(3) fit it can come out
    lower for a worse set of pairs (measured: the half-resolution draft alone on 4 and 8 views)."""
    return point["chamfer"] <= 1.01 * full["chamfer"] and point["delta1"] >= 0.99 * full["delta1"]


def operating_point(cascade: dict) -> dict | None:
    """The fastest threshold that keeps scene quality within 1 % (`within_one_percent`)."""
    ok = [p for p in cascade["points"] if within_one_percent(p, cascade["full"])]
    if not ok:
        return None
    best = min(ok, key=lambda p: p["t_infer_s"])
    return {**best, "inference_speedup": cascade["full"]["t_infer_s"] / best["t_infer_s"],
            "scene_speedup": cascade["full"]["t_scene_s"] / best["t_scene_s"]}


def _f(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def growth_table(report: dict) -> Table:
    rows = [[r["graph"], str(r["views"]), str(r["n_pairs"]), r["cache"], _f(r["t_infer_s"], ".1f"), _f(r["t_ga_s"], ".1f"),
             _f(r["t_scene_s"], ".1f"), str(r["encoded_views"]), _f(r.get("cache_MB"), ".1f"), _f(r["peak_rss_MB"], ".0f"),
             _f(r["chamfer"], ".4f"), _f(r["delta1"], ".4f")]
            for r in sorted(report.get("growth", []) + report.get("codecs", []),
                            key=lambda r: (r["graph"] != swin_graph(report), r["views"], r["cache"]))]
    return Table(["graph", "views", "pairs", "cache", "inference (s)", "global alignment (s)", "t_scene (s)",
                  "encoder calls", "cache (MB)", "peak memory (MB)", "Chamfer ↓", "δ1 ↑"], rows,
                 [False, True, True, False] + [True] * 8,
                 caption=f"Scene time and memory vs views (embedded teacher, 512×384, global alignment "
                         f"{report.get('ga_niter', 300)} iterations at stride {report.get('stride', 4)})")


def folder_table(report: dict) -> Table | None:
    rows = [[r["folder"], r["graph"], str(r["views"]), str(r["n_pairs"]), r["cache"], _f(r["t_infer_s"], ".1f"),
             _f(r["t_ga_s"], ".1f"), _f(r.get("cache_MB"), ".1f"), _f(r["peak_rss_MB"], ".0f")] for r in report.get("folder", [])]
    if not rows:
        return None
    return Table(["folder", "graph", "images", "pairs", "cache", "inference (s)", "global alignment (s)", "cache (MB)",
                  "peak memory (MB)"], rows, [False, False] + [True] * 2 + [False] + [True] * 4,
                 caption="Your images (no ground truth: time and memory only)")


def ga_table(report: dict) -> Table | None:
    rows = []
    for r in report.get("growth", []):
        for v in r.get("ga_variants", []):
            if not rows:
                rows.append([f"{r['views']} views, {r['graph']}", "300", "4", _f(r["t_ga_s"], ".1f"), _f(r["chamfer"], ".4f")])
            rows.append([f"{r['views']} views, {r['graph']}", str(v["niter"]), str(v["ga_stride"]), _f(v["t_ga_s"], ".1f"),
                         _f(v["chamfer"], ".4f")])
    if not rows:
        return None
    return Table(["scene", "iterations", "stride (px)", "global alignment (s)", "Chamfer ↓"], rows,
                 [False, True, True, True, True], caption="Cheaper global alignments of the same pairs")


def cascade_table(report: dict) -> Table | None:
    c = report.get("cascade")
    if not c:
        return None
    full = c["full"]
    rows = [["full model", "1.00", _f(full["t_infer_s"], ".1f"), _f(full["t_scene_s"], ".1f"), _f(full["chamfer"], ".4f"),
             _f(full["delta1"], ".4f"), "—"]]
    for p in c["points"]:
        rows.append([f"draft + verify < {p['threshold']:.4g}", f"{p['verify_fraction']:.2f}", _f(p["t_infer_s"], ".1f"),
                     _f(p["t_scene_s"], ".1f"), _f(p["chamfer"], ".4f"), _f(p["delta1"], ".4f"),
                     "yes" if within_one_percent(p, full) else "no"])
    return Table(["run", "pairs verified", "inference (s)", "t_scene (s)", "Chamfer ↓", "δ1 ↑", "within 1 %"], rows,
                 [False] + [True] * 5 + [False],
                 caption=f"Cascade on {c['views']} views ({c['graph']}): half-resolution draft, full model on the least confident pairs")


def sentences(report: dict) -> list[str]:
    said = []
    p = report.get("platform", {})
    said.append(f"Measured by `{report.get('command', 'python benchmarks/scene_scale.py')}` on {p.get('cpu')} "
                f"({p.get('isa')}), torch {p.get('torch')}, {p.get('date')}.")
    check = report.get("share_check") or share_check(report)
    if check:
        said.append(f"Encoder share of a pair: {check['encoder_share']:.3f}; on 32 views ({swin_graph(report)}) the cache should cut "
                    f"inference by {100 * check['predicted_cut']:.1f} % and cut it by {100 * check['measured_cut']:.1f} % "
                    f"(gap {100 * check['relative_gap']:.0f} % of the prediction; "
                    f"{'within' if check['within_20_percent'] else 'outside'} 20 %).")
    c = report.get("cascade")
    if c:
        op = c.get("operating_point") or operating_point(c)
        if op:
            said.append(f"Cascade operating point (within 1 % on Chamfer and δ1): {100 * op['verify_fraction']:.0f} % of the "
                        f"pairs verified, inference {op['inference_speedup']:.2f}× and whole scene {op['scene_speedup']:.2f}× "
                        "the full model's speed.")
        else:
            said.append("Cascade: no threshold short of verifying every pair keeps scene quality within 1 %.")
        if "spearman_score_vs_draft_absrel" in c:
            said.append(f"Draft confidence vs the draft's own depth error per pair: Spearman "
                        f"{c['spearman_score_vs_draft_absrel']:+.2f}; vs what the full model gains on the pair: "
                        f"{c['spearman_score_vs_absrel_gain']:+.2f} (negative = low confidence where it matters).")
    return said


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a part not run leaves an empty panel, without a legend warning
        ax.legend(fontsize=7)


def plot(report: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    growth = report.get("growth", [])
    ax = axes[0]
    for graph, marker in ((swin_graph(report), "o"), ("complete", "s")):
        for cache, style in (("none", "--"), ("fp", "-")):
            rows = sorted((r for r in growth if r["graph"] == graph and r["cache"] == cache), key=lambda r: r["views"])
            if rows:
                label = f"{graph}, {'no cache' if cache == 'none' else 'cache'}: inference"
                ax.plot([r["views"] for r in rows], [r["t_infer_s"] for r in rows], style, marker=marker, label=label)
        rows = sorted((r for r in growth if r["graph"] == graph and r["cache"] == "fp"), key=lambda r: r["views"])
        if rows:
            ax.plot([r["views"] for r in rows], [r["t_ga_s"] for r in rows], ":", marker=marker, label=f"{graph}: global alignment")
    ax.set(xscale="log", yscale="log", xlabel="views", ylabel="seconds", title="time vs scene size")
    _legend(ax)
    ax = axes[1]
    for cache, marker in (("none", "x"), ("fp", "o"), ("int8", "^"), ("1bit", "v")):
        rows = sorted((r for r in growth + report.get("codecs", []) if r["graph"] == swin_graph(report) and r["cache"] == cache),
                      key=lambda r: r["views"])
        if rows:
            ax.plot([r["views"] for r in rows], [r["peak_rss_MB"] for r in rows], marker=marker, label=f"cache {cache}")
    ax.set(xscale="log", xlabel=f"views ({swin_graph(report)})", ylabel="peak resident memory (MB)", title="memory vs scene size")
    _legend(ax)
    ax = axes[2]
    c = report.get("cascade")
    if c:
        pts = c["points"]
        ax.plot([p["t_infer_s"] for p in pts], [p["chamfer"] for p in pts], "o-", label="Chamfer (left)")
        for p in pts:
            ax.annotate(f"{p['verify_fraction']:.2f}", (p["t_infer_s"], p["chamfer"]), fontsize=7)
        ax.axhline(c["full"]["chamfer"] * 1.01, color="grey", ls=":", label="full model +1 %")
        ax.plot([c["full"]["t_infer_s"]], [c["full"]["chamfer"]], "k*", ms=10, label="full model")
        ax.set(xlabel=f"inference seconds ({c['views']} views, {c['graph']})", ylabel="Chamfer",
               title="cascade (labels: share of pairs verified)")
        ax.legend(fontsize=7, loc="upper right")
        ax2 = ax.twinx()
        ax2.plot([p["t_infer_s"] for p in pts], [p["delta1"] for p in pts], "s--", color="tab:green", label="δ1 (right)")
        ax2.axhline(c["full"]["delta1"] * 0.99, color="tab:green", ls=":", lw=0.8, label="full model δ1 −1 %")
        ax2.set_ylabel("δ1 of the pairs")
        ax2.legend(fontsize=7, loc="lower right")
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_text(report: dict) -> str:
    """Plain-text tables for the terminal."""
    lines = list(sentences(report))
    for table in (growth_table(report), folder_table(report), ga_table(report), cascade_table(report)):
        if table is not None and table.rows:
            lines += ["", table.caption, table.markdown()]
    return "\n".join(lines)


def scene_scale_section(report: dict, folder: Path, files: dict | None = None) -> tuple[str, str, str, list[str]]:
    """(Markdown, LaTeX, HTML, notes) of the section; the figure is written into `folder`."""
    from pqk.report.build import _img

    figure = plot(report, Path(folder) / FIGURE)
    if files is not None:
        files[FIGURE] = figure
    tables = [t for t in (growth_table(report), folder_table(report), ga_table(report), cascade_table(report)) if t is not None]
    said = sentences(report)
    md = [*(f"- {s}" for s in said), "", f"![scene scale]({FIGURE})", ""]
    htm = ["<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in said) + "</ul>", _img(figure, "scene scale")]
    tex = ["% scene scale (booktabs)"]
    for k, t in enumerate(tables):
        md += [f"**{t.caption}**\n", t.markdown()]
        htm.append(t.html())
        tex.append(t.latex(f"tab:scene-scale-{k}"))
    return "\n".join(md), "\n".join(tex), "\n".join(htm), []
