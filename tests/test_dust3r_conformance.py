"""Our DUSt3R against tensors produced by the official code (../shared/conformance/dust3r)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFORMANCE, conformance_cases, decompress_case_weights, read_case_config, require_conformance
from pqk.models.dust3r import build_model
from pqk.models.dust3r.checkpoint import load_state_dict_strict

CASES = conformance_cases()


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def max_abs_ratio(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def test_conformance_cases_present():
    require_conformance()
    assert len(CASES) >= 2, f"expected conformance cases under {CONFORMANCE}"


@pytest.fixture(scope="module")
def loaded_cases(tmp_path_factory):
    """Each case's model, built from its config.json and strictly loaded from its weights file."""
    require_conformance()
    folder = tmp_path_factory.mktemp("weights")
    models = {}
    for case in CASES:
        cfg = read_case_config(case)
        model = build_model(**cfg["constructor_kwargs"]).eval()
        weights = load_file(str(decompress_case_weights(case, folder)))
        load_state_dict_strict(model, weights, case.name)
        assert set(model.state_dict()) == set(weights), "strict: same key set, aliases included"
        for key, value in model.state_dict().items():
            assert value.dtype == weights[key].dtype == torch.float32
            assert torch.equal(value, weights[key])
        models[case.name] = (case, cfg, model)
    return models


def _io_params():
    return [
        pytest.param(case.name, name, id=f"{case.name}-{name}")
        for case in CASES
        for name in read_case_config(case)["io_cases"]
    ]


@pytest.mark.parametrize("case_name,io_name", _io_params())
def test_outputs_match_official(loaded_cases, case_name, io_name, record_property):
    case, cfg, model = loaded_cases[case_name]
    ref = load_file(str(case / cfg["io_cases"][io_name]["file"]))
    view1 = {"img": ref["view1.img"], "true_shape": ref["view1.true_shape"]}
    view2 = {"img": ref["view2.img"], "true_shape": ref["view2.true_shape"]}
    with torch.no_grad():
        res1, res2 = model(view1, view2)
        _, (enc1, enc2), (pos1, pos2) = model.encode_pair(view1, view2)
        dec1, dec2 = model.decode(enc1, pos1, enc2, pos2)

    outputs = {
        "pred1.pts3d": res1["pts3d"],
        "pred1.conf": res1["conf"],
        "pred2.pts3d_in_other_view": res2["pts3d_in_other_view"],
        "pred2.conf": res2["conf"],
    }
    worst = 0.0
    for key, ours in outputs.items():
        assert ours.shape == ref[key].shape, key
        err = rel_l2(ours, ref[key])
        worst = max(worst, err)
        assert err <= 1e-4, f"{key}: rel L2 {err:.2e}"
        assert max_abs_ratio(ours, ref[key]) <= 1e-4, key
    record_property("max_rel_l2", worst)

    # Token level, to localize a bug: positions exact, tokens within 1e-5.
    assert torch.equal(pos1, ref["debug.pos1"]) and torch.equal(pos2, ref["debug.pos2"])
    tokens = {"debug.enc1": enc1, "debug.enc2": enc2}
    for i in range(1, len(dec1)):
        tokens[f"debug.dec1.{i}"] = dec1[i]
        tokens[f"debug.dec2.{i}"] = dec2[i]
    assert set(tokens) == {k for k in ref if k.startswith("debug.") and not k.startswith("debug.pos")}
    for key, ours in tokens.items():
        assert ours.shape == ref[key].shape, key
        assert rel_l2(ours, ref[key]) <= 1e-5, key


def test_every_layernorm_eps_is_1e_6(loaded_cases):
    # A 1e-5 eps moves outputs by only ~1e-5 relative: below the output tolerance.
    for _, _, model in loaded_cases.values():
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(m.eps == 1e-6 for m in norms)


def _official_key_tables():
    folder = CONFORMANCE / "official_keys"
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.tsv"))


@pytest.mark.parametrize("table", _official_key_tables(), ids=lambda p: p.stem)
def test_state_dict_matches_official_architecture(table):
    arch = json.loads((table.parent / "architectures.json").read_text())[table.stem]
    with torch.device("meta"):
        model = build_model(**arch["constructor_kwargs"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with table.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    official = {r["key"]: tuple(int(s) for s in r["shape"].split("x")) for r in rows}
    assert list(ours) == list(official), "same keys in the same order"
    assert ours == official
    assert all(r["dtype"] == "float32" for r in rows)
    assert sum(p.numel() for p in model.parameters()) == arch["param_count_total_unique"]
    assert not list(model.buffers())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(m.eps == 1e-6 for m in norms)


def test_official_key_tables_present():
    require_conformance()
    assert len(_official_key_tables()) == 3
