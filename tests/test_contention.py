"""Latency that says when it cannot be trusted: a timing beside busy processes is marked
contended, and a latency gate on it is "inconclusive", never a pass or a stop the load decided;
records and benchmarks name the CPU and its ISA."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from conftest import TINY_KWARGS
from pqk.measure.machine import CONTENDED_SHARE, Contention, isa_label, machine_info
from pqk.pipeline.gates import check_gate
from pqk.pipeline.record import Record


@contextmanager
def busy_processes(seconds: float = 20.0):
    """One spinning process per core beside the test: the machine is shared while it runs."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _pair(delta1_new: float, p50_new: float) -> tuple[Record, Record]:
    ref = Record(exp_id="P0_teacher_run1", combo="teacher", delta1=0.89, absrel=0.1, t_pair_p50_ms=200.0,
                 params_M=5.0, size_MB=20.0)
    new = Record(exp_id="Q_PTQ_run1", combo="Q", delta1=delta1_new, absrel=0.1, t_pair_p50_ms=p50_new, params_M=5.0,
                 size_MB=13.0)
    return new, ref


def test_machine_info_names_the_cpu_and_its_isa() -> None:
    info = machine_info()
    assert info["cpu"] and set(info["isa"]) >= {"amx", "avx512_vnni", "avx512_bf16"} and info["cores"] >= 1
    assert info["cpu"] in isa_label(info)


def test_a_contended_latency_gate_is_inconclusive_never_pass_or_stop() -> None:
    new, ref = _pair(0.889, 60.0)  # quality within 1%, latency cut 70%: a pass on a quiet machine
    assert check_gate("P2", new, ref, latency_cut=0.7).verdict == "pass"
    verdict = check_gate("P2", new, ref, latency_cut=0.7, latency_contended=True)
    assert verdict.verdict == "inconclusive" and not verdict.passed and verdict.figures["latency_contended"]
    assert "gate P2: inconclusive (t_pair p50 timed while other processes used the cores" in verdict.note()
    slow = check_gate("P2", *_pair(0.889, 190.0), latency_cut=-0.9, latency_contended=True)
    assert slow.verdict == "inconclusive"  # nor a stop: -90% under load says nothing either
    worse = check_gate("P2", *_pair(0.80, 60.0), latency_cut=0.7, latency_contended=True)
    assert worse.verdict == "stop"  # quality does not depend on the load: still judged


def test_timing_beside_busy_processes_is_marked_contended() -> None:
    from pqk.methods.quantize_step import side_by_side_latency
    from pqk.models.dust3r import build_model

    torch.manual_seed(42)
    model = build_model(**TINY_KWARGS).eval()
    with busy_processes():
        with Contention() as probe:
            side = side_by_side_latency(model, None, None, None, 64, 96, rounds=20)
    assert probe.others_share > CONTENDED_SHARE, probe.to_json()
    assert side["contention"]["contended"] and side["machine"]["cpu"]
    from pqk.methods.base import StepResult
    from pqk.methods.quantize.method import apply_side_by_side

    side["variants"]["onnxruntime int8 (QDQ)"] = {"speedup": 3.0}  # what a fast INT8 runtime would show
    result = apply_side_by_side(StepResult(model=None, artifact=None, backend="onnxruntime"),
                                {"latency_side_by_side": side})
    assert result.latency_contended and result.latency_cut == pytest.approx(2 / 3)
    gate = check_gate("P2", *_pair(0.889, 60.0), latency_cut=result.latency_cut, latency_contended=result.latency_contended)
    assert gate.verdict == "inconclusive"
