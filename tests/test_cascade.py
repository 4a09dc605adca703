"""The cascade (pqk.cascade) and the scene harness (pqk.recon.scene_run): a draft on every pair,
the full model on the unsure ones, merged in pair order; and `pqk infer --cascade/--cache`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pqk.cascade import LowResolutionDraft, cascade_inference, pair_confidence, pairs_to_verify
from pqk.data.pairs import make_pairs
from pqk.errors import InputError
from pqk.inference import inference


def _views(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{"img": torch.randn(1, 3, 64, 96, generator=gen), "true_shape": torch.tensor([[64, 96]]), "idx": i,
             "instance": str(i)} for i in range(n)]


def test_pair_confidence_is_the_geometric_mean_over_both_views():
    result = {"pred1": {"conf": torch.full((2, 2), math.e)}, "pred2": {"conf": torch.full((2, 2), math.e ** 3)}}
    assert pair_confidence(result) == pytest.approx(math.e ** 2)
    assert pairs_to_verify([result], math.e ** 2 + 1e-3) == [0] and pairs_to_verify([result], math.e ** 2 - 1e-3) == []


def test_low_resolution_draft_answers_at_full_resolution_cached_or_not(tiny_model):
    draft = LowResolutionDraft(tiny_model, 2)
    pairs = make_pairs(_views(3), scene_graph="complete", symmetrize=True)
    plain = inference(pairs, draft, cache="none")
    cached = inference(pairs, draft, cache="fp")
    for a, b in zip(plain, cached):
        assert a["pred1"]["pts3d"].shape == (64, 96, 3) and a["pred2"]["conf"].shape == (64, 96)
        for key in ("pts3d", "conf"):
            assert torch.allclose(a["pred1"][key], b["pred1"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threshold", [1.0, math.inf])
def test_threshold_one_keeps_the_draft_and_infinity_redoes_every_pair(tiny_model, threshold):
    pairs = make_pairs(_views(), scene_graph="complete", symmetrize=True)
    draft = LowResolutionDraft(tiny_model, 2)
    run = cascade_inference(pairs, draft, tiny_model, threshold)
    expected = inference(pairs, draft if threshold == 1.0 else tiny_model)
    assert len(run.verified) == (0 if threshold == 1.0 else len(pairs))
    for a, b in zip(run.results, expected):
        assert torch.allclose(a["pred1"]["pts3d"], b["pred1"]["pts3d"], rtol=1e-5, atol=1e-6)


def test_a_middle_threshold_redoes_exactly_the_unsure_pairs(tiny_model):
    pairs = make_pairs(_views(), scene_graph="complete", symmetrize=True)
    draft = LowResolutionDraft(tiny_model, 2)
    drafted = inference(pairs, draft)
    scores = [pair_confidence(r) for r in drafted]
    threshold = sorted(scores)[len(scores) // 2]
    run = cascade_inference(pairs, draft, tiny_model, threshold)
    full = inference(pairs, tiny_model)
    assert run.verified == [k for k, s in enumerate(scores) if s < threshold] and 0 < len(run.verified) < len(pairs)
    for k, result in enumerate(run.results):
        source = full[k] if k in run.verified else drafted[k]
        assert (result["view1"]["idx"], result["view2"]["idx"]) == (source["view1"]["idx"], source["view2"]["idx"])
        assert torch.allclose(result["pred2"]["conf"], source["pred2"]["conf"], rtol=1e-5)
    with pytest.raises(InputError, match=">= 1"):
        cascade_inference(pairs, draft, tiny_model, 0.5)


def test_scene_harness_counts_encoder_calls_and_cache_bytes(tiny_model):
    from pqk.recon.scene_run import GaSettings, align_scene, infer_scene

    views = _views()
    plain = infer_scene(views, tiny_model, "complete", cache="none", stride=2)
    cached = infer_scene(views, tiny_model, "complete", cache="fp", stride=2)
    small = infer_scene(views, tiny_model, "complete", cache="1bit", stride=2)
    assert plain.encoded_views == 2 * 12 and cached.encoded_views == 4 and plain.cache_bytes is None
    assert 0 < small.cache_bytes < cached.cache_bytes / 5  # 24 tokens: the per-channel mean and amplitude weigh
    assert cached.results[0]["pred1"]["pts3d"].shape == (32, 48, 3)
    run = infer_scene(views, tiny_model, "complete", draft=LowResolutionDraft(tiny_model, 2), threshold=math.inf, stride=2)
    assert run.encoded_views == 8 and len(run.verified_pairs) == 12  # each view once per model
    align_scene(cached, GaSettings(niter=5))
    assert cached.t_ga_s > 0 and len(cached.aligned.pts3d) == 4 and cached.summary()["t_scene_s"] > cached.t_infer_s


def test_infer_cascade_and_cache_options(tmp_path):
    import numpy as np
    from conftest import TINY_KWARGS
    from PIL import Image
    from test_cli import run_cli

    from pqk.models.dust3r import build_model, save_model

    torch.manual_seed(42)
    ckpt = save_model(build_model(**TINY_KWARGS), tmp_path / "tiny.pth")
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(images / f"im{k}.png")
    out = tmp_path / "out"
    res = run_cli("infer", str(images), "-c", str(ckpt), "--size", "224", "--cache", "int8", "--cascade", "1e9",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "pairs.json").read_text())
    assert summary["cache"] == "int8" and summary["cascade"]["verified_pairs"] == 6
    assert all(p["verified_by_full_model"] for p in summary["pairs"])
    for args, word in ((["--cache", "2bit"], "2bit"), (["--cascade", "0.5"], "0.5"), (["--cascade", "2", "--draft", "nope.onnx"], "nope")):
        bad = run_cli("infer", str(images), "-c", str(ckpt), *args, "--out", str(tmp_path / "bad"))
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], bad.stderr
        assert not (tmp_path / "bad").exists()


def test_cascade_model_splices_the_full_answers_into_a_batch(tiny_model):
    from pqk.methods.cascade import CascadeModel

    pairs = make_pairs(_views(), scene_graph="complete", symmetrize=True)
    draft = LowResolutionDraft(tiny_model, 2)
    scores = sorted(pair_confidence(r) for r in inference(pairs, draft))
    threshold = scores[len(scores) // 2]
    expected = cascade_inference(pairs, draft, tiny_model, threshold, cache="none")
    batched = inference(pairs, CascadeModel(tiny_model, draft, threshold), cache="none", batch_size=5)
    for a, b in zip(expected.results, batched):
        for pred in ("pred1", "pred2"):
            for key in a[pred]:
                assert torch.allclose(a[pred][key], b[pred][key], rtol=1e-4, atol=1e-5), (pred, key)


def test_cascade_spec_refuses_bad_values():
    from pqk.errors import ConfigError
    from pqk.methods.cascade import CascadeSpec

    for bad in ({"threshold": 0.5}, {"threshold": "high"}, {"draft": "quarter"}, {"calibration_pairs": 1},
                {"max_quality_drop": 1.5}):
        with pytest.raises(ConfigError, match=str(next(iter(bad.values())))):
            CascadeSpec(**bad)


def test_cascade_is_a_plan_step_restored_from_its_cache(tmp_path):
    import csv

    import yaml
    from conftest import TINY_KWARGS

    from pqk.models.dust3r import build_model, save_model
    from pqk.pipeline.plan import load_plan
    from pqk.pipeline.runner import PlanRunner
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    torch.manual_seed(42)
    save_model(build_model(**TINY_KWARGS), tmp_path / "teacher.safetensors")
    w = make_workload(n_pairs=2, n_scenes=1, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride = 5, 2
    save_workload(w, tmp_path / "workload.yaml")
    (tmp_path / "cascade.yaml").write_text("draft: half\nthreshold: auto\ncalibration_pairs: 4\n")
    plan = {"name": "casc", "teacher": "teacher.safetensors", "workload": "workload.yaml", "gate_policy": "record",
            "experiments": [{"id": "baseline", "steps": []},
                            {"id": "C", "steps": [{"method": "cascade", "config": "cascade.yaml"}]}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    first = PlanRunner(load_plan(tmp_path / "plan.yaml"), tmp_path / "runs", log=lambda m: None).run()
    rows = {r["exp_id"]: r for r in csv.DictReader((tmp_path / "runs" / "casc" / "result_table.csv").open())}
    exp_id = next(k for k in rows if k.startswith("C_half_t"))
    assert rows[exp_id]["combo"] == "C" and float(rows[exp_id]["t_scene_s"]) > 0
    payload = json.loads((tmp_path / "runs" / "casc" / f"{exp_id}_eval.json").read_text())
    assert payload["details"]["step"]["threshold"] >= 1 and payload["details"]["scene_level"][0]["encoded_views"] >= 4
    again = PlanRunner(load_plan(tmp_path / "plan.yaml"), tmp_path / "runs", log=lambda m: None).run()
    assert again[1].cached and again[1].record.delta1 == first[1].record.delta1
