"""`pqk report RUN_DIR`: tables, figures and one self-contained HTML page from a run folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pqk.pipeline.record import Record, upsert_row, write_json

# Latency (ms) and δ1 chosen so the front is known by hand: KQ (200 ms, 0.80) is dominated by
# K (150 ms, 0.885); Q is the fastest, the teacher the most accurate, K sits between.
RECORDS = [
    Record("P0_teacher_run1", "teacher", params_M=5.2, flops_G=12.3, size_MB=20.0, absrel=0.107, rmse=0.67,
           delta1=0.890, chamfer=0.198, t_pair_p50_ms=250.0, t_pair_p95_ms=340.0, pairs_per_sec=3.7, gpu_hours=0.016),
    Record("K_T3B05_run1", "K", T=3.0, beta=0.5, gamma=0.0, params_M=2.8, flops_G=6.6, size_MB=11.0, absrel=0.11,
           delta1=0.885, t_pair_p50_ms=150.0, gpu_hours=0.2, notes="gate P1: pass"),
    Record("Q_PTQ_run1", "Q", bits_w=8, bits_a=8, keep_list="Softmax,LayerNorm", params_M=5.2, flops_G=12.3,
           size_MB=6.0, absrel=0.12, delta1=0.86, t_pair_p50_ms=120.0, gpu_hours=0.05,
           notes="steps: quantize; gate P2: stop (delta1 0.8600 vs 0.8900: drop 3.4% > 1%; t_pair p50 down 52% (side by side) ok)"),
    Record("KQ_INT8_run1", "KQ", bits_w=8, bits_a=8, params_M=2.8, flops_G=6.6, size_MB=3.0, absrel=0.15,
           delta1=0.80, t_pair_p50_ms=200.0, gpu_hours=0.25),
]


def _details(exp: str | None, gate: dict | None, eval_hours: float) -> dict:
    return {"plan_experiment": exp, "gate": gate,
            "cost": {"device_kind": "cpu", "rate_usd_per_h": 6.88, "device_hours_eval": eval_hours}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "demo"
    for rec in RECORDS:
        upsert_row(run / "result_table.csv", rec)
    write_json(run / "teacher_eval.json", {"record": RECORDS[0].as_row(), "details": _details(None, None, 0.016)})
    # K: no gate in its JSON (the notes' "gate P1: pass" is read instead), sits in a sub-folder
    # named after its plan experiment.
    write_json(run / "K" / "K_T3B05_run1_eval.json", {"record": RECORDS[1].as_row(), "details": _details(None, None, 0.01)})
    write_json(run / "Q_PTQ_run1_eval.json", {"record": RECORDS[2].as_row(), "details": _details("Q", {
        "stage": "P2", "verdict": "stop", "reasons": ["delta1 0.8600 vs 0.8900: drop 3.4% > 1%"], "reference": "P0_teacher_run1",
        "figures": {"metric": "delta1", "quality_drop": 0.0337, "latency_cut": 0.52}}, 0.01)})
    write_json(run / "KQ_INT8_run1_eval.json", {"record": RECORDS[3].as_row(), "details": _details("KQ", {
        "stage": "P3", "verdict": "pass", "reasons": [], "reference": "K_T3B05_run1",
        "figures": {"metric": "delta1", "quality_drop": 0.005, "latency_cut": 0.6}}, 0.01)})
    log = [
        {"date": "2025-10-08T09:00:00+00:00", "task_id": "baseline", "input": "workload.yaml", "output": "teacher_eval.json",
         "verdict": "measured", "gpu_hours": 0.016, "notes": ""},
        {"date": "2025-10-09T10:00:00+00:00", "task_id": "K/1:distill", "input": "distill(distill.yaml, run=K-1)",
         "output": "student.safetensors", "verdict": "done", "gpu_hours": 0.19, "notes": "converged"},
        {"date": "2025-10-09T12:00:00+00:00", "task_id": "K", "input": "distill(distill.yaml, run=K-1)",
         "output": "K_T3B05_run1_eval.json", "verdict": "pass", "gpu_hours": 0.2, "notes": "gate P1: pass"},
    ]
    write_json(run / "status.json", {"plan": "demo", "experiments": [
        {"id": "KQ", "exp_id": "KQ_INT8_run1", "state": "done", "verdict": "pass", "reasons": []},
        {"id": "QX", "exp_id": "", "state": "stopped", "verdict": "", "reasons": ["Q: gate stop (delta1 drop)"]}]})
    (run / "execution_log.jsonl").write_text("\n".join(json.dumps(e) for e in log) + "\nnot json\n")
    (run / "plan.yaml").write_text(
        "name: demo\ndescription: a synthetic run\nbudget: 0.1\nestimate_h100_hours: {total: 45}\nexperiments:\n"
        "  - {id: baseline, steps: []}\n  - {id: K, steps: [{method: distill, run: K-1}]}\n"
        "  - {id: Q, steps: [{method: quantize}]}\n  - {id: KQ, steps: [{method: distill, run: K-1}, {method: quantize}]}\n")
    return run


def _estimate() -> dict:
    """The shape `pqk budget --json` writes, with round figures."""
    def exp(i, h, shared=None, doc=None):
        return {"id": i, "steps": i, "items": [], "hours": [h, h], "usd": [h, h], "hours_with_shared": [shared or h] * 2,
                "plan_estimate_h100_hours": doc}
    return {"plan": "demo", "gpu": "cpu", "budget": 0.1, "rate_usd_per_h": 1.0,
            "experiments": [exp("baseline", 0.02), exp("K", 0.25, doc=[20, 20]), exp("Q", 0.05), exp("KQ", 0.05, 0.3)],
            "total": {"hours": [0.37, 0.37], "usd": [0.37, 0.37], "plan_estimate_h100_hours": [45, 45]}}


@pytest.fixture(scope="module")
def report(run_dir):
    from pqk.report import build_report

    return build_report(run_dir, estimate=_estimate())


def test_pareto_front_by_hand():
    from pqk.report import pareto_front

    # (latency, quality): a fast-bad, b slower-better, c dominated by b (slower and worse), d slowest-best
    points = [(100.0, 0.80), (150.0, 0.88), (160.0, 0.85), (250.0, 0.90)]
    assert pareto_front(points, higher_is_better=True) == [0, 1, 3]
    # Lower is better (absrel): now d (0.90) is the worst and dominated; c beats nothing faster.
    assert pareto_front(points, higher_is_better=False) == [0]
    # Equal points do not knock each other out.
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (2.0, 0.5)]) == [0, 1]


def test_every_file_is_written(report, run_dir):
    folder = run_dir / "report"
    for name in ("results.md", "results.tex", "pareto.png", "stages.png", "report.html", "budget_estimate.json"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    for png in ("pareto.png", "stages.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.pareto == {"metric": "delta1", "front": ["Q_PTQ_run1", "K_T3B05_run1", "P0_teacher_run1"], "skipped": []}


def test_html_is_self_contained(report, run_dir):
    page = (run_dir / "report" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 2 and all(s.startswith("data:image/png;base64,") for s in images)
    for rec in RECORDS:
        assert rec.exp_id in page
    for section in ("Results", "Quality vs latency", "Gate verdicts", "Budget: estimate vs spent", "Daily execution log"):
        assert f">{section}</h2>" in page


def _md_section(md: str, title: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after '## title'."""
    part = md.split(f"## {title}\n", 1)[1]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    block = []
    for ln in lines:
        block.append(ln)
        if len(block) > 2 and not part.split(ln, 1)[1].lstrip("\n").startswith("|"):
            break
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block[2:]]


def test_tables_have_the_right_rows(report, run_dir):
    md = (run_dir / "report" / "results.md").read_text()
    results = _md_section(md, "Results")
    assert [r[0] for r in results] == [r.exp_id for r in RECORDS]
    assert results[2][6] == "8/8" and results[1][3] == "3"  # bits W/A of Q, T of K

    gates = {r[0]: r for r in _md_section(md, "Gate verdicts")}
    assert gates["K_T3B05_run1"][2:4] == ["P1", "pass"]  # from the notes
    assert gates["Q_PTQ_run1"][3] == "stop" and gates["Q_PTQ_run1"][5] == "+3.4%"  # from the eval JSON
    assert gates["KQ_INT8_run1"][3:5] == ["pass", "K_T3B05_run1"]
    assert gates["P0_teacher_run1"][3] == "reference"
    assert gates["K_T3B05_run1"][1] == "K"  # plan experiment from the sub-folder
    assert gates["—"][1:4] == ["QX", "—", "stopped (not run)"]  # status.json: built on a stopped gate

    log = _md_section(md, "Daily execution log")
    assert [r[1] for r in log] == ["baseline", "K/1:distill", "K"]
    assert log[1][0] == "2025-10-09 10:00" and log[1][5] == "0.19"
    assert any("1 line(s) that are not JSON" in n for n in report.notes)

    budget = {r[0]: r for r in _md_section(md, "Budget: estimate vs spent")}
    assert set(budget) == {"baseline", "K", "Q", "KQ", "total"}
    assert budget["K"][3] == "12 min" and budget["K"][5] == "20 h"  # spent: record's 0.2 h; plan doc
    assert budget["KQ"][2] == "18 min"  # compared with the estimate incl. K's shared distillation
    # total spent: every step once (0.19 from the log) + every evaluation (0.016 + 3 x 0.01)
    assert budget["total"][3] == "14.2 min" and budget["total"][5] == "45 h"


def test_latex_is_booktabs_and_escaped(report, run_dir):
    tex = (run_dir / "report" / "results.tex").read_text()
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert cmd in tex
    assert r"P0\_teacher\_run1" in tex and r"$\delta_1$" in tex
    assert "P0_teacher" not in tex.replace(r"P0\_teacher", "")


def test_cli_report_with_estimate_file(run_dir, tmp_path):
    est = tmp_path / "budget.json"
    est.write_text(json.dumps(_estimate()))
    proc = subprocess.run([sys.executable, "-m", "pqk", "report", str(run_dir), "--estimate", str(est), "--metric", "absrel"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())  # rich wraps long lines at the terminal width
    assert "5 gate rows: 2 pass, 1 stop, 1 not run" in said
    # absrel: lower is better; the teacher (0.107) is the most accurate, Q (0.12) the fastest.
    assert "Pareto front (absrel): Q_PTQ_run1, K_T3B05_run1, P0_teacher_run1" in said


def test_cli_missing_folder_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pqk", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope" in lines[0]


def test_joint_table_sets_joint_beside_sequential():
    from pqk.report.build import joint_table

    pkq = Record("PKQ_PTQ_run1", "PKQ", params_M=2.5, size_MB=3.0, t_pair_p50_ms=100.0, delta1=0.80, gpu_hours=0.5)
    pqk = Record("PQK_joint_r010_K1_run1", "PQK", params_M=2.4, size_MB=2.9, t_pair_p50_ms=90.0, delta1=0.82, gpu_hours=0.2)
    fp32 = Record("PQK_joint_r010_K1_FP32_run1", "PQK", params_M=2.4, delta1=0.83)
    assert joint_table([RECORDS[0], pkq]) is None  # no joint run: no section
    table = joint_table([RECORDS[0], pkq, fp32, pqk])
    assert [r[0] for r in table.rows] == ["PQK_joint_r010_K1_run1", "PKQ_PTQ_run1", "joint − P→K→Q"]
    diff = dict(zip(table.headers, table.rows[-1]))
    assert diff["δ1 ↑"] == "0.02" and diff["GPU-h"] == "-0.3" and diff["p50 (ms)"] == "-10"
    # The matched comparison: rho applied to the distilled student, the joint run's final size.
    kpq = Record("KPQ_PTQ_run1", "KPQ", params_M=2.4, size_MB=2.9, t_pair_p50_ms=92.0, delta1=0.81, gpu_hours=0.4)
    table = joint_table([RECORDS[0], pkq, fp32, pqk, kpq])
    assert [r[0] for r in table.rows] == ["PQK_joint_r010_K1_run1", "PKQ_PTQ_run1", "KPQ_PTQ_run1",
                                          "joint − P→K→Q", "joint − K→P→Q"]
    matched = dict(zip(table.headers, table.rows[-1]))
    assert matched["params (M)"] == "0" and matched["δ1 ↑"] == "0.01"
