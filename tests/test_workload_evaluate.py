"""Workload freezing and its hash check, and the one evaluation function end to end on a
tiny workload (small generated scenes, short global alignment)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pqk.errors import InputError
from pqk.pipeline.evaluate import EvalOptions, evaluate
from pqk.tasks.dust3r.measure import depth_baselines
from pqk.tasks.dust3r.workload import load_scenes, load_workload, make_workload, save_workload


@pytest.fixture(scope="module")
def tiny_workload(tmp_path_factory):
    w = make_workload(n_pairs=4, n_scenes=2, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride = 10, 2
    path = save_workload(w, tmp_path_factory.mktemp("wl") / "workload.yaml")
    return path


def test_workload_roundtrip_and_protocol_defaults(tiny_workload):
    w = load_workload(tiny_workload)
    assert (w.resolution, w.batch_size, w.scene_graph, w.symmetrize, w.seed) == (64, 1, "swin-4", True, 42)
    assert len(w.pairs) == 4 and len({tuple(p) for p in w.pairs}) == 4
    assert w.scene_level == ["gen-00042"]
    again = make_workload(n_pairs=4, n_scenes=2, views=4, resolution=64, real_check=False)
    assert again.pairs == w.pairs and again.data_hash == w.data_hash


def test_default_workload_is_the_protocol():
    w = make_workload()
    assert (w.resolution, w.n_pairs, w.scene_graph, w.seed) == (512, 20, "swin-4", 42)
    assert w.data["width"] == 512 and w.data["height"] == 384
    assert w.real_pairs == [["middlebury-motorcycle", 0, 1], ["middlebury-motorcycle", 1, 0]]


def test_hash_mismatch_is_refused(tiny_workload, tmp_path):
    w = load_workload(tiny_workload)
    tampered = dataclasses.replace(w, data={**w.data, "seeds": [7, 8]})
    with pytest.raises(InputError, match="data hash does not match"):
        load_scenes(tampered)


def test_bad_workload_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_workload(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(InputError, match="not valid YAML"):
        load_workload(tmp_path / "bad.yaml")
    (tmp_path / "other.yaml").write_text("foo: 1\n")
    with pytest.raises(InputError, match="not a pqk workload"):
        load_workload(tmp_path / "other.yaml")


def test_baselines_by_hand():
    class V:
        def __init__(self, depth):
            self.depth = np.asarray(depth, np.float32)
            self.valid = np.ones_like(self.depth, bool)

    class S:
        views = [V([[1.0, 2.0], [4.0, 4.0]])]

    out = depth_baselines({"s": S()}, [["s", 0, 0]])
    # constant 2.75 (mean GT): |2.75-1|/1, |.75|/2, |1.25|/4 x2 -> mean (1.75+.375+.3125+.3125)/4
    assert out["constant_depth"]["absrel"] == pytest.approx((1.75 + 0.375 + 0.3125 * 2) / 4)
    # median of GT = 3: |3-1|/1, |1|/2, |1|/4 x2
    assert out["median_depth"]["absrel"] == pytest.approx((2 + 0.5 + 0.25 * 2) / 4)


def test_evaluate_fills_every_field(tiny_workload, tiny_model):
    w = load_workload(tiny_workload)
    ev = evaluate(tiny_model, w, options=EvalOptions(warmup=1, repeats=5))
    row = ev.record.as_row()
    for key in ("params_M", "flops_G", "size_MB", "chamfer", "absrel", "rmse", "delta1", "t_pair_p50_ms",
                "t_pair_p95_ms", "t_scene_s", "pairs_per_sec", "gpu_hours", "seed"):
        assert row[key] != "" and np.isfinite(float(row[key])), key
    assert row["datetime"].startswith("20")
    assert row["vram_GB"] == "" and "peak RSS" in row["notes"]
    assert ev.details["resources"]["peak_rss_MB"] > 0
    assert row["t_pair_p95_ms"] >= row["t_pair_p50_ms"] > 0
    assert abs(row["params_M"] - sum(p.numel() for p in tiny_model.parameters()) / 1e6) < 1e-3
    # deterministic quality
    again = evaluate(tiny_model, w, options=EvalOptions(warmup=1, repeats=5))
    for key in ("absrel", "rmse", "delta1", "chamfer"):
        assert getattr(again.record, key) == getattr(ev.record, key)


def test_nan_predictions_are_recorded_not_raised(tiny_workload):
    from pqk.models.dust3r import build_model

    from conftest import TINY_KWARGS

    model = build_model(**TINY_KWARGS).eval()
    with torch.no_grad():
        model.downstream_head1.proj.bias.fill_(float("nan"))
    ev = evaluate(model, load_workload(tiny_workload), options=EvalOptions(warmup=1, repeats=5))
    assert "non-finite" in ev.record.notes


def test_onnxruntime_backend_measures_the_exported_model(tiny_workload, tiny_model):
    w = load_workload(tiny_workload)
    w.scene_level = []
    ev_t = evaluate(tiny_model, w, options=EvalOptions(warmup=1, repeats=5))
    ev_o = evaluate(tiny_model, w, backend="onnxruntime", options=EvalOptions(warmup=1, repeats=5))
    assert "onnxruntime" in ev_o.details["runtime"]
    assert ev_o.record.absrel == pytest.approx(ev_t.record.absrel, rel=1e-3)


def test_pair_shapes_cover_the_real_photographs_without_rendering() -> None:
    from pqk.tasks.dust3r.workload import MOTORCYCLE, Workload, pair_shapes

    generated = {"kind": "generated", "seeds": [1], "views": 4, "width": 512, "height": 384}
    w = Workload(data=generated, pairs=[["s", 0, 1]], real_pairs=[[MOTORCYCLE, 0, 1], [MOTORCYCLE, 1, 0]])
    assert pair_shapes(w) == [((384, 512), (384, 512)), ((336, 512), (336, 512))]
    w.real_pairs = []
    assert pair_shapes(w) == [((384, 512), (384, 512))]
