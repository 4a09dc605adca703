"""The record type, exp_id naming, JSON and the atomic, lock-protected result table."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os

import pytest

from pqk.pipeline.record import RECORD_FIELDS, Record, exp_id, nan_fields, read_table, upsert_row, write_json


def test_record_has_exactly_the_protocol_fields():
    assert RECORD_FIELDS == [
        "exp_id", "combo", "rho", "T", "beta", "gamma", "bits_w", "bits_a", "keep_list", "params_M",
        "flops_G", "size_MB", "vram_GB", "chamfer", "absrel", "rmse", "delta1", "t_pair_p50_ms",
        "t_pair_p95_ms", "t_scene_s", "pairs_per_sec", "gpu_hours", "notes", "seed", "datetime",
    ]


def test_exp_id_naming():
    assert exp_id("K", "T3B05", "sched", 1) == "K_T3B05_sched_run1"
    assert exp_id("P", "r010") == "P_r010_run1"
    assert exp_id("KQ", "INT8", run=2) == "KQ_INT8_run2"


def test_nan_fields_found():
    assert nan_fields(Record("a", "b", absrel=float("nan"))) == ["absrel"]
    assert nan_fields(Record("a", "b", absrel=0.1)) == []


def test_upsert_replaces_same_exp_id_and_keeps_others(tmp_path):
    table = tmp_path / "result_table.csv"
    upsert_row(table, Record("a", "teacher", absrel=0.1))
    upsert_row(table, Record("b", "K", absrel=0.2))
    upsert_row(table, Record("a", "teacher", absrel=0.05))
    rows = read_table(table)
    assert [r["exp_id"] for r in rows] == ["b", "a"]
    assert rows[1]["absrel"] == "0.05" and rows[0]["rho"] == ""
    with table.open() as f:
        assert next(csv.reader(f)) == RECORD_FIELDS


def test_a_crash_while_writing_leaves_the_old_table(tmp_path, monkeypatch):
    table = tmp_path / "result_table.csv"
    upsert_row(table, Record("a", "teacher", absrel=0.1))
    before = table.read_text()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        upsert_row(table, Record("b", "K"))
    assert table.read_text() == before


def _writer(args):
    table, k = args
    upsert_row(table, Record(f"exp{k}", "K", absrel=k / 100))


def test_concurrent_writers_lose_no_row(tmp_path):
    table = tmp_path / "result_table.csv"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_writer, [(table, k) for k in range(24)])
    assert sorted(r["exp_id"] for r in read_table(table)) == sorted(f"exp{k}" for k in range(24))


def test_write_json_refuses_unwritable_folder(tmp_path):
    from pqk.errors import InputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError):
        write_json(blocker / "sub" / "r.json", {"a": 1})
