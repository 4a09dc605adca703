"""The scene-scale section of the report (pqk.report.scene_scale): the cache's cut judged against
the encoder's share, the cascade's operating point, and the section in `pqk report`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_report import _estimate, run_dir  # noqa: F401 (run_dir is a fixture)

from pqk.report.scene_scale import operating_point, share_check, within_one_percent


def _row(views, pairs, cache, t_infer, graph="swin-4", **kw):
    return {"graph": graph, "views": views, "n_pairs": pairs, "cache": cache, "t_infer_s": t_infer, "t_ga_s": 10.0,
            "t_scene_s": t_infer + 10.0, "encoded_views": views if cache != "none" else 2 * pairs,
            "cache_MB": None if cache == "none" else 1.0, "peak_rss_MB": 800.0, "chamfer": 0.2, "delta1": 0.9, **kw}


def _point(fraction, t, chamfer, delta1):
    return {"verify_fraction": fraction, "threshold": 1.5, "t_infer_s": t, "t_scene_s": t + 10, "chamfer": chamfer,
            "delta1": delta1}


SCENE_SCALE = {
    "platform": {"cpu": "Test CPU", "isa": "AVX-512", "torch": "2.13", "date": "2026-12-03"},
    "command": "python benchmarks/scene_scale.py",
    "growth": [_row(32, 256, "none", 100.0), _row(32, 256, "fp", 53.0),
               _row(128, 1024, "fp", 200.0, ga_variants=[{"niter": 100, "ga_stride": 4, "t_ga_s": 3.0, "chamfer": 0.21}])],
    "codecs": [_row(32, 256, "int8", 55.0, chamfer=0.201)],
    "share": {"encoder_share": 0.5},
    "folder": [{"folder": "photos", "graph": "swin-4", "views": 5, "n_pairs": 20, "cache": "fp", "t_infer_s": 3.2,
                "t_ga_s": 9.4, "cache_MB": 2.8, "peak_rss_MB": 512.0}],
    "cascade": {"views": 32, "graph": "swin-4", "full": {"t_infer_s": 50.0, "t_scene_s": 60.0, "chamfer": 0.2, "delta1": 0.9},
                "points": [_point(0.0, 12.0, 0.19, 0.85),  # lower Chamfer, but δ1 5 % down: not kept
                           _point(0.5, 30.0, 0.201, 0.895), _point(0.75, 40.0, 0.2, 0.899), _point(1.0, 52.0, 0.2, 0.9)],
                "spearman_score_vs_draft_absrel": -0.4, "spearman_score_vs_absrel_gain": -0.3},
}


def test_share_check_predicts_the_cut_from_the_encoder_share():
    check = share_check(SCENE_SCALE)
    assert check["predicted_cut"] == pytest.approx(0.5 * (1 - 32 / 512))
    assert check["measured_cut"] == pytest.approx(0.47)
    assert check["within_20_percent"]
    slower = dict(SCENE_SCALE, growth=[_row(32, 256, "none", 100.0), _row(32, 256, "fp", 80.0)])
    assert not share_check(slower)["within_20_percent"]


def test_operating_point_needs_chamfer_and_delta1_within_one_percent():
    full = SCENE_SCALE["cascade"]["full"]
    assert not within_one_percent(SCENE_SCALE["cascade"]["points"][0], full)
    op = operating_point(SCENE_SCALE["cascade"])
    assert op["verify_fraction"] == 0.5 and op["inference_speedup"] == pytest.approx(50 / 30)
    assert op["scene_speedup"] == pytest.approx(60 / 40)
    none = dict(SCENE_SCALE["cascade"], points=SCENE_SCALE["cascade"]["points"][:1])
    assert operating_point(none) is None


def test_report_has_the_scene_scale_section(run_dir, tmp_path):  # noqa: F811
    from pqk.report import build_report

    path = tmp_path / "scene_scale.json"
    path.write_text(json.dumps(SCENE_SCALE))
    report = build_report(run_dir, estimate=_estimate(), scene_scale=path)
    md = (report.folder / "results.md").read_text()
    assert "## Scene scale" in md and "scene_scale.png" in report.files and report.files["scene_scale.png"].is_file()
    assert "cut it by 47.0 %" in md and "50 % of the pairs verified, inference 1.67×" in md
    assert "| swin-4 | 128 | 1024 | fp |" in md and "| 128 views, swin-4 | 100 | 4 | 3.0 | 0.2100 |" in md
    assert "| photos | swin-4 | 5 | 20 | fp | 3.2 | 9.4 | 2.8 | 512 |" in md
    assert "Scene scale" in (report.folder / "report.html").read_text()
    assert "tab:scene-scale-0" in (report.folder / "results.tex").read_text()


def test_cli_report_refuses_a_file_that_is_not_a_scene_scale_result(run_dir, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    proc = subprocess.run([sys.executable, "-m", "pqk", "report", str(run_dir), "--no-estimate", "--scene-scale", str(bad)],
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "bad.json" in lines[0], proc.stderr
