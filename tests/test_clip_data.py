"""The CLIP family's data: the generated compositional set, the bundled photographs, users'
folders (with their one-line errors) and the frozen workload."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from pqk.data.captions import (
    CLASS_NAMES,
    COLOURS,
    HELD_OUT,
    SHAPES,
    ImageTextSet,
    VQAItem,
    caption_attributes,
    clip_resize_crop,
    content_hash,
    draw_scene,
    generate_caption_set,
    image_attributes,
    load_caption_folder,
    load_class_folders,
    load_folder,
    load_vqa_folder,
    real_photographs,
    scene_attributes,
)
from pqk.data.captions.describe import relation
from pqk.errors import InputError
from pqk.tasks.clip.workload import (
    evaluation_shape,
    freeze,
    load_sets,
    load_workload,
    make_workload,
    save_workload,
    workload_hash,
)

REPO = Path(__file__).resolve().parents[1]
HELD = {f"{c} {s}" for c, s in HELD_OUT}


@pytest.fixture(scope="module")
def test_set() -> ImageTextSet:
    return generate_caption_set(300, 42, "test", 64)


@pytest.fixture(scope="module")
def train_set() -> ImageTextSet:
    return generate_caption_set(300, 42, "train", 64)


# --------------------------------------------------------------------------- #
# Generated set
# --------------------------------------------------------------------------- #
def test_deterministic_and_split_streams(test_set: ImageTextSet, train_set: ImageTextSet) -> None:
    again = generate_caption_set(300, 42, "test", 64)
    assert torch.equal(again.images, test_set.images)
    assert again.captions == test_set.captions and again.vqa == test_set.vqa
    assert content_hash(again) == content_hash(test_set)
    assert content_hash(train_set) != content_hash(test_set)
    assert content_hash(generate_caption_set(20, 43, "test", 64)) != content_hash(test_set.subset(range(20)))
    # Image i does not depend on n; the description does not depend on the image size.
    assert content_hash(generate_caption_set(20, 42, "test", 64)) == content_hash(test_set.subset(range(20)))
    small = generate_caption_set(5, 42, "test", 32)
    assert small.images.shape == (5, 3, 32, 32) and small.meta == test_set.meta[:5]
    train_scenes = {json.dumps(m["objects"]) for m in train_set.meta}
    assert not train_scenes & {json.dumps(m["objects"]) for m in test_set.meta}


def test_shapes_and_types(test_set: ImageTextSet) -> None:
    assert test_set.images.dtype == torch.uint8 and test_set.images.shape == (300, 3, 64, 64)
    assert test_set.class_names == CLASS_NAMES and len(CLASS_NAMES) == 48
    assert all("{}" in p for p in test_set.prompts) and len(test_set.prompts) >= 3
    assert all(len(c) >= 3 and len(set(c)) == len(c) for c in test_set.captions)
    distinct = {c for caps in test_set.captions for c in caps}
    assert len(distinct) > 0.9 * sum(len(c) for c in test_set.captions)
    per_image = np.bincount([v.image for v in test_set.vqa], minlength=len(test_set))
    assert per_image.min() >= 3 and per_image.max() <= 6
    assert all(v.answer in v.choices and v.answer == v.answer.lower() for v in test_set.vqa)


def test_held_out_pairs(test_set: ImageTextSet, train_set: ImageTextSet) -> None:
    for meta in train_set.meta:
        assert not any((o["colour"], o["shape"]) in set(HELD_OUT) for o in meta["objects"])
        assert not meta["held_out"]
    texts = [c for caps in train_set.captions for c in caps] + [v.question for v in train_set.vqa]
    assert not [t for t in texts if any(pair in t for pair in HELD)]
    assert not any(CLASS_NAMES[label] in HELD for label in train_set.labels)
    seen = {(o["colour"], o["shape"]) for m in test_set.meta for o in m["objects"]}
    assert set(HELD_OUT) <= seen
    for meta in test_set.meta:
        assert meta["held_out"] == any((o["colour"], o["shape"]) in set(HELD_OUT) for o in meta["objects"])
    assert 0 < sum(m["held_out"] for m in test_set.meta) < len(test_set)


def test_label_is_the_unambiguous_largest_object(test_set: ImageTextSet) -> None:
    for meta, label in zip(test_set.meta, test_set.labels):
        main = meta["objects"][0]
        assert CLASS_NAMES[label] == meta["label"] == f"{main['colour']} {main['shape']}"
        for other in meta["objects"][1:]:
            if (other["colour"], other["shape"]) != (main["colour"], main["shape"]):
                assert main["r"] >= 1.25 * other["r"] - 1e-3


def test_captions_match_the_description(test_set: ImageTextSet) -> None:
    for meta, captions in zip(test_set.meta, test_set.captions):
        truth = scene_attributes(meta)
        colours_shapes = {(o["colour"], o["shape"]) for o in meta["objects"]}
        for caption in captions:
            assert caption_attributes(caption) <= truth, (caption, meta["objects"])
            # every "<colour> <shape>" phrase names an object of the scene
            for colour, shape in re.findall(rf"({'|'.join(COLOURS)}) (?:\w+ )?({'|'.join(SHAPES)})", caption):
                assert (colour, shape) in colours_shapes, caption
    for meta in test_set.meta:
        for i, rel, j in meta["relations"]:
            assert relation(meta["objects"][i], meta["objects"][j]) == rel


def _count(meta: dict, key: str | None = None, value: str | None = None) -> int:
    return sum(1 for o in meta["objects"] if key is None or o[key] == value)


def test_vqa_matches_the_description(test_set: ImageTextSet) -> None:
    words = ["zero", "one", "two", "three", "four"]
    checked = 0
    for item in test_set.vqa:
        meta, q = test_set.meta[item.image], item.question
        objects = meta["objects"]
        if q in ("how many objects are there?", "how many shapes are there?"):
            assert item.answer == words[len(objects)]
        elif m := re.fullmatch(r"how many (\w+)s are there\?", q):
            assert item.answer == words[_count(meta, "shape", m[1])]
        elif m := re.fullmatch(r"how many (\w+) objects are there\?", q):
            assert item.answer == words[_count(meta, "colour", m[1])]
        elif m := re.fullmatch(r"what (size|material) is the (\w+) (\w+)\?", q):
            (obj,) = [o for o in objects if o["colour"] == m[2] and o["shape"] == m[3]]
            assert item.answer == obj[m[1]]
        elif m := re.fullmatch(r"what shape is (to the left of|to the right of|above|below) the (\w+) (\w+)\?", q):
            (ref,) = [o for o in objects if o["colour"] == m[2] and o["shape"] == m[3]]
            rel = m[1].removeprefix("to the ")
            (obj,) = [o for o in objects if o is not ref and relation(o, ref) == rel]
            assert item.answer == obj["shape"]
        elif m := re.fullmatch(r"is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", q):
            (a,) = [o for o in objects if o["colour"] == m[1] and o["shape"] == m[2]]
            (b,) = [o for o in objects if o["colour"] == m[4] and o["shape"] == m[5]]
            assert relation(a, b) is not None
            assert item.answer == ("yes" if relation(a, b) == m[3].removeprefix("to the ") else "no")
        elif m := re.fullmatch(r"what (colour|shape) is the largest object\?", q):
            assert item.answer == objects[0][m[1]]
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
            present = any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects)
            assert item.answer == ("yes" if present else "no")
        elif m := re.fullmatch(r"is there an? (\w+)\?", q):
            assert item.answer == ("yes" if _count(meta, "shape", m[1]) else "no")
        elif m := re.fullmatch(r"what colour is the (\w+)\?", q):
            (obj,) = [o for o in objects if o["shape"] == m[1]]
            assert item.answer == obj["colour"] and item.choices == list(COLOURS)
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
            (obj,) = [o for o in objects if o["colour"] == m[1]]
            assert item.answer == obj["shape"] and item.choices == list(SHAPES)
        elif m := re.fullmatch(r"is the (\w+) (\w+) (matte|shiny|striped)\?", q):
            (obj,) = [o for o in objects if o["colour"] == m[1] and o["shape"] == m[2]]
            assert item.answer == ("yes" if obj["material"] == m[3] else "no")
        else:
            continue
        checked += 1
    assert checked == len(test_set.vqa)  # every question form is checked


def test_yes_no_balanced(test_set: ImageTextSet) -> None:
    for image in range(len(test_set)):
        answers = sorted(v.answer for v in test_set.vqa if v.image == image and v.answer_type == "yes/no")
        assert answers == ["no", "yes"]
    types = {v.answer_type for v in test_set.vqa}
    assert types == {"yes/no", "number", "other"}


def test_colour_detector(test_set: ImageTextSet) -> None:
    hits = total = 0
    for k in range(40):
        found = image_attributes(test_set.images[k].permute(1, 2, 0).numpy())
        truth = {o["colour"] for o in test_set.meta[k]["objects"]}
        assert found <= set(COLOURS)
        hits, total = hits + len(found & truth), total + len(truth)
    assert hits >= 0.9 * total
    grey = np.full((32, 32, 3), 128, np.uint8)
    assert image_attributes(grey) == set()


def test_subset_reindexes(test_set: ImageTextSet) -> None:
    part = test_set.subset([5, 2])
    assert len(part) == 2 and part.captions == [test_set.captions[5], test_set.captions[2]]
    assert {v.image for v in part.vqa} == {0, 1}
    assert [v.question for v in part.vqa if v.image == 0] == [v.question for v in test_set.vqa if v.image == 5]
    assert part.tasks() == ["retrieval", "zero-shot", "vqa"]


def test_bad_generator_arguments() -> None:
    for args in ((10, 42, "val"), (-1, 42, "test"), (10, -3, "test")):
        with pytest.raises(InputError):
            generate_caption_set(*args)
    scene, _ = draw_scene(42, "test", 0)
    assert scene["objects"]


# --------------------------------------------------------------------------- #
# Photographs and preprocessing
# --------------------------------------------------------------------------- #
def test_photos_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the photographs must not need the network")

    monkeypatch.setattr(socket, "socket", no_network)
    photos = real_photographs(64)
    assert len(photos) == 10 and photos.images.shape == (10, 3, 64, 64) and photos.images.dtype == torch.uint8
    assert all(len(c) == 3 for c in photos.captions)
    assert all(m["licence"] and m["source"] for m in photos.meta)
    assert len(photos.labels) == 10 and photos.tasks() == ["retrieval", "zero-shot", "vqa"]
    yes_no = [v.answer for v in photos.vqa if v.answer_type == "yes/no"]
    assert yes_no.count("yes") == yes_no.count("no")
    assert photos.images.float().std() > 20  # real pictures, not blank


def test_clip_preprocessing_geometry() -> None:
    # a 100 x 50 image: shorter side 50 -> 64, longer int(64 * 100 / 50) = 128, crop left round(32) = 32
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, :, 0] = np.arange(100, dtype=np.uint8)[None, :] * 2
    image = PIL.Image.fromarray(pixels)
    out = clip_resize_crop(image, 64)
    expected = np.asarray(image.resize((128, 64), PIL.Image.BICUBIC).crop((32, 0, 96, 64)))
    assert out.shape == (64, 64, 3) and np.array_equal(out, expected)
    grey = clip_resize_crop(PIL.Image.fromarray(pixels[..., 0]), 16)  # converted to RGB after the crop
    assert grey.shape == (16, 16, 3)


# --------------------------------------------------------------------------- #
# Users' folders
# --------------------------------------------------------------------------- #
def _image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _caption_folder(root: Path) -> Path:
    _image(root / "images" / "a.png", 0)
    _image(root / "images" / "b.jpg", 1)
    _jsonl(root / "captions.jsonl", [
        {"image": "images/a.png", "captions": ["a noisy square.", "random pixels."]},
        {"image": "images/b.jpg", "caption": "more noise."},
        {"image": "images/a.png", "caption": "a third caption of a."},
    ])
    _jsonl(root / "questions.jsonl", [
        {"image": "images/a.png", "question": "is it noisy?", "answer": "Yes", "answer_type": "yes/no"},
        {"image": "images/b.jpg", "question": "how many squares?", "answer": "1", "answer_type": "number"},
        {"image": "images/a.png", "question": "how many dots?", "answer": "many", "answer_type": "number"},
        {"image": "images/b.jpg", "question": "what is it?", "answer": "noise", "answer_type": "other",
         "choices": ["Noise", "a cat"]},
    ])
    return root


def test_caption_folder(tmp_path: Path) -> None:
    data = load_folder(_caption_folder(tmp_path), 32)
    assert data.images.shape == (2, 3, 32, 32)
    assert data.captions == [["a noisy square.", "random pixels.", "a third caption of a."], ["more noise."]]
    assert [m["file"] for m in data.meta] == ["images/a.png", "images/b.jpg"]
    assert data.vqa[0] == VQAItem(0, "is it noisy?", "yes", "yes/no", ["yes", "no"])
    assert data.vqa[1].choices == ["1", "many"]  # every number answer of the file, sorted
    assert data.vqa[3].choices == ["noise", "a cat"]
    assert data.tasks() == ["retrieval", "vqa"]
    assert content_hash(load_caption_folder(tmp_path, 32)) == content_hash(data)


def test_vqa_only_folder(tmp_path: Path) -> None:
    _image(tmp_path / "x.png")
    question = {"image": "x.png", "question": "q?", "answer": "no", "answer_type": "yes/no"}
    _jsonl(tmp_path / "questions.jsonl", [question])
    data = load_vqa_folder(tmp_path, 16)
    assert data.captions == [[]] and data.tasks() == ["vqa"]


def test_class_folders(tmp_path: Path) -> None:
    _image(tmp_path / "n02" / "b.png", 1)
    _image(tmp_path / "n02" / "a.jpg", 2)
    _image(tmp_path / "n01" / "c.png", 3)
    (tmp_path / "n01" / "notes.txt").write_text("not an image, ignored")
    data = load_class_folders(tmp_path, 16)
    assert data.class_names == ["n01", "n02"] and data.labels == [0, 1, 1]
    assert [m["file"] for m in data.meta] == ["n01/c.png", "n02/a.jpg", "n02/b.png"]
    assert data.prompts == ["a photo of a {}."] and data.tasks() == ["zero-shot"]
    (tmp_path / "classes.txt").write_text("n02\tgolden retriever\nn01\ttabby cat\nn03\tgoldfish\n")
    (tmp_path / "prompts.txt").write_text("# templates\na photo of a {}.\na drawing of a {}.\n")
    data = load_folder(tmp_path, 16)
    assert data.class_names == ["golden retriever", "tabby cat", "goldfish"]
    assert data.labels == [0, 0, 1] and data.prompts == ["a photo of a {}.", "a drawing of a {}."]


def _bad_cases() -> dict:
    def empty_captions(root):
        (root / "captions.jsonl").write_text("\n")

    def malformed_json(root):
        _image(root / "a.png")
        _jsonl(root / "captions.jsonl", [{"image": "a.png", "caption": "ok"}, '{"image": "a.png", "caption": '])

    def missing_image(root):
        _jsonl(root / "captions.jsonl", [{"image": "nowhere.jpg", "caption": "a dog."}])

    def not_an_image(root):
        (root / "fake.jpg").write_text("this is text\nwith two lines\n")
        _jsonl(root / "captions.jsonl", [{"image": "fake.jpg", "caption": "a dog."}])

    def no_caption_field(root):
        _image(root / "a.png")
        _jsonl(root / "captions.jsonl", [{"image": "a.png", "text": "a dog."}])

    def captions_not_a_list(root):
        _image(root / "a.png")
        _jsonl(root / "captions.jsonl", [{"image": "a.png", "captions": "a dog."}])

    def json_not_an_object(root):
        _jsonl(root / "captions.jsonl", [["a.png", "a dog."]])

    def empty_class_folder(root):
        _image(root / "cat" / "a.png")
        (root / "dog").mkdir()

    def unknown_answer_type(root):
        _image(root / "a.png")
        _jsonl(root / "questions.jsonl", [{"image": "a.png", "question": "q?", "answer": "x", "answer_type": "color"}])

    def answer_not_in_choices(root):
        _image(root / "a.png")
        _jsonl(root / "questions.jsonl", [{"image": "a.png", "question": "q?", "answer": "red", "answer_type": "other",
                                           "choices": ["blue", "green"]}])

    def yes_no_answer(root):
        _image(root / "a.png")
        _jsonl(root / "questions.jsonl", [{"image": "a.png", "question": "q?", "answer": "maybe",
                                           "answer_type": "yes/no"}])

    def question_on_uncaptioned_image(root):
        _image(root / "a.png")
        _image(root / "b.png")
        _jsonl(root / "captions.jsonl", [{"image": "a.png", "caption": "a."}])
        _jsonl(root / "questions.jsonl", [{"image": "b.png", "question": "q?", "answer": "no",
                                           "answer_type": "yes/no"}])

    def unlisted_class(root):
        _image(root / "cat" / "a.png")
        (root / "classes.txt").write_text("dog\ta dog\n")

    def bad_prompt(root):
        _image(root / "cat" / "a.png")
        (root / "prompts.txt").write_text("a photo of a {}.\na photo of a cat.\n")

    def nothing(root):
        (root / "readme.txt").write_text("hello")

    def not_utf8(root):
        (root / "captions.jsonl").write_bytes(b"\xff\xfe\x00bad")

    return {k: v for k, v in locals().items() if callable(v)}


BAD = _bad_cases()
# what each message must name
NAMES = {"empty_captions": "captions.jsonl", "malformed_json": "captions.jsonl line 2", "missing_image": "line 1",
         "not_an_image": "fake.jpg", "no_caption_field": "line 1", "captions_not_a_list": "line 1",
         "json_not_an_object": "line 1", "empty_class_folder": "dog", "unknown_answer_type": "questions.jsonl line 1",
         "answer_not_in_choices": "line 1", "yes_no_answer": "line 1", "question_on_uncaptioned_image": "line 1",
         "unlisted_class": "cat", "bad_prompt": "prompts.txt line 2", "nothing": "class folders",
         "not_utf8": "captions.jsonl"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_folder_bad_input_is_one_line(case: str, tmp_path: Path) -> None:
    BAD[case](tmp_path)
    with pytest.raises(InputError) as err:
        load_folder(tmp_path, 16)
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    assert NAMES[case] in message, message


def test_folder_missing_paths(tmp_path: Path) -> None:
    for call in (load_folder, load_caption_folder, load_vqa_folder, load_class_folders):
        with pytest.raises(InputError, match="does not exist"):
            call(tmp_path / "nope", 16)
    with pytest.raises(InputError, match="no captions.jsonl"):
        load_caption_folder(tmp_path, 16)


# --------------------------------------------------------------------------- #
# Workload
# --------------------------------------------------------------------------- #
def test_frozen_config_matches_the_data() -> None:
    path = REPO / "configs" / "workload_clip.yaml"
    workload = load_workload(path)
    sets = load_sets(workload)
    assert list(sets) == ["generated", "photos"] and len(sets["generated"]) == workload.data["n"]
    assert workload.seed == 42 and workload.image_size == 64 and workload.batch_size == 1
    shape = evaluation_shape(path, [])
    assert (shape["width"], shape["height"]) == (64, 64)
    assert shape["passes"] == workload.forwards["images"] + workload.forwards["texts"] + 66
    notes: list[str] = []
    assert evaluation_shape(None, notes)["passes"] == shape["passes"] and notes


def test_workload_round_trip_and_hash_refusal(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    workload = freeze(path, n=12, real_photos=False)
    loaded = load_workload(path)
    assert loaded == workload and workload_hash(loaded) == workload_hash(workload)
    assert list(load_sets(loaded)) == ["generated"]
    loaded.data["n"] = 13  # the data changes, the frozen hash does not
    with pytest.raises(InputError) as err:
        load_sets(loaded)
    assert str(err.value).startswith("workload data hash mismatch") and "\n" not in str(err.value)
    assert "generated" in str(err.value)
    # a user folder, then changed on disk
    folder = _caption_folder(tmp_path / "data")
    frozen = make_workload(data=folder, real_photos=False, image_size=16)
    assert frozen.data == {"kind": "folder", "path": str(folder.resolve())}
    save_workload(frozen, tmp_path / "f.yaml")
    assert len(load_sets(load_workload(tmp_path / "f.yaml"))["folder"]) == 2
    _image(folder / "images" / "b.jpg", 9)
    with pytest.raises(InputError, match="^workload data hash mismatch"):
        load_sets(load_workload(tmp_path / "f.yaml"))


BAD_FIELDS = {
    "image_size": "x", "seed": -1, "batch_size": 0, "real_photos": "yes", "version": 99, "data_hash": "abc",
    "data": {"kind": "web"}, "forwards": {"images": "many"}, "set_hashes": ["x"], "colour": 1,
}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS) + ["data.n", "data.split", "data.path", "family"])
def test_workload_validation_is_one_line(field: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "workload_clip.yaml").read_text())
    if field == "data.n":
        raw["data"]["n"] = 0
    elif field == "data.split":
        raw["data"]["split"] = "val"
    elif field == "data.path":
        raw["data"] = {"kind": "folder", "path": 3}
    elif field == "family":
        raw.pop("family")
    else:
        raw[field] = BAD_FIELDS[field]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as err:
        load_workload(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_workload_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("family: clip\n  data: [\n")
    with pytest.raises(InputError) as err:
        load_workload(path)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        load_workload(tmp_path / "missing.yaml")
