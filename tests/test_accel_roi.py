"""The accelerations' ROI table (pqk.report.accel_roi): measured figures in, the documented
scoring rule applied, the ranking recomputed beside seed 003's guesses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pqk.report.accel_roi import SEED_003, Row, build_rows, roi_table


def test_scores_follow_the_documented_rule() -> None:
    row = Row("TEAL", "teal", speedup=2.0, lines=150)
    assert row.benefit == pytest.approx(10.0) and row.difficulty == pytest.approx(2.5)
    assert row.roi == pytest.approx(10.0 * 8.5 / 10)
    assert Row("TEAL", "t", speedup=1.5).benefit == pytest.approx(20 / 3)
    assert Row("TEAL", "t", speedup=0.8).benefit == 0.0  # slower here: no benefit
    worse = Row("TEAL", "t", speedup=1.5, quality=-0.02)
    assert worse.benefit == pytest.approx(10 / 3)  # beyond the 1 % gate: halved
    assert Row("TEAL", "t", memory=4.0).benefit == pytest.approx(3.75)


def test_rows_read_the_records_and_the_benchmark_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "pair_latency.json").write_text(json.dumps({"models": {"full": {"variants": {
        "openvino int8 (QDQ)": {"p50_ms": 3000.0}, "openvino int8 + int8_qk attention": {"p50_ms": 2000.0}}}}}))
    (results / "teal_speed.json").write_text(json.dumps({"per_pair_ms": {
        "dense fp32": 8000.0, "(c) structured gather 40%": 6400.0, "int8 dense": 2500.0, "(d) int8 + mask 40%": 3600.0}}))
    records = {name: SimpleNamespace(delta1=d) for name, d in
               {"Q": 0.88, "A8_sage": 0.8712, "baseline": 0.89, "T_s40": 0.85,
                "R_none_W4A8": 0.86, "R_fq_W4A8": 0.87}.items()}
    rows = {r.paper: r for r in build_rows(records, results, Path("tests"))}
    assert set(rows) == set(SEED_003)
    sage = rows["SageAttention"]
    assert sage.speedup == pytest.approx(1.5) and sage.quality == pytest.approx(-0.01)
    assert sage.lines > 0 and sage.tests > 0  # counted from the source and tests/
    assert rows["INT-FlashAttention"].speedup is None and rows["INT-FlashAttention"].quality is None  # not measured
    assert rows["TEAL"].speedup == pytest.approx(1.25) and rows["TEAL"].quality == pytest.approx(0.85 / 0.89 - 1)
    assert any("mask costs" in n for n in rows["TEAL"].notes)
    assert rows["FlatQuant"].quality == pytest.approx(0.87 / 0.86 - 1)
    table = roi_table(list(rows.values()))
    ranks = [int(r[-1]) for r in table.rows]
    assert ranks == sorted(ranks) and len(table.rows) == 8
    rois = [float(r[-2].split(" / ")[2]) for r in table.rows]
    assert rois == sorted(rois, reverse=True)
