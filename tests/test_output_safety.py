"""Nothing written where it does not belong, nothing lost: a reused --out is refused or replaced
whole, hostile exp ids never leave the output folder, a full disk is one line with nothing
half-written, one run at a time per run folder, leftovers of killed steps are removed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_KWARGS
from pqk.errors import InputError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pqk", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    import torch

    from pqk.models.dust3r import build_model, save_model

    torch.manual_seed(42)
    return save_model(build_model(**TINY_KWARGS), tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


def test_infer_refuses_a_used_out_and_overwrite_replaces_it_whole(tmp_path, tiny_ckpt) -> None:
    out = tmp_path / "out"
    common = ["-c", str(tiny_ckpt), "--size", "224", "--out", str(out)]
    first = run_cli("infer", str(_images(tmp_path / "a", 3, 1)), "-g", "complete", *common)
    assert first.returncode == 0, first.stderr
    before = sorted(p.name for p in out.iterdir())
    assert len(before) == 13  # 6 pairs x (npz, ply) + pairs.json
    again = run_cli("infer", str(_images(tmp_path / "b", 2, 2)), *common)
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    replaced = run_cli("infer", str(tmp_path / "b"), *common, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    summary = json.loads((out / "pairs.json").read_text())
    assert len(summary["pairs"]) == 2 and len(list(out.iterdir())) == 5  # no file of the first run is left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("exp_id", ["../../escaped_probe", "a/b", ".hidden", "x y", ""])
def test_hostile_exp_id_is_refused_before_anything_is_written(tmp_path, exp_id) -> None:
    out = tmp_path / "o" / "e" / "sub"
    res = run_cli("eval", "--exp-id", exp_id, "--out", str(out))
    assert res.returncode == 2 and "exp_id" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.rglob("*escaped*"))


def test_p0_records_each_get_their_own_file(tmp_path) -> None:
    from pqk.pipeline.record import record_file_name

    assert record_file_name("P0_teacher_run1") == "teacher_eval.json"
    assert record_file_name("P0_teacher_run2") == "P0_teacher_run2_eval.json"


def _record(exp_id: str):
    from pqk.pipeline.record import Record

    return Record(exp_id=exp_id, combo="teacher", delta1=0.9, notes="")


def test_disk_full_on_the_table_leaves_neither_record_nor_temporary_file(tmp_path, monkeypatch) -> None:
    import pqk.io.files as files
    from pqk.pipeline.record import read_table, write_record

    write_record(tmp_path, {"record": {"exp_id": "A_run1"}}, _record("A_run1"))
    table = (tmp_path / "result_table.csv").read_text()
    real_fsync, calls = os.fsync, []

    def full_disk(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the JSON is staged; the table's rewrite finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(InputError, match=r"cannot write .*result_table.csv \(No space left on device; [\d.]+ MB free"):
        write_record(tmp_path, {"record": {"exp_id": "B_run1"}}, _record("B_run1"))
    assert (tmp_path / "result_table.csv").read_text() == table  # the previous table is intact
    assert [r["exp_id"] for r in read_table(tmp_path / "result_table.csv")] == ["A_run1"]
    assert not (tmp_path / "B_run1_eval.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_on_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    import torch

    from pqk.io.files import atomic_torch_save

    path = tmp_path / "last.pth"
    atomic_torch_save({"step": 1}, path)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(InputError, match=r"cannot write .*last.pth \(.*file write failed; [\d.]+ MB free"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_one_run_per_run_folder(tmp_path) -> None:
    from pqk.io.files import run_lock

    with run_lock(tmp_path):
        with pytest.raises(InputError, match=rf"run folder {tmp_path} is in use by process {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released when the holder ends
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pqk.io.files import run_lock\n"
                               f"with run_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"in use by process {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # a killed holder never leaves the folder locked
        pass


def test_leftovers_of_a_killed_step_are_removed(tmp_path) -> None:
    from pqk.io.files import remove_leftovers

    (tmp_path / ".ptq_int8.onnx.k2j4").mkdir()
    (tmp_path / ".ptq_int8.onnx.k2j4" / "raw.onnx").write_bytes(b"x")
    (tmp_path / ".last.pth.tmp").write_bytes(b"x")
    (tmp_path / ".result_table.csv.123.tmp").write_text("x")
    keep = [".pqk-done-quantize-abc.json", ".result_table.csv.lock", "last.pth", "ptq_int8.onnx"]
    for name in keep:
        (tmp_path / name).write_text("x")
    assert sorted(remove_leftovers(tmp_path)) == [".last.pth.tmp", ".ptq_int8.onnx.k2j4", ".result_table.csv.123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
