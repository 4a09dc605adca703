"""Captions and VQA items from a generated scene description (nothing here looks at pixels).

Captions come in six phrasings (families); each image gets three different ones, picked by its
own random stream: a left-to-right list with every attribute and the background, "there is/are"
by size, a spatial relation between two objects, the main object's place in the picture, a count
of the objects, and a list with synonyms (big, glossy, gray, ...). Questions use canonical words
only; each image gets one "yes" and one "no" question (so yes/no is balanced exactly), one
counting question (answers are the words zero..four) and one or two "other" questions (colour,
shape, size or material of a uniquely named object).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pqk.data.captions.vocabulary import (
    COLOURS,
    HELD_OUT,
    INVERSE,
    MATERIALS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
)

# A relation is stated only when the separation along its axis exceeds this share of the image
# side and the separation across it is under 0.6 times the one along it.
RELATION_MARGIN = 0.2
_CROSS_RATIO = 0.6
N_CAPTIONS = 3
_HELD_OUT = set(HELD_OUT)


def relation(a: dict, b: dict) -> str | None:
    """Where object `a` is relative to object `b` ("left of", ...), or None when not clear-cut."""
    dx, dy = float(a["x"]) - float(b["x"]), float(a["y"]) - float(b["y"])
    if abs(dx) >= abs(dy):
        if abs(dx) > RELATION_MARGIN and abs(dy) < _CROSS_RATIO * abs(dx):
            return "left of" if dx < 0 else "right of"
    elif abs(dy) > RELATION_MARGIN and abs(dx) < _CROSS_RATIO * abs(dy):
        return "above" if dy < 0 else "below"
    return None


def scene_relations(objects: list[dict]) -> list[list]:
    """[i, relation, j] for every clear-cut pair i < j (object i relative to object j)."""
    out = []
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            rel = relation(objects[i], objects[j])
            if rel is not None:
                out.append([i, rel, j])
    return out


@dataclass
class _Kind:
    colour: str
    shape: str
    size: str
    material: str
    members: list[int]
    x: float  # mean centre, for left-to-right order
    r: float  # largest radius, for size order

    @property
    def count(self) -> int:
        return len(self.members)


def _kinds(objects: list[dict]) -> list[_Kind]:
    kinds: dict[tuple, _Kind] = {}
    for index, obj in enumerate(objects):
        key = (obj["colour"], obj["shape"], obj["size"], obj["material"])
        if key not in kinds:
            kinds[key] = _Kind(*key, members=[], x=0.0, r=0.0)
        kind = kinds[key]
        kind.members.append(index)
        kind.r = max(kind.r, float(obj["r"]))
    for kind in kinds.values():
        kind.x = sum(float(objects[m]["x"]) for m in kind.members) / kind.count
    return list(kinds.values())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(kind: _Kind, fields: tuple[str, ...], synonyms: bool = False) -> str:
    """'a large red shiny circle' / 'two small blue squares', with the attributes in `fields` order."""
    names = {"size": kind.size, "colour": kind.colour, "material": kind.material}
    if synonyms:
        names["size"] = {"large": "big", "small": "little"}[kind.size]
        names["material"] = {"matte": "flat", "shiny": "glossy", "striped": "stripy"}[kind.material]
    words = [names[f] for f in fields if f != "shape"]
    shape = kind.shape if kind.count == 1 else kind.shape + "s"
    if synonyms and kind.shape == "circle":
        shape = "disc" if kind.count == 1 else "discs"
    body = " ".join([*words, shape])
    return f"{_article(body)} {body}" if kind.count == 1 else f"{NUMBER_WORDS[kind.count]} {body}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_FULL = ("size", "colour", "material", "shape")
_ORDERS = (("size", "colour", "material", "shape"), ("size", "material", "colour", "shape"))
_REL_WORDS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
              "above": ("above", "over"), "below": ("below", "under")}


def _caption_list(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str:
    order = _ORDERS[int(rng.integers(len(_ORDERS)))]
    parts = [_phrase(k, order) for k in sorted(kinds, key=lambda k: k.x)]
    return f"{_join(parts)} on a {meta['background']} background."


def _caption_there(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str:
    ordered = sorted(kinds, key=lambda k: -k.r)
    parts = [_phrase(k, ("size", "colour", "shape")) for k in ordered]
    verb = "is" if ordered[0].count == 1 else "are"
    return f"there {verb} {_join(parts)}."


def _unique_pairs(meta: dict, kinds: list[_Kind]) -> list[tuple[int, str, int]]:
    """Stated relations between objects whose (colour, shape) is unique in the scene."""
    single = {k.members[0] for k in kinds if k.count == 1 and _same_colour_shape(kinds, k) == 1}
    return [(i, rel, j) for i, rel, j in meta["relations"] if i in single and j in single]


def _same_colour_shape(kinds: list[_Kind], kind: _Kind) -> int:
    return sum(k.count for k in kinds if k.colour == kind.colour and k.shape == kind.shape)


def _kind_of(kinds: list[_Kind], index: int) -> _Kind:
    return next(k for k in kinds if index in k.members)


def _caption_relation(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str | None:
    pairs = _unique_pairs(meta, kinds)
    if not pairs:
        return None
    i, rel, j = pairs[int(rng.integers(len(pairs)))]
    if rng.random() < 0.5:
        i, rel, j = j, INVERSE[rel], i
    a, b = _kind_of(kinds, i), _kind_of(kinds, j)
    fields = (("colour", "shape"), ("size", "colour", "shape"), _FULL)[int(rng.integers(3))]
    words = _REL_WORDS[rel][int(rng.integers(2))]
    rest = [_phrase(k, ("colour", "shape")) for k in kinds if k is not a and k is not b]
    if rng.random() < 0.5:
        text = f"{_phrase(a, fields)} {words} {_phrase(b, fields)}"
    else:
        text = f"there is {_phrase(a, fields)} {words} {_phrase(b, fields)}"
    return text + (f", and {_join(rest)}." if rest else ".")


def _place(x: float, y: float) -> str | None:
    col = "left" if x < 0.4 else "right" if x > 0.6 else "centre"
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else "middle"
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def _caption_place(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str:
    main = max(kinds, key=lambda k: k.r)
    if main.count > 1:
        return _caption_count(meta, kinds, rng)
    obj = meta["objects"][main.members[0]]
    text = f"{_phrase(main, _FULL)} {_place(float(obj['x']), float(obj['y']))}"
    rest = [_phrase(k, ("size", "colour", "shape")) for k in kinds if k is not main]
    return text + (f", with {_join(rest)}." if rest else " of the picture.")


def _caption_count(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str:
    total = sum(k.count for k in kinds)
    if total == 1:
        return f"a single {' '.join(_phrase(kinds[0], _FULL).split()[1:])} on a {meta['background']} background."
    parts = [_phrase(k, ("colour", "shape")) for k in sorted(kinds, key=lambda k: -k.r)]
    return f"{NUMBER_WORDS[total]} objects on a {meta['background']} background: {_join(parts)}."


def _caption_synonyms(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> str:
    parts = [_phrase(k, ("size", "material", "colour", "shape"), synonyms=True)
             for k in sorted(kinds, key=lambda k: -k.r)]
    background = "gray" if meta["background"] == "grey" else meta["background"]
    return f"{_join(parts)} against a {background} backdrop."


_FAMILIES = (_caption_list, _caption_there, _caption_relation, _caption_place, _caption_count, _caption_synonyms)


def make_captions(meta: dict, rng: np.random.Generator, count: int = N_CAPTIONS) -> list[str]:
    """`count` different captions of a description, in three different phrasings."""
    kinds = _kinds(meta["objects"])
    out: list[str] = []
    for family in rng.permutation(len(_FAMILIES)):
        text = _FAMILIES[int(family)](meta, kinds, rng)
        if text is not None and text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #
def _present(kinds: list[_Kind]) -> set[tuple[str, str]]:
    return {(k.colour, k.shape) for k in kinds}


def _allowed(colour: str, shape: str, split: str) -> bool:
    return split != "train" or (colour, shape) not in _HELD_OUT


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _yes_no(meta: dict, kinds: list[_Kind], rng: np.random.Generator, split: str) -> list[tuple[str, str]]:
    """One (question, "yes") and one (question, "no")."""
    present = _present(kinds)
    shapes = {k.shape for k in kinds}
    unique = [k for k in kinds if k.count == 1 and _same_colour_shape(kinds, k) == 1]
    pairs = _unique_pairs(meta, kinds)
    true_q, false_q = [], []
    k = _pick(rng, kinds)
    true_q.append(f"is there {_article(k.colour)} {k.colour} {k.shape}?")
    true_q.append(f"is there {_article(k.shape)} {k.shape}?")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and _allowed(c, s, split)]
    # Mostly compositional negatives: the colour or the shape is in the picture, not together.
    near = [(c, s) for c, s in absent if c in {k.colour for k in kinds} or s in shapes]
    c, s = _pick(rng, near if near and rng.random() < 0.7 else absent)
    false_q.append(f"is there {_article(c)} {c} {s}?")
    missing = [s for s in SHAPES if s not in shapes]
    if missing:
        s = _pick(rng, missing)
        false_q.append(f"is there {_article(s)} {s}?")
    if unique:
        u = _pick(rng, unique)
        other = _pick(rng, [m for m in MATERIALS if m != u.material])
        true_q.append(f"is the {u.colour} {u.shape} {u.material}?")
        false_q.append(f"is the {u.colour} {u.shape} {other}?")
    if pairs:
        i, rel, j = _pick(rng, pairs)
        a, b = _kind_of(kinds, i), _kind_of(kinds, j)
        true_q.append(f"is the {a.colour} {a.shape} {_REL_WORDS[rel][0]} the {b.colour} {b.shape}?")
        i, rel, j = _pick(rng, pairs)
        a, b = _kind_of(kinds, i), _kind_of(kinds, j)
        false_q.append(f"is the {a.colour} {a.shape} {_REL_WORDS[INVERSE[rel]][0]} the {b.colour} {b.shape}?")
    return [(_pick(rng, true_q), "yes"), (_pick(rng, false_q), "no")]


def _number(kinds: list[_Kind], rng: np.random.Generator) -> tuple[str, str]:
    choice = int(rng.integers(3))
    if choice == 0:
        total = sum(k.count for k in kinds)
        return (_pick(rng, ["how many objects are there?", "how many shapes are there?"]), NUMBER_WORDS[total])
    if choice == 1:
        present = sorted({k.shape for k in kinds}, key=SHAPES.index)
        shape = _pick(rng, present) if rng.random() < 0.6 else _pick(rng, list(SHAPES))
        count = sum(k.count for k in kinds if k.shape == shape)
        return f"how many {shape}s are there?", NUMBER_WORDS[count]
    present = sorted({k.colour for k in kinds}, key=COLOURS.index)
    colour = _pick(rng, present) if rng.random() < 0.6 else _pick(rng, list(COLOURS))
    count = sum(k.count for k in kinds if k.colour == colour)
    return f"how many {colour} objects are there?", NUMBER_WORDS[count]


def _only_one(objects: list[dict], reference: int, rel: str) -> int | None:
    """The one object clearly `rel` the reference, when no other object is even roughly so."""
    ref = objects[reference]
    hits = [i for i, o in enumerate(objects) if i != reference and relation(o, ref) == rel]
    if len(hits) != 1:
        return None
    axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[rel]
    for i, o in enumerate(objects):
        if i not in (reference, hits[0]) and sign * (float(o[axis]) - float(ref[axis])) > RELATION_MARGIN / 2:
            return None
    return hits[0]


def _other(meta: dict, kinds: list[_Kind], rng: np.random.Generator) -> list[tuple[str, str, tuple]]:
    """Candidate (question, answer, choices) about attributes, most specific first."""
    objects = meta["objects"]
    out = []
    by_shape = {s: [k for k in kinds if k.shape == s] for s in SHAPES}
    by_colour = {c: [k for k in kinds if k.colour == c] for c in COLOURS}
    for s, ks in by_shape.items():
        if len(ks) == 1 and ks[0].count == 1:
            out.append((f"what colour is the {s}?", ks[0].colour, COLOURS))
    for c, ks in by_colour.items():
        if len(ks) == 1 and ks[0].count == 1:
            out.append((f"what shape is the {c} object?", ks[0].shape, SHAPES))
    unique = [k for k in kinds if k.count == 1 and _same_colour_shape(kinds, k) == 1]
    for k in unique:
        out.append((f"what size is the {k.colour} {k.shape}?", k.size, SIZES))
        out.append((f"what material is the {k.colour} {k.shape}?", k.material, MATERIALS))
        for rel in ("left of", "right of", "above", "below"):
            hit = _only_one(objects, k.members[0], rel)
            if hit is not None:
                out.append((f"what shape is {_REL_WORDS[rel][0]} the {k.colour} {k.shape}?",
                            objects[hit]["shape"], SHAPES))
    main = max(kinds, key=lambda k: k.r)
    out.append(("what colour is the largest object?", main.colour, COLOURS))
    out.append(("what shape is the largest object?", main.shape, SHAPES))
    return out


def make_questions(meta: dict, rng: np.random.Generator, split: str) -> list[tuple[str, str, str, list[str]]]:
    """(question, answer, answer type, choices): 2 yes/no, 1 number, 1-2 other."""
    kinds = _kinds(meta["objects"])
    items = [(q, a, "yes/no", ["yes", "no"]) for q, a in _yes_no(meta, kinds, rng, split)]
    q, a = _number(kinds, rng)
    items.append((q, a, "number", list(NUMBER_WORDS)))
    others = _other(meta, kinds, rng)
    n_other = 1 + int(rng.integers(2))
    for k in rng.permutation(len(others))[:n_other]:
        q, a, choices = others[int(k)]
        items.append((q, a, "other", list(choices)))
    return items
