"""The report's CMAPKD section (seed 004 §5.2-5.4, §6): Tables 2-5 from the `cmapkd` method's
records (seeds aggregated: mean ± sample std when a run has two or more), Figures 3-6 from the
`figures` data the method writes into the CMAPKD run's eval JSON (details.step.figures)."""

from __future__ import annotations

import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqk.report.plots import _pyplot
from pqk.report.rundata import finite
from pqk.report.tables import Table, latex_escape

SECTION_TITLE = "CMAPKD (seed 004): Tables 2–5, Figures 3–6"
OBJECTIVES = ("cmapkd", "scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd")
# Table 2's order, as the seed's: the baselines, then the method last
MAIN_RUNS = ("Scratch", "KD", "FitNet", "CLIP-KD", "PromptKD", "C2KD", "LLaVA-KD", "CMAPKD")
ABLATIONS = {  # run -> (Table 4's variant, what it removes)
    "noVP": ("w/o Visual Pyramid", "the visual pyramid: P5 only"),
    "noLH": ("w/o Language Hierarchy", "the language hierarchy: L4 only"),
    "ALSN-uniform": ("w/o ALSN (uniform)", "ALSN: fixed uniform level weights"),
    "ALSN-manual": ("w/o ALSN (manual)", "ALSN: fixed manual weights [0.1, 0.2, 0.3, 0.4]"),
    "noAlign": ("w/o Cross-Modal Align", "L_align: intra-modal distillation only"),
    "noRelation": ("w/o Relation Distill", "L_relation: no relational distillation"),
    "OneStage": ("One-stage training", "the progressive schedule: all levels trained at once"),
}
_TAGS = {name.replace("-", "").replace("_", ""): name for name in (*MAIN_RUNS, *ABLATIONS)}
_EXP_ID = re.compile(r"^K_(?P<tag>[A-Za-z0-9]+)(?:_s(?P<seed>-?\d+))?_run\d+$")
VISUAL, LANGUAGE = ("P2", "P3", "P4", "P5"), ("L1", "L2", "L3", "L4")
_FIXED = {"params_M", "flops_G", "size_MB"}  # the student's architecture: the same for every seed, no ± in cells
_RECALLS = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i")


@dataclass
class CmapkdRow:
    """One run (CMAPKD, Scratch, an ablation, ...) over its seeds, in seed order."""
    run: str
    members: list[tuple[int | None, Any, dict]] = field(default_factory=list)  # (seed, record, details.step)

    @property
    def seeds(self) -> list[int | None]:  # None: a record whose seed nothing says
        return [s for s, _, _ in self.members]

    def values(self, key: str) -> list[float]:
        return [v for _, r, _ in self.members if (v := finite(getattr(r, key, None))) is not None]

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None

    def std(self, key: str) -> float | None:
        """The sample standard deviation (n − 1) over seeds; None below two values."""
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) >= 2 else None

    def cell(self, key: str, spec: str = ".3f") -> str:
        m, s = self.mean(key), (None if key in _FIXED else self.std(key))
        return "—" if m is None else f"{m:{spec}}" + ("" if s is None else f" ± {s:{spec}}")

    def label(self) -> str:
        return self.run + (f" (n={len(self.members)})" if len(self.members) >= 2 else "")


def _eval_payload(run_dir: Path, exp_id: str) -> Any:
    from pqk.pipeline.record import record_file_name

    name = record_file_name(exp_id)
    for path in [run_dir / name] if (run_dir / name).is_file() else sorted(run_dir.rglob(name)):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def _identify(rec: Any, step: Any) -> tuple[str, int | None] | None:
    """(run, seed) of a cmapkd record: details.step's run/seed, else the exp_id K_<tag>[_s<seed>]_run<k>."""
    m = _EXP_ID.match(str(rec.exp_id))
    parsed_seed = int(m.group("seed")) if m and m.group("seed") else None
    if isinstance(step, dict) and step.get("run") and step.get("objective") in OBJECTIVES:
        seed = step.get("seed")
        return str(step["run"]), seed if isinstance(seed, int) and not isinstance(seed, bool) else parsed_seed
    if m and m.group("tag") in _TAGS:
        return _TAGS[m.group("tag")], parsed_seed
    return None


def cmapkd_rows(run_dir: str | Path, records: list, evals: dict[str, dict] | None = None) -> list[CmapkdRow]:
    """The cmapkd records by run, seeds ascending (a seed seen twice counts once); `evals`: exp_id -> eval
    JSON (else read from run_dir). Order: Table 2's runs (CMAPKD last, other runs before it), the ablations."""
    groups: dict[str, CmapkdRow] = {}
    for rec in records:
        payload = evals.get(rec.exp_id) if evals is not None else _eval_payload(Path(run_dir), rec.exp_id)
        details = payload.get("details") if isinstance(payload, dict) else None
        step = details.get("step") if isinstance(details, dict) else None
        run, seed = _identify(rec, step) or (None, None)
        row = groups.setdefault(run, CmapkdRow(run)) if run is not None else None
        if row is not None and (seed is None or seed not in row.seeds):
            row.members.append((seed, rec, step if isinstance(step, dict) else {}))
    for row in groups.values():
        row.members.sort(key=lambda m: (m[0] is not None, m[0] or 0))
    rank = {name: k for k, name in enumerate((*MAIN_RUNS[:-1], "", MAIN_RUNS[-1], *ABLATIONS))}
    return sorted(groups.values(), key=lambda r: rank.get(r.run, rank[""]))


# --- Tables 2-5 --------------------
def _main(rows: list[CmapkdRow], teacher: Any) -> list[CmapkdRow]:
    """The teacher (a one-member row), then Table 2's runs: the rows that are no ablation."""
    head = [CmapkdRow("Teacher", [(None, teacher, {})])] if teacher is not None else []
    return head + [r for r in rows if r.run not in ABLATIONS]


def _method_table(rows: list[CmapkdRow], teacher: Any, cols: list[tuple[str, str, str]], caption: str) -> Table:
    """Method | one column per (key, header, format)."""
    body = [[r.label(), *(r.cell(k, f) for k, _, f in cols)] for r in _main(rows, teacher)]
    return Table(["Method", *(h for _, h, _ in cols)], body, [False] + [True] * len(cols), caption=caption)


_SEEDS_NOTE = "mean ± sample std (n − 1) over seeds where n ≥ 2"


def table2(rows: list[CmapkdRow], teacher: Any) -> Table:
    heads = ("I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10")
    cols = [("params_M", "Params (M)", ".2f"), *((k, h, ".3f") for k, h in zip(_RECALLS, heads)), ("r_mean", "Avg", ".3f")]
    return _method_table(rows, teacher, cols, f"Table 2: image-text retrieval on the workload (fractions); {_SEEDS_NOTE}")


def table3(rows: list[CmapkdRow], teacher: Any) -> Table:
    cols = [("vqa_acc", "VQA overall", ".3f"), ("vqa_yesno", "VQA yes/no", ".3f"), ("vqa_number", "VQA number", ".3f"),
            ("vqa_other", "VQA other", ".3f"), ("zs_top1", "ZS top-1", ".3f")]
    return _method_table(rows, teacher, cols, f"Table 3: VQA and zero-shot classification (fractions); {_SEEDS_NOTE}")


def table4(rows: list[CmapkdRow], teacher: Any = None) -> Table:
    """The ablations beside the full method, with the component each removes."""
    by_run = {r.run: r for r in rows}
    full = by_run.get("CMAPKD")
    ref = full.mean("r1_i2t") if full else None
    entries = [(variant, by_run[run], removes) for run, (variant, removes) in ABLATIONS.items() if run in by_run]
    entries += [("Full CMAPKD (progressive)", full, "nothing (the complete method)")] if full is not None else []
    body = []
    for variant, r, removes in entries:
        m = r.mean("r1_i2t")
        delta = "—" if m is None or ref is None else f"{m - ref:+.3f}"
        body.append([variant, r.label(), r.cell("r1_i2t"), r.cell("r1_t2i"), r.cell("vqa_acc"), delta, removes])
    headers = ["Variant", "Run", "I→T R@1", "T→I R@1", "VQA acc", "Δ I→T R@1 vs full", "Removes"]
    latex = ["Variant", "Run", r"I$\rightarrow$T R@1", r"T$\rightarrow$I R@1", "VQA acc",
             r"$\Delta$ I$\rightarrow$T R@1", "Removes"]
    return Table(headers, body, [False, False, True, True, True, True, False], latex,
                 caption=f"Table 4: component ablations (fractions); {_SEEDS_NOTE}")


def table5(rows: list[CmapkdRow], teacher: Any) -> Table:
    """Efficiency; the reductions (parameters, image latency p50) are against the teacher record."""
    t_params, t_ms = finite(getattr(teacher, "params_M", None)), finite(getattr(teacher, "t_image_p50_ms", None))
    cols = [("params_M", ".2f"), ("flops_G", ".3g"), ("t_image_p50_ms", ".2f"), ("r1_i2t", ".3f")]
    body = []
    for r in _main(rows, teacher):
        p, ms, other = r.mean("params_M"), r.mean("t_image_p50_ms"), r.run != "Teacher"
        cut = f"{1 - p / t_params:.0%}" if other and p is not None and t_params else "—"
        speed = f"{t_ms / ms:.2f}×" if other and ms and t_ms is not None else "—"
        body.append([r.label(), *(r.cell(k, f) for k, f in cols), cut, speed])
    headers = ["Method", "Params (M)", "FLOPs (G)", "image p50 (ms)", "I→T R@1", "Params ↓", "Speed ↑"]
    return Table(headers, body, [False] + [True] * 6,
                 caption=f"Table 5: efficiency (batch 1); Params ↓ and Speed ↑ vs the teacher record; {_SEEDS_NOTE}")


def comparison(rows: list[CmapkdRow], keys: tuple[str, ...] = ("r1_i2t", "r1_t2i")) -> list[str]:
    """The main comparison in words: CMAPKD against every other Table 2 run that shares two or more
    of its seeds, per R@1 direction, paired by seed. CMAPKD "beats" a run when it is ahead on every
    shared seed, "trails" it when behind on every one, else the difference is within seed noise."""
    by_run = {r.run: r for r in rows}
    full = by_run.get("CMAPKD")
    if full is None:
        return []
    lines = []
    for other in (r for r in rows if r.run not in ABLATIONS and r.run != "CMAPKD"):
        theirs = {seed: rec for seed, rec, _ in other.members if seed is not None}
        pairs = [(rec, theirs[seed]) for seed, rec, _ in full.members if seed in theirs]
        if len(pairs) < 2:
            continue
        parts = []
        for key in keys:
            diffs = [a - b for rec, ref in pairs
                     if (a := finite(getattr(rec, key, None))) is not None and (b := finite(getattr(ref, key, None))) is not None]
            if len(diffs) < 2:
                continue
            mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            word = "beats" if min(diffs) > 0 else "trails" if max(diffs) < 0 else "is within seed noise of"
            name = "I→T R@1" if key == "r1_i2t" else "T→I R@1" if key == "r1_t2i" else key
            parts.append(f"{name} {mean:+.3f} ± {sd:.3f} (CMAPKD {word} {other.run})")
        if parts:
            lines.append(f"CMAPKD − {other.run} over {len(pairs)} paired seeds: " + "; ".join(parts))
    return lines


# --- Figures 3-6 --------------------
def _matrix(raw: Any, n_rows: int | None = None, width: int = 4) -> list[list[float]]:
    rows = [[float(x) for x in row] for row in raw]
    if any(len(row) != width or not all(map(math.isfinite, row)) for row in rows) or len(rows) != (n_rows or len(rows)):
        raise ValueError(f"{n_rows or 'n'} rows of {width} finite numbers expected, got {len(rows)} rows")
    return rows


def _bins(difficulty: list[float], most: int = 10) -> list[list[int]]:
    """Sample indices by difficulty: one bin per value when there are few, else equal-count bins."""
    order = sorted(range(len(difficulty)), key=lambda i: difficulty[i])
    unique = sorted(set(difficulty))
    if len(unique) <= most:
        return [[i for i in order if difficulty[i] == u] for u in unique]
    size = len(order) / most
    return [order[round(k * size): round((k + 1) * size)] for k in range(most)]


def _fig3(alsn: dict, path: Path) -> None:
    difficulty = [float(x) for x in alsn["difficulty"]]
    if not difficulty:
        raise ValueError("no samples")
    panels = [(_matrix(alsn["w_v"], len(difficulty)), VISUAL, "visual")]
    if alsn.get("w_l") is not None:
        panels.append((_matrix(alsn["w_l"], len(difficulty)), LANGUAGE, "language"))
    bins = _bins(difficulty)
    xs = [statistics.fmean(difficulty[i] for i in b) for b in bins]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (w, names, modality) in zip(axes[0], panels):
        for k, name in enumerate(names):
            ax.plot(xs, [statistics.fmean(w[i][k] for i in b) for b in bins], marker="o", label=name)
        ax.set(xlabel="sample difficulty (easy → hard), binned", ylabel=f"mean ALSN {modality} level weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 3: ALSN level weights vs sample difficulty\n" + str(alsn.get("difficulty_definition") or ""), fontsize=9)
    _save(plt, fig, path)


def _fig4(types: dict, path: Path) -> None:
    usable = {name: t for name, t in types.items() if isinstance(t, dict) and t.get("w_v") is not None}
    if not usable:
        raise ValueError("no sample type with weights")
    both = all(t.get("w_l") is not None for t in usable.values())
    panels = [("w_v", VISUAL, "visual levels")] + ([("w_l", LANGUAGE, "language levels")] if both else [])
    angles = [2 * math.pi * k / 4 for k in range(4)] + [0.0]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.4), dpi=110,
                             subplot_kw={"projection": "polar"}, squeeze=False)
    for ax, (key, names, title) in zip(axes[0], panels):
        for name, t in usable.items():
            w = _matrix([t[key]])[0]
            ax.plot(angles, w + w[:1], marker="o", label=f"{name} (n={t.get('n', '?')})")
            ax.fill(angles, w + w[:1], alpha=0.1)
        ax.set(xticks=angles[:4], xticklabels=names, rlabel_position=45)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"mean ALSN weight, {title}", fontsize=9, pad=14)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(usable)), fontsize=8)
    empty = [name for name in types if name not in usable]
    fig.suptitle("Fig. 4: ALSN weights per sample type" + (f" (no sample: {', '.join(empty)})" if empty else ""), fontsize=10)
    _save(plt, fig, path, rect=(0, 0.07, 1, 0.95))


def _fig5(tsne: dict, path: Path) -> None:
    points = _matrix(tsne["points"], width=2)
    models, levels = [str(m) for m in tsne["model"]], [int(x) for x in tsne["level"]]
    if not points or len(models) != len(points) or len(levels) != len(points):
        raise ValueError("points, model and level differ in length")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    for model, marker in (("teacher", "o"), ("student", "^")):
        for level, color in enumerate(("tab:blue", "tab:orange", "tab:green", "tab:red")):
            idx = [i for i in range(len(points)) if models[i] == model and levels[i] == level]
            if idx:
                ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], s=18, marker=marker,
                           color=color, alpha=0.6, label=f"{model} {VISUAL[level]}")
    ax.set(xticks=[], yticks=[], title="Fig. 5: t-SNE of pyramid features (○ teacher, △ student; colour = level)")
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, path)


def _fig6(cross: Any, path: Path) -> None:
    m = _matrix(cross, 4)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
    im = ax.imshow(m, cmap="viridis")
    for i in range(4):
        for j in range(4):
            ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if im.norm(m[i][j]) > 0.6 else "white")
    ax.set(xticks=range(4), xticklabels=LANGUAGE, yticks=range(4), yticklabels=VISUAL, xlabel="student language level",
           ylabel="student visual level", title="Fig. 6: mean cross-modal cosine similarity")
    fig.colorbar(im, ax=ax)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path, rect: tuple[float, ...] = (0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    fig.savefig(path)
    plt.close(fig)


FIGURES = {  # file -> (key in details.step.figures, plot, caption)
    "fig3_alsn_difficulty.png": ("alsn", _fig3, "Figure 3: ALSN level weights against sample difficulty (binned), "
                                                 "one line per level"),
    "fig4_radar.png": ("sample_types", _fig4, "Figure 4: ALSN weights of the four levels per sample type (radar)"),
    "fig5_tsne.png": ("tsne", _fig5, "Figure 5: t-SNE of teacher and student pyramid features, coloured by level"),
    "fig6_cross_modal.png": ("cross_modal", _fig6, "Figure 6: student visual × language level mean cosine similarity (4×4)"),
}


def _figure_source(rows: list[CmapkdRow]) -> tuple[int | None, dict] | None:
    row = next((r for r in rows if r.run == "CMAPKD"), None)
    for seed, _, step in row.members if row else []:
        if isinstance(step.get("figures"), dict):
            return seed, step["figures"]
    return None


def figures(run_dir: str | Path, rows: list[CmapkdRow], folder: str | Path,
            notes: list[str] | None = None) -> dict[str, Path]:
    """Figures 3-6 from the CMAPKD run's `figures` (its first seed having them) into `folder`; what is
    missing or malformed is skipped with a note (into `notes`), its file from an earlier report removed."""
    notes = notes if notes is not None else []
    source = _figure_source(rows)
    if source is None:
        notes.append("CMAPKD: no figures data in the CMAPKD run's eval JSON (details.step.figures): Figures 3–6 left out")
    seed, data = source if source is not None else (None, {})
    out: dict[str, Path] = {}
    for name, (key, plot, _) in FIGURES.items():
        path = Path(folder) / name
        path.unlink(missing_ok=True)
        if source is not None and data.get(key) is None:
            notes.append(f"CMAPKD: {name} skipped: figures.{key} missing (seed {seed})")
        elif source is not None:
            try:
                plot(data[key], path)
                out[name] = path
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                notes.append(f"CMAPKD: {name} skipped: figures.{key} malformed ({exc})")
    return out


# --- the section --------------------
def cmapkd_section(run_dir: str | Path, records: list, folder: str | Path, *, evals: dict[str, dict] | None = None,
                   files: dict[str, Path] | None = None) -> tuple[str, str, str, list[str]] | None:
    """(Markdown, LaTeX, HTML, notes) of Tables 2-5 and Figures 3-6, or None when the run has no
    cmapkd record. The figures are written into `folder` and added to `files` when given."""
    from pqk.report.build import _img

    rows = cmapkd_rows(run_dir, records, evals)
    if not rows:
        return None
    teacher = next((r for r in records if r.combo == "teacher" or r.exp_id.startswith("P0_")), None)
    notes = [] if teacher is not None else ["CMAPKD: no teacher record (P0_teacher_run1): no teacher row, no reductions"]
    if not any(r.run in ABLATIONS for r in rows):
        notes.append("CMAPKD: no ablation run yet: Table 4 holds the full method only")
    tables = [table2(rows, teacher), table3(rows, teacher), table4(rows, teacher), table5(rows, teacher)]
    written = figures(run_dir, rows, folder, notes)
    if files is not None:
        files.update(written)
    seeds = "; ".join(f"{r.run}: {', '.join('—' if s is None else str(s) for s in r.seeds)}" for r in rows)
    md, tex = [f"Runs and seeds: {seeds}.\n"], ["% CMAPKD Tables 2-5 (booktabs) and Figures 3-6 (graphicx)"]
    htm = [f"<p>Runs and seeds: {html.escape(seeds)}.</p>"]
    said = comparison(rows)
    if said:
        md += ["Main comparison (differences paired by seed, mean ± sample std; \"beats\" = ahead on every seed):\n",
               *(f"- {line}" for line in said), ""]
        htm.append("<p>Main comparison (differences paired by seed, mean ± sample std; “beats” = ahead on every "
                   "seed):</p><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in said) + "</ul>")
    for k, t in enumerate(tables, start=2):
        md += [f"\n**{t.caption}**\n", t.markdown()]
        tex.append(t.latex(f"tab:cmapkd-table{k}"))
        htm.append(t.html())
    for name, path in written.items():
        cap = FIGURES[name][2]
        md.append(f"\n![{cap}]({name})\n\n{cap}.\n")
        tex.append(f"\\begin{{figure}}[t]\n\\centering\n\\includegraphics[width=\\linewidth]{{{name}}}\n"
                   f"\\caption{{{latex_escape(cap)}}}\n\\label{{fig:cmapkd-{name[:4]}}}\n\\end{{figure}}\n")
        htm.append(f"<figure>{_img(path, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    return "\n".join(md), "\n".join(tex), "\n".join(htm), notes
