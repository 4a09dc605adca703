"""Scene graphs must reproduce DUSt3R's make_pairs (facts §4), in sorted order for swin/logwin."""

from __future__ import annotations

import pytest

from pqk.data.pairs import SCENE_GRAPHS, make_pair_indices, make_pairs
from pqk.errors import InputError


def _reverse(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(j, i) for i, j in pairs]


def test_complete_order() -> None:
    base = [(1, 0), (2, 0), (2, 1)]
    assert make_pair_indices(3, "complete") == base + _reverse(base)
    assert make_pair_indices(3, "complete", symmetrize=False) == base


def test_make_pairs_returns_items() -> None:
    imgs = [{"idx": i} for i in range(3)]
    pairs = make_pairs(imgs, symmetrize=False)
    assert pairs == [(imgs[1], imgs[0]), (imgs[2], imgs[0]), (imgs[2], imgs[1])]
    assert pairs[0][0] is imgs[1]


def test_two_images_complete() -> None:
    assert make_pair_indices(2) == [(1, 0), (0, 1)]


def test_swin_cyclic_and_noncyclic() -> None:
    cyclic = make_pair_indices(5, "swin-2", symmetrize=False)
    # wrap-around adds (0, 3) = (3, 3+2 mod 5), (0, 4) and (1, 4); sorted order
    assert cyclic == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    noncyclic = make_pair_indices(5, "swin-2-noncyclic", symmetrize=False)
    assert noncyclic == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
    assert len(make_pair_indices(5, "swin-2")) == 20


def test_swin_default_and_large_window() -> None:
    assert make_pair_indices(6, "swin") == make_pair_indices(6, "swin-3")
    assert make_pair_indices(6, "swin-noncyclic") == make_pair_indices(6, "swin-3-noncyclic")
    everything = sorted((i, j) for i in range(4) for j in range(i + 1, 4))
    assert make_pair_indices(4, "swin-10", symmetrize=False) == everything
    assert make_pair_indices(4, "swin-1000000000", symmetrize=False) == everything


def test_swin_no_self_pairs() -> None:
    for n in (2, 3, 4):
        for i, j in make_pair_indices(n, f"swin-{n}"):
            assert i != j


def test_logwin() -> None:
    # offsets 1, 2, 4
    noncyclic = make_pair_indices(6, "logwin-3-noncyclic", symmetrize=False)
    assert noncyclic == sorted({(i, i + d) for i in range(6) for d in (1, 2, 4) if i + d < 6})
    cyclic = make_pair_indices(8, "logwin-3", symmetrize=False)
    expected = sorted({tuple(sorted((i, (i + d) % 8))) for i in range(8) for d in (1, 2, 4)})
    assert cyclic == expected
    assert make_pair_indices(8, "logwin") == make_pair_indices(8, "logwin-3")
    assert make_pair_indices(5, "logwin-1000000", symmetrize=False) == sorted(
        (i, j) for i in range(5) for j in range(i + 1, 5)
    )


def test_oneref() -> None:
    assert make_pair_indices(4, "oneref-2", symmetrize=False) == [(2, 0), (2, 1), (2, 3)]
    assert make_pair_indices(3, "oneref", symmetrize=False) == [(0, 1), (0, 2)]


def test_symmetrize_appends_reversed_after_originals() -> None:
    base = make_pair_indices(5, "swin-1", symmetrize=False)
    assert make_pair_indices(5, "swin-1") == base + _reverse(base)


def test_prefilter() -> None:
    seq = make_pair_indices(5, "complete", prefilter="seq1")
    assert seq == [(1, 0), (2, 1), (3, 2), (4, 3), (0, 1), (1, 2), (2, 3), (3, 4)]
    cyc = make_pair_indices(5, "complete", prefilter="cyc1", symmetrize=False)
    assert cyc == [(1, 0), (2, 1), (3, 2), (4, 0), (4, 3)]


@pytest.mark.parametrize(
    "graph", ["full", "swin-0", "swin-x", "swin--1", "logwin-0", "oneref-5", "oneref-a", "oneref--1", "", None]
)
def test_bad_graph_names(graph: object) -> None:
    with pytest.raises(InputError, match="scene graph") as info:
        make_pair_indices(5, graph)  # type: ignore[arg-type]
    assert "complete" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("prefilter", ["seq", "seq0", "foo2", "cyc-1", 3])
def test_bad_prefilter(prefilter: object) -> None:
    with pytest.raises(InputError, match="prefilter"):
        make_pair_indices(5, "complete", prefilter=prefilter)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_images(n: int) -> None:
    with pytest.raises(InputError, match="at least 2 images"):
        make_pair_indices(n)
    with pytest.raises(InputError, match="at least 2 images"):
        make_pairs([{}] * n)


def test_help_text_lists_forms() -> None:
    for form in ("complete", "swin-N", "noncyclic", "logwin-N", "oneref-R"):
        assert form in SCENE_GRAPHS
