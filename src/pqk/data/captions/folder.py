"""Users' own image-text data from a folder: captions, VQA questions, or class folders.

``load_folder(path, image_size)`` reads whichever the folder holds (see ``FOLDER_FORMAT``):

- ``captions.jsonl`` (retrieval) and/or ``questions.jsonl`` (VQA), images anywhere below the
  folder, named by relative path; when both files exist, questions are about captioned images;
- otherwise ImageNet-style class folders (zero-shot classification).

Every image goes through CLIP's preprocessing (``preprocess.clip_resize_crop``). Bad input is a
one-line ``InputError`` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pqk.data.captions.preprocess import load_image
from pqk.data.captions.types import ImageTextSet, VQAItem
from pqk.data.captions.vocabulary import ANSWER_TYPES
from pqk.errors import InputError

CAPTIONS_FILE = "captions.jsonl"
QUESTIONS_FILE = "questions.jsonl"
CLASSES_FILE = "classes.txt"
PROMPTS_FILE = "prompts.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PROMPTS = ["a photo of a {}."]

FOLDER_FORMAT = """\
my_captions/                    # retrieval (and VQA on the same images)
  captions.jsonl                # one JSON object per line:
                                #   {"image": "images/0001.jpg", "captions": ["a dog on a sofa.", "..."]}
                                #   or {"image": "...", "caption": "..."}; an image on several lines
                                #   gets all their captions (a COCO/Flickr30k export fits as is)
  questions.jsonl               # optional: {"image": "...", "question": "is there a dog?",
                                #   "answer": "yes", "answer_type": "yes/no|number|other",
                                #   "choices": ["yes", "no"]}  (choices optional)
  images/...                    # any layout; paths are relative to the folder
my_vqa/                         # VQA only: questions.jsonl + images (no retrieval)
my_classes/                     # zero-shot classification
  <class_id>/*.jpg|png|...      # one folder per class, images directly inside
  classes.txt                   # optional: <class_id><TAB><readable name> per line
  prompts.txt                   # optional: one template with {} per line (default "a photo of a {}.")"""


# --------------------------------------------------------------------------- #
# Small readers
# --------------------------------------------------------------------------- #
def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise InputError(f"image_size must be a whole number >= 8; got {image_size!r}")
    return image_size


def _root(path: str | Path) -> Path:
    root = Path(path)
    if not root.exists():
        raise InputError(f"data folder does not exist: {str(root)!r}")
    if not root.is_dir():
        raise InputError(f"data path is not a folder: {str(root)!r}")
    return root


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a UTF-8 file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _jsonl(path: Path, example: str) -> list[tuple[int, dict]]:
    lines = _text_lines(path)
    if not lines:
        raise InputError(f"{path} is empty: expected one JSON object per line, e.g. {example}")
    out = []
    for n, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path} line {n}: expected a JSON object such as {example}; got {type(value).__name__}")
        out.append((n, value))
    return out


def _string(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {what} must be a non-empty string; got {value!r}")
    return " ".join(value.split())


def _canonical(text: str) -> str:
    return " ".join(text.lower().split())


class _Images:
    """Each referenced image loaded once, in order of first reference."""

    def __init__(self, root: Path, size: int):
        self.root, self.size = root, size
        self.index: dict[str, int] = {}
        self.pixels: list[np.ndarray] = []

    def add(self, name: str, where: str) -> int:
        if name not in self.index:
            self.pixels.append(load_image(self.root / name, self.size, where=f"{where}: "))
            self.index[name] = len(self.pixels) - 1
        return self.index[name]

    def tensor(self) -> torch.Tensor:
        if not self.pixels:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return torch.from_numpy(np.stack(self.pixels)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- #
# captions.jsonl / questions.jsonl
# --------------------------------------------------------------------------- #
_CAPTION_EXAMPLE = '{"image": "images/0001.jpg", "captions": ["a dog on a sofa."]}'
_QUESTION_EXAMPLE = ('{"image": "images/0001.jpg", "question": "is there a dog?", "answer": "yes", '
                     '"answer_type": "yes/no"}')


def _read_captions(path: Path, images: _Images) -> list[list[str]]:
    captions: list[list[str]] = []
    for n, row in _jsonl(path, _CAPTION_EXAMPLE):
        where = f"{path} line {n}"
        name = _string(row.get("image"), '"image"', where)
        if "captions" in row:
            texts = row["captions"]
            if not isinstance(texts, list) or not texts:
                raise InputError(f'{where}: "captions" must be a non-empty list of strings; got {texts!r}')
        elif "caption" in row:
            texts = [row["caption"]]
        else:
            raise InputError(f'{where}: no "captions" (list) or "caption" (string); expected e.g. {_CAPTION_EXAMPLE}')
        texts = [_string(t, "every caption", where) for t in texts]
        index = images.add(name, where)
        if index == len(captions):
            captions.append([])
        captions[index].extend(texts)
    return captions


def _read_questions(path: Path, images: _Images, captioned: bool) -> list[VQAItem]:
    rows = []
    for n, row in _jsonl(path, _QUESTION_EXAMPLE):
        where = f"{path} line {n}"
        name = _string(row.get("image"), '"image"', where)
        question = _string(row.get("question"), '"question"', where)
        answer = _canonical(_string(row.get("answer"), '"answer"', where))
        kind = row.get("answer_type")
        if kind not in ANSWER_TYPES:
            raise InputError(f'{where}: answer_type {kind!r} is not known; accepted: {", ".join(ANSWER_TYPES)}')
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not choices:
                raise InputError(f'{where}: "choices" must be a non-empty list of strings; got {choices!r}')
            choices = list(dict.fromkeys(_canonical(_string(c, "every choice", where)) for c in choices))
            if answer not in choices:
                raise InputError(f"{where}: the answer {answer!r} is not among the choices {choices}")
        elif kind == "yes/no" and answer not in ("yes", "no"):
            raise InputError(f'{where}: a yes/no answer must be "yes" or "no"; got {answer!r}')
        if captioned and name not in images.index:
            raise InputError(f"{where}: image {name!r} has no captions in {CAPTIONS_FILE}; when both files exist, "
                             "questions are about captioned images (put other images' questions in their own folder)")
        rows.append((images.add(name, where), question, answer, kind, choices))
    # Without choices: every answer of the same answer type in the file (sorted); yes/no: yes, no.
    pools = {kind: sorted({a for _, _, a, k, _ in rows if k == kind}) for kind in ANSWER_TYPES}
    pools["yes/no"] = ["yes", "no"]
    return [VQAItem(i, q, a, k, c if c is not None else list(pools[k])) for i, q, a, k, c in rows]


def _load_jsonl_set(root: Path, image_size: int) -> ImageTextSet:
    images = _Images(root, image_size)
    captions_file, questions_file = root / CAPTIONS_FILE, root / QUESTIONS_FILE
    captions = _read_captions(captions_file, images) if captions_file.is_file() else []
    vqa = _read_questions(questions_file, images, captioned=bool(captions)) if questions_file.is_file() else []
    captions += [[] for _ in range(len(images.pixels) - len(captions))]
    meta = [{"file": name} for name in images.index]
    return ImageTextSet(name=root.resolve().name, images=images.tensor(), captions=captions, vqa=vqa, meta=meta)


def load_caption_folder(path: str | Path, image_size: int = 64) -> ImageTextSet:
    """A folder with captions.jsonl (required) and questions.jsonl (optional)."""
    root = _root(path)
    if not (root / CAPTIONS_FILE).is_file():
        raise InputError(f"{root} has no {CAPTIONS_FILE}; see the folder format (one JSON object per line, "
                         f"e.g. {_CAPTION_EXAMPLE})")
    return _load_jsonl_set(root, _check_size(image_size))


def load_vqa_folder(path: str | Path, image_size: int = 64) -> ImageTextSet:
    """A folder with questions.jsonl (required) and captions.jsonl (optional)."""
    root = _root(path)
    if not (root / QUESTIONS_FILE).is_file():
        raise InputError(f"{root} has no {QUESTIONS_FILE}; see the folder format (one JSON object per line, "
                         f"e.g. {_QUESTION_EXAMPLE})")
    return _load_jsonl_set(root, _check_size(image_size))


# --------------------------------------------------------------------------- #
# Class folders
# --------------------------------------------------------------------------- #
def _read_classes(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in _text_lines(path):
        if line.startswith("#"):
            continue
        class_id, _, name = line.partition("\t") if "\t" in line else line.partition(" ")
        class_id, name = class_id.strip(), " ".join(name.split())
        if not class_id or not name:
            raise InputError(f"{path} line {n}: expected '<class_id><TAB><readable name>'; got {line!r}")
        if class_id in out:
            raise InputError(f"{path} line {n}: class {class_id!r} is listed twice")
        out[class_id] = name
    if not out:
        raise InputError(f"{path} is empty: expected '<class_id><TAB><readable name>' per line")
    return out


def _read_prompts(path: Path) -> list[str]:
    prompts = []
    for n, line in _text_lines(path):
        if line.startswith("#"):
            continue
        try:
            ok = line.count("{}") == 1 and line.format("x") == line.replace("{}", "x")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{path} line {n}: a prompt needs exactly one {{}} for the class name "
                             f"(and no other braces); got {line!r}")
        prompts.append(line)
    if not prompts:
        raise InputError(f"{path} is empty: expected one template with {{}} per line, e.g. 'a photo of a {{}}.'")
    return prompts


def _class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_class_folders(path: str | Path, image_size: int = 64) -> ImageTextSet:
    """ImageNet-style class folders: root/<class_id>/<images>, optional classes.txt and prompts.txt.

    Classes are ordered as in classes.txt (a listed class without a folder stays a candidate
    class with no images), else by folder name with '_' read as a space. Images are taken in
    class order, then file name order; captions are empty (no retrieval).
    """
    root = _root(path)
    size = _check_size(image_size)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"no {CAPTIONS_FILE}, {QUESTIONS_FILE} or class folders in {str(root)!r}; "
                         "see the folder format")
    listed = _read_classes(root / CLASSES_FILE) if (root / CLASSES_FILE).is_file() else None
    if listed is None:
        listed = {p.name: p.name.replace("_", " ") for p in folders}
    else:
        unlisted = [p.name for p in folders if p.name not in listed]
        if unlisted:
            raise InputError(f"class folder {unlisted[0]!r} is not listed in {root / CLASSES_FILE}")
    prompts = _read_prompts(root / PROMPTS_FILE) if (root / PROMPTS_FILE).is_file() else list(DEFAULT_PROMPTS)
    class_ids = list(listed)
    images = _Images(root, size)
    labels, meta = [], []
    for folder in folders:
        files = _class_images(folder)
        if not files:
            raise InputError(f"class folder {str(folder)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        for file in files:
            name = file.relative_to(root).as_posix()
            images.add(name, f"class folder {folder.name!r}")
            labels.append(class_ids.index(folder.name))
            meta.append({"file": name, "class_id": folder.name})
    order = sorted(range(len(labels)), key=lambda k: (labels[k], meta[k]["file"]))
    data = ImageTextSet(name=root.resolve().name, images=images.tensor(), captions=[[] for _ in labels],
                        class_names=[listed[c] for c in class_ids], labels=labels, prompts=prompts, meta=meta)
    return data.subset(order)


def load_folder(path: str | Path, image_size: int = 64) -> ImageTextSet:
    """captions.jsonl and/or questions.jsonl when present, else class folders (FOLDER_FORMAT)."""
    root = _root(path)
    if (root / CAPTIONS_FILE).is_file() or (root / QUESTIONS_FILE).is_file():
        return _load_jsonl_set(root, _check_size(image_size))
    return load_class_folders(root, image_size)
