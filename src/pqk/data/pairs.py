"""Which image pairs to run through the network (DUSt3R's ``make_pairs``).

Semantics follow ``shared/design/dust3r-facts.md`` §4, with one deliberate
difference: ``swin``/``logwin`` pairs come out sorted instead of in Python set
iteration order, so runs are reproducible and easy to test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from pqk.errors import InputError

SCENE_GRAPHS = (
    "complete (every pair); "
    "swin-N[-noncyclic] (each image with its next N, default N=3, wraps around unless noncyclic); "
    "logwin-N[-noncyclic] (neighbours at offsets 1, 2, 4, ..., 2^(N-1), default N=3); "
    "oneref-R (image R with every other image, default R=0)"
)
PREFILTERS = "seqD (keep pairs at most D images apart) or cycD (same, distance measured around the loop)"

_GRAPH_RE = re.compile(r"^(?P<kind>swin|logwin)(?:-(?P<n>[^-]+))?(?P<noncyclic>-noncyclic)?$")
_ONEREF_RE = re.compile(r"^oneref(?:-(?P<r>.+))?$")
_PREFILTER_RE = re.compile(r"^(?P<kind>seq|cyc)(?P<d>.*)$")


@dataclass(frozen=True)
class _Graph:
    kind: str  # "complete", "swin", "logwin" or "oneref"
    param: int = 0  # window size N, or the reference index R
    cyclic: bool = True


def _bad_graph(scene_graph: Any, why: str) -> InputError:
    return InputError(f"bad scene graph {scene_graph!r}: {why}; accepted: {SCENE_GRAPHS}")


def _parse_int(text: str | None, default: int) -> int | None:
    """Digits only (no sign, no spaces), or ``default`` when absent; None if malformed."""
    if text is None:
        return default
    return int(text) if text.isascii() and text.isdigit() else None


def _parse_window(scene_graph: str, match: re.Match) -> _Graph:
    n = _parse_int(match.group("n"), default=3)
    if n is None or n < 1:
        raise _bad_graph(scene_graph, f"window size {match.group('n')!r} is not a positive integer")
    return _Graph(match.group("kind"), n, cyclic=match.group("noncyclic") is None)


def _parse_graph(scene_graph: Any, n_images: int) -> _Graph:
    if not isinstance(scene_graph, str):
        raise _bad_graph(scene_graph, "not a string")
    if scene_graph == "complete":
        return _Graph("complete")
    if scene_graph in ("swin-noncyclic", "logwin-noncyclic"):
        # The window part is optional even with the suffix (default N=3).
        return _Graph(scene_graph.split("-")[0], 3, cyclic=False)
    window = _GRAPH_RE.match(scene_graph)
    if window:
        return _parse_window(scene_graph, window)
    oneref = _ONEREF_RE.match(scene_graph)
    if oneref:
        ref = _parse_int(oneref.group("r"), default=0)
        if ref is None or ref >= n_images:
            raise _bad_graph(
                scene_graph, f"reference index must be an integer from 0 to {n_images - 1} for {n_images} images"
            )
        return _Graph("oneref", ref)
    raise _bad_graph(scene_graph, "unknown name")


def _ordered(i: int, j: int) -> tuple[int, int]:
    return (i, j) if i < j else (j, i)


def _complete(n: int) -> list[tuple[int, int]]:
    # Upstream order: (larger, smaller), rows in increasing i.
    return [(i, j) for i in range(n) for j in range(i)]


def _neighbour_pairs(n: int, offsets: Sequence[int], cyclic: bool) -> list[tuple[int, int]]:
    """Unordered pairs (i, i±offset), stored (small, large), sorted, no self-pairs."""
    found: set[tuple[int, int]] = set()
    for i in range(n):
        for off in offsets:
            for j in (i + off, i - off):
                if cyclic:
                    j %= n
                if 0 <= j < n and j != i:
                    found.add(_ordered(i, j))
    return sorted(found)


def _swin_offsets(n: int, window: int) -> list[int]:
    # Offsets beyond n only repeat residues (cyclic) or fall off the end, so
    # capping keeps huge N cheap without changing the result.
    return list(range(1, min(window, n) + 1))


def _logwin_offsets(n: int, window: int, cyclic: bool) -> list[int]:
    offsets: list[int] = []
    seen: set[int] = set()
    power = 1
    for _ in range(window):
        value = power % n if cyclic else power
        if value in seen or (not cyclic and value >= n):
            # 2^k mod n is eventually periodic: a repeat means nothing new follows.
            break
        seen.add(value)
        offsets.append(value)
        power *= 2
    return offsets


def _graph_pairs(graph: _Graph, n: int) -> list[tuple[int, int]]:
    if graph.kind == "complete":
        return _complete(n)
    if graph.kind == "swin":
        return _neighbour_pairs(n, _swin_offsets(n, graph.param), graph.cyclic)
    if graph.kind == "logwin":
        return _neighbour_pairs(n, _logwin_offsets(n, graph.param, graph.cyclic), graph.cyclic)
    return [(graph.param, j) for j in range(n) if j != graph.param]


def _parse_prefilter(prefilter: Any) -> tuple[bool, int] | None:
    """None, or (cyclic, max distance)."""
    if prefilter is None:
        return None
    match = _PREFILTER_RE.match(prefilter) if isinstance(prefilter, str) else None
    dist = _parse_int(match.group("d"), default=-1) if match else None
    if match is None or dist is None or dist < 1:
        raise InputError(f"bad prefilter {prefilter!r}: accepted: {PREFILTERS}, D a positive integer")
    return match.group("kind") == "cyc", dist


def _distance(i: int, j: int, n: int, cyclic: bool) -> int:
    dist = abs(i - j)
    return min(dist, n - dist) if cyclic else dist


def make_pair_indices(
    n: int,
    scene_graph: str = "complete",
    prefilter: str | None = None,
    symmetrize: bool = True,
) -> list[tuple[int, int]]:
    """Index pairs (i, j) for ``n`` images; see ``make_pairs`` for the rules."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InputError(f"need at least 2 images to make pairs (got {n!r})")
    graph = _parse_graph(scene_graph, n)
    keep = _parse_prefilter(prefilter)
    pairs = _graph_pairs(graph, n)
    if symmetrize:
        pairs = pairs + [(j, i) for i, j in pairs]
    if keep is not None:
        cyclic, max_dist = keep
        pairs = [(i, j) for i, j in pairs if _distance(i, j, n, cyclic) <= max_dist]
    return pairs


def make_pairs(
    imgs: list,
    scene_graph: str = "complete",
    prefilter: str | None = None,
    symmetrize: bool = True,
) -> list[tuple]:
    """Pairs ``(imgs[i], imgs[j])`` to feed the network, like DUSt3R's ``make_pairs``.

    Scene graphs:

    - ``complete``: (i, j) for i in 0..n-1, j < i, in that nested-loop order:
      (1,0), (2,0), (2,1), ...
    - ``swin-N``: each image i with i+1 .. i+N, wrapping around (mod n) unless
      the name ends in ``-noncyclic``; N defaults to 3 (``swin``).
    - ``logwin-N``: neighbours at offsets 1, 2, 4, ..., 2^(N-1), wrapping
      unless ``-noncyclic``; N defaults to 3.
    - ``oneref-R``: (R, j) for every j != R; R defaults to 0.

    ``swin``/``logwin`` keep each unordered pair once, stored (smaller,
    larger), never (i, i). Deviation from upstream: upstream emits them in
    Python set iteration order; we sort them ascending by (i, j) so the order
    is documented and stable.

    ``symmetrize`` appends the reversed copy of every pair after all the
    originals. ``prefilter`` ``'seqD'``/``'cycD'`` then keeps pairs whose
    index distance (around the loop for ``cyc``) is at most D.

    Raises InputError for fewer than 2 images or a bad graph/prefilter name.
    """
    indices = make_pair_indices(len(imgs), scene_graph, prefilter, symmetrize)
    return [(imgs[i], imgs[j]) for i, j in indices]
