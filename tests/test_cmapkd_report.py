"""The report's CMAPKD section (pqk.report.cmapkd): seeds aggregated, Tables 2-5, Figures 3-6,
and its place in `pqk report`; on a synthetic run folder (no training, no model)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from pqk.pipeline.record import write_record
from pqk.report.cmapkd import FIGURES, SECTION_TITLE, cmapkd_rows, cmapkd_section, figures, table2, table3, table4, table5
from pqk.tasks.clip.record import ClipRecord

CMAPKD_R1 = {42: 0.70, 43: 0.74, 44: 0.75}


def _figures(n: int = 40) -> dict:
    rng = random.Random(0)

    def simplex() -> list[float]:
        w = [rng.random() + 0.05 for _ in range(4)]
        return [x / sum(w) for x in w]

    return {
        "alsn": {"difficulty": [float(rng.randint(0, 30)) for _ in range(n)], "difficulty_definition": "teacher rank",
                 "w_v": [simplex() for _ in range(n)], "w_l": [simplex() for _ in range(n)]},
        "sample_types": {"simple scene": {"n": 5, "w_v": simplex(), "w_l": simplex()},
                         "many objects": {"n": 7, "w_v": simplex(), "w_l": simplex()},
                         "small objects": {"n": 0, "w_v": None, "w_l": None},
                         "abstract caption": {"n": n, "w_v": simplex(), "w_l": simplex()}},
        "tsne": {"points": [[rng.gauss(0, 1), rng.gauss(0, 1)] for _ in range(32)],
                 "model": ["teacher"] * 16 + ["student"] * 16, "level": list(range(4)) * 8},
        "cross_modal": [[rng.uniform(-1, 1) for _ in range(4)] for _ in range(4)],
    }


def _record(exp_id: str, combo: str, r1: float, params: float = 10.0, ms: float = 2.0) -> ClipRecord:
    return ClipRecord(exp_id, combo, params_M=params, flops_G=1.5, size_MB=4 * params, r1_i2t=r1, r5_i2t=r1 + 0.1,
                      r10_i2t=r1 + 0.15, r1_t2i=r1 - 0.05, r5_t2i=r1 + 0.05, r10_t2i=r1 + 0.1, r_mean=r1 + 0.05,
                      zs_top1=0.5, zs_top5=0.8, vqa_acc=r1 / 2, vqa_yesno=0.7, vqa_number=0.3, vqa_other=0.4,
                      t_image_p50_ms=ms, t_image_p95_ms=ms * 1.2, images_per_sec=1000 / ms, t_text_p50_ms=1.0)


def _add(run: Path, rec: ClipRecord, step: dict | None) -> None:
    write_record(run, {"record": rec.as_row(), "details": {} if step is None else {"step": step}}, rec)


def _step(run: str, seed: int, figs: dict | None = None) -> dict:
    objective = {"CMAPKD": "cmapkd", "Scratch": "scratch", "KD": "kd", "FitNet": "fitnet", "CLIP-KD": "clipkd"}
    step = {"run": run, "objective": objective.get(run, "cmapkd"), "seed": seed, "train": [], "spec": {}}
    return step if figs is None else {**step, "figures": figs}


def _run(tmp_path: Path, *, figs: bool = True, teacher: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"task": "clip", "experiments": []}))
    if teacher:
        _add(run, _record("P0_teacher_run1", "teacher", 0.80, params=40.0, ms=8.0), {})
    for seed, r1 in CMAPKD_R1.items():
        exp_id = "K_CMAPKD_run1" if seed == 42 else f"K_CMAPKD_s{seed}_run1"
        _add(run, _record(exp_id, "K", r1), _step("CMAPKD", seed, _figures() if figs else None))
    for name, r1 in (("Scratch", 0.60), ("KD", 0.65), ("FitNet", 0.66), ("CLIP-KD", 0.68), ("noVP", 0.69),
                     ("OneStage", 0.71)):
        _add(run, _record(f"K_{name.replace('-', '')}_run1", "K", r1), _step(name, 42))
    _add(run, _record("K_noRelation_s7_run1", "K", 0.72), None)  # no details: found by its exp_id
    _add(run, _record("KQ_CMAPKD_run1", "KQ", 0.69, ms=1.0), {"bits": 8})  # the quantize step: not a cmapkd row
    return run


def _records(run: Path) -> list:
    from pqk.report.rundata import load_run

    return load_run(run).records


def test_rows_group_runs_and_aggregate_seeds(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = cmapkd_rows(run, _records(run))
    assert [r.run for r in rows] == ["Scratch", "KD", "FitNet", "CLIP-KD", "CMAPKD", "noVP", "noRelation", "OneStage"]
    full = rows[4]
    assert full.seeds == [42, 43, 44]
    values = list(CMAPKD_R1.values())
    assert full.mean("r1_i2t") == pytest.approx(statistics.fmean(values))
    assert full.std("r1_i2t") == pytest.approx(statistics.stdev(values))  # n − 1
    assert full.std("r1_i2t") == pytest.approx(0.026458, abs=1e-6)
    assert full.cell("r1_i2t") == "0.730 ± 0.026"
    assert rows[0].cell("r1_i2t") == "0.600" and rows[0].std("r1_i2t") is None
    assert rows[6].seeds == [7]


def test_tables_have_expected_rows_and_columns(tmp_path: Path) -> None:
    run = _run(tmp_path)
    records = _records(run)
    rows, teacher = cmapkd_rows(run, records), records[0]
    t2 = table2(rows, teacher)
    assert t2.headers == ["Method", "Params (M)", "I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10", "Avg"]
    assert [r[0] for r in t2.rows] == ["Teacher", "Scratch", "KD", "FitNet", "CLIP-KD", "CMAPKD (n=3)"]
    assert t2.rows[0][2] == "0.800" and t2.rows[-1][2] == "0.730 ± 0.026"
    t3 = table3(rows, teacher)
    assert t3.headers == ["Method", "VQA overall", "VQA yes/no", "VQA number", "VQA other", "ZS top-1"]
    assert len(t3.rows) == 6 and t3.rows[-1][1] == "0.365 ± 0.013"
    t4 = table4(rows, teacher)
    assert t4.headers[:3] == ["Variant", "Run", "I→T R@1"] and t4.headers[-1] == "Removes"
    assert [r[0] for r in t4.rows] == ["w/o Visual Pyramid", "w/o Relation Distill", "One-stage training",
                                       "Full CMAPKD (progressive)"]
    assert t4.rows[0][5] == "-0.040" and "P5 only" in t4.rows[0][6]
    t5 = table5(rows, teacher)
    assert t5.headers == ["Method", "Params (M)", "FLOPs (G)", "image p50 (ms)", "I→T R@1", "Params ↓", "Speed ↑"]
    assert t5.rows[0][-2:] == ["—", "—"]
    assert t5.rows[-1][-2:] == ["75%", "4.00×"]
    assert t5.rows[-1][1] == "10.00" and t5.rows[-1][3] == "2.00 ± 0.00"  # no ± for the architecture's figures
    for t in (t2, t3, t4, t5):
        assert t.markdown() and t.html() and "\\toprule" in t.latex()


def test_figures_written(tmp_path: Path) -> None:
    run = _run(tmp_path)
    folder = tmp_path / "report"
    folder.mkdir()
    notes: list[str] = []
    written = figures(run, cmapkd_rows(run, _records(run)), folder, notes)
    assert sorted(written) == sorted(FIGURES) == sorted(["fig3_alsn_difficulty.png", "fig4_radar.png", "fig5_tsne.png",
                                                         "fig6_cross_modal.png"])
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert notes == []


def test_malformed_figure_skipped_with_note(tmp_path: Path) -> None:
    run = _run(tmp_path)
    rows = cmapkd_rows(run, _records(run))
    figs = rows[4].members[0][2]["figures"]
    figs["cross_modal"] = [[0.1, 0.2]]
    del figs["tsne"]
    notes: list[str] = []
    written = figures(run, rows, tmp_path, notes)
    assert sorted(written) == ["fig3_alsn_difficulty.png", "fig4_radar.png"]
    assert any("fig5_tsne.png" in n and "missing" in n for n in notes)
    assert any("fig6_cross_modal.png" in n and "malformed" in n for n in notes)


def test_section_none_without_cmapkd_records(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    teacher = _record("P0_teacher_run1", "teacher", 0.8)
    _add(run, teacher, {})
    _add(run, _record("K_T2.0_run1", "K", 0.7), {"T": 2.0})
    assert cmapkd_section(run, _records(run), tmp_path) is None


def test_section_without_figures_data_has_tables_and_note(tmp_path: Path) -> None:
    run = _run(tmp_path, figs=False, teacher=False)
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "fig4_radar.png").write_bytes(b"stale")
    files: dict[str, Path] = {}
    section = cmapkd_section(run, _records(run), folder, files=files)
    assert section is not None
    md, tex, page, notes = section
    assert md.count("**Table ") == 4 and "CMAPKD (n=3)" in md and "![" not in md
    assert tex.count("\\begin{table}") == 4 and "\\begin{figure}" not in tex
    assert page.count("<table") == 4 and "<img" not in page
    assert any("no figures data" in n for n in notes) and any("no teacher record" in n for n in notes)
    assert files == {} and not (folder / "fig4_radar.png").exists()


def test_report_gets_the_section(tmp_path: Path) -> None:
    from pqk.report.build import build_report

    run = _run(tmp_path)
    report = build_report(run, compute_estimate=False)
    md = (report.folder / "results.md").read_text()
    assert f"## {SECTION_TITLE}" in md and "![Figure 3" in md and "Table 5" in md
    assert "tab:cmapkd-table2" in (report.folder / "results.tex").read_text()
    page = (report.folder / "report.html").read_text()
    assert SECTION_TITLE in page and page.count("data:image/png;base64") >= 5
    assert all(name in report.files and report.files[name].is_file() for name in FIGURES)


def test_main_comparison_pairs_seeds_and_says_beats_trails_or_noise(tmp_path: Path) -> None:
    from pqk.report.cmapkd import comparison

    run = _run(tmp_path)
    for seed, r1 in ((43, 0.80), (44, 0.70)):  # Scratch's two further seeds: 0.60, 0.80, 0.70
        _add(run, _record(f"K_Scratch_s{seed}_run1", "K", r1), _step("Scratch", seed))
    for seed, r1 in ((43, 0.60), (44, 0.61)):  # KD: 0.65, 0.60, 0.61, behind CMAPKD on every seed
        _add(run, _record(f"K_KD_s{seed}_run1", "K", r1), _step("KD", seed))
    lines = comparison(cmapkd_rows(run, _records(run)))
    assert len(lines) == 2  # FitNet and CLIP-KD have one seed: no paired comparison
    scratch, kd = lines
    # CMAPKD 0.70, 0.74, 0.75 vs Scratch 0.60, 0.80, 0.70: differences +0.10, -0.06, +0.05
    assert scratch.startswith("CMAPKD − Scratch over 3 paired seeds: I→T R@1 +0.030 ± 0.082")
    assert "within seed noise of Scratch" in scratch
    assert "I→T R@1 +0.110 ± 0.052 (CMAPKD beats KD)" in kd
    assert comparison([r for r in cmapkd_rows(run, _records(run)) if r.run != "CMAPKD"]) == []
