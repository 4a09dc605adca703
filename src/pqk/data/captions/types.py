"""The data of the CLIP family: a set of images with captions, zero-shot classes and VQA items."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch


@dataclass
class VQAItem:
    """One question about one image. A dual encoder answers by scoring each candidate text
    (question + choice) against the image; `answer` is one of `choices`."""

    image: int  # index into the set's images
    question: str
    answer: str  # canonical answer (lower case)
    answer_type: str  # "yes/no" | "number" | "other"
    choices: list[str]  # candidate answers the model scores (includes answer)


@dataclass
class ImageTextSet:
    """Images (N, 3, H, W) uint8 RGB, kept uint8 to save memory: callers normalise.

    - captions: per image; for retrieval any caption of an image counts as a hit. Every set
      pqk makes has >= 1 caption per image, except a folder of class folders or of questions
      only (no captions.jsonl), whose lists are empty: see `tasks()`.
    - class_names / labels / prompts: zero-shot classification. Each class's text embedding is
      the mean of the embeddings of every prompt (a template with "{}") filled with the class
      name (CLIP's prompt ensembling); labels index class_names, one per image.
    - vqa: questions with candidate answers (`VQAItem`).
    - meta: per image, where it came from (a generated scene's description, a file name,
      a licence); not part of the content hash.
    """

    name: str
    images: torch.Tensor
    captions: list[list[str]]
    class_names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    vqa: list[VQAItem] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) uint8; got {tuple(self.images.shape)} {self.images.dtype}")
        if len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} caption lists for {n} images")
        if self.class_names and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} images")
        if any(not 0 <= label < len(self.class_names) for label in self.labels):
            raise ValueError("a label is outside the class list")
        if self.meta and len(self.meta) != n:
            raise ValueError(f"{len(self.meta)} meta entries for {n} images")
        for item in self.vqa:
            if not 0 <= item.image < n or item.answer not in item.choices:
                raise ValueError(f"VQA item {item.question!r}: image index or answer out of range")

    def __len__(self) -> int:
        return len(self.images)

    def tasks(self) -> list[str]:
        """Which evaluations the set supports: "retrieval" (every image has a caption),
        "zero-shot" (classes and labels), "vqa" (questions)."""
        out = []
        if len(self) and all(self.captions):
            out.append("retrieval")
        if self.class_names and self.labels:
            out.append("zero-shot")
        if self.vqa:
            out.append("vqa")
        return out

    def subset(self, indices) -> ImageTextSet:
        """The images at `indices` (in that order) with their captions, labels, meta and questions."""
        indices = [int(i) for i in indices]
        new_index = {old: new for new, old in enumerate(indices)}
        return ImageTextSet(
            name=self.name,
            images=self.images[indices].clone() if indices else self.images[:0].clone(),
            captions=[list(self.captions[i]) for i in indices],
            class_names=list(self.class_names),
            labels=[self.labels[i] for i in indices] if self.labels else [],
            prompts=list(self.prompts),
            vqa=[VQAItem(new_index[item.image], item.question, item.answer, item.answer_type, list(item.choices))
                 for item in self.vqa if item.image in new_index],
            meta=[dict(self.meta[i]) for i in indices] if self.meta else [],
        )


def content_hash(data: ImageTextSet) -> str:
    """sha256 over the image bytes (with dtype and shape), captions, class names, labels, prompts
    and VQA items, in order. The name and meta are not content."""
    h = hashlib.sha256()
    images = data.images.contiguous()
    h.update(f"{images.dtype}{tuple(images.shape)}".encode())
    h.update(images.numpy().tobytes())
    text = {
        "captions": data.captions,
        "class_names": data.class_names,
        "labels": [int(v) for v in data.labels],
        "prompts": data.prompts,
        "vqa": [[v.image, v.question, v.answer, v.answer_type, v.choices] for v in data.vqa],
    }
    h.update(json.dumps(text, ensure_ascii=False, separators=(",", ":")).encode())
    return h.hexdigest()
