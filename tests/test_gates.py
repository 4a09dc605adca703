"""The protocol's gates and side-by-side latency."""

from __future__ import annotations

import math
import time

import pytest

from pqk.errors import ConfigError
from pqk.measure.latency import interleaved_latency
from pqk.pipeline.gates import check_gate, quality_drop, record_from_row
from pqk.pipeline.record import Record

TEACHER = Record("P0_teacher_run1", "teacher", delta1=0.900, absrel=0.100, params_M=5.0, size_MB=20.0, t_pair_p50_ms=200.0)


def _rec(**kw) -> Record:
    base = dict(delta1=0.900, absrel=0.100, params_M=5.0, size_MB=20.0, t_pair_p50_ms=200.0)
    return Record("x", "K", **{**base, **kw})


def test_quality_drop_is_relative_and_signed_by_metric_direction() -> None:
    assert quality_drop(0.891, 0.900, "delta1") == pytest.approx(0.01)
    assert quality_drop(0.101, 0.100, "absrel") == pytest.approx(0.01)
    assert quality_drop(0.095, 0.100, "absrel") < 0  # better
    with pytest.raises(ConfigError, match="main metric"):
        quality_drop(1, 1, "accuracy")


def test_p1_gate_passes_at_the_threshold_and_stops_beyond() -> None:
    assert check_gate("P1", _rec(delta1=0.8911), TEACHER).passed
    verdict = check_gate("P1", _rec(delta1=0.88), TEACHER)
    assert not verdict.passed and verdict.verdict == "stop"
    assert "drop 2.2% > 1%" in verdict.note()
    assert check_gate("P1", _rec(delta1=0.88), TEACHER, metric="absrel").passed


def test_p2_gate_needs_the_latency_cut_and_prefers_side_by_side() -> None:
    slow = _rec(t_pair_p50_ms=120.0)  # 40% down by the records
    verdict = check_gate("P2", slow, TEACHER)
    assert not verdict.passed and "t_pair p50 down 40% < 50%" in verdict.reasons[0]
    assert check_gate("P2", slow, TEACHER, latency_cut=0.6).passed
    assert check_gate("P2", slow, TEACHER, latency_cut=0.6).figures["latency_source"] == "side by side"


def test_p4_gate_needs_a_size_cut() -> None:
    assert not check_gate("P4", _rec(delta1=0.89, params_M=4.0, size_MB=16.0), TEACHER).passed
    assert check_gate("P4", _rec(delta1=0.89, params_M=3.5, size_MB=14.0), TEACHER).passed
    # 3% allowed: 0.873 is exactly 3% below 0.9
    assert not check_gate("P4", _rec(delta1=0.87, params_M=3.0), TEACHER).passed


def test_nan_and_missing_figures_stop_the_gate() -> None:
    verdict = check_gate("P1", _rec(delta1=math.nan), TEACHER)
    assert not verdict.passed and "NaN in delta1" in verdict.reasons[0]
    assert not check_gate("P1", _rec(delta1=None), TEACHER).passed
    with pytest.raises(ConfigError, match="no gate for stage"):
        check_gate("P9", _rec(), TEACHER)


def test_record_round_trips_through_a_csv_row() -> None:
    row = {k: ("" if v is None else str(v)) for k, v in _rec(bits_w=8, notes="a; b").as_row().items()}
    back = record_from_row(row)
    assert back == _rec(bits_w=8, notes="a; b")


def test_interleaved_latency_orders_variants_and_reports_ratios() -> None:
    calls = {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}
    result = interleaved_latency(calls, rounds=5, warmup=1, reference="slow")
    fast, slow = result["variants"]["fast"], result["variants"]["slow"]
    assert slow["speedup"] == 1.0 and fast["speedup"] > 1.5
    assert fast["p50_ms"] < slow["p50_ms"] and result["rounds"] == 5
