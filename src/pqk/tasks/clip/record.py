"""The CLIP family's record: the protocol's method, resource, cost and bookkeeping fields (as
DUSt3R's), with retrieval, zero-shot and VQA quality columns and latency per image and per
text in place of DUSt3R's depth, Chamfer and pair latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ClipRecord:
    """One experiment of the CLIP family. None = not applicable (an empty cell)."""

    exp_id: str
    combo: str
    rho: float | None = None
    T: float | None = None
    beta: float | None = None
    gamma: float | None = None
    bits_w: int | None = 32
    bits_a: int | None = 32
    keep_list: str = ""
    params_M: float | None = None
    flops_G: float | None = None  # one image + one caption (encode_image + encode_text at batch 1)
    size_MB: float | None = None
    vram_GB: float | None = None
    r1_i2t: float | None = None
    r5_i2t: float | None = None
    r10_i2t: float | None = None
    r1_t2i: float | None = None
    r5_t2i: float | None = None
    r10_t2i: float | None = None
    r_mean: float | None = None
    zs_top1: float | None = None
    zs_top5: float | None = None
    vqa_acc: float | None = None
    vqa_yesno: float | None = None
    vqa_number: float | None = None
    vqa_other: float | None = None
    t_image_p50_ms: float | None = None
    t_image_p95_ms: float | None = None
    images_per_sec: float | None = None
    t_text_p50_ms: float | None = None
    t_text_p95_ms: float | None = None
    texts_per_sec: float | None = None
    gpu_hours: float | None = None
    notes: str = ""
    seed: int = 42
    datetime: str = ""

    def as_row(self) -> dict[str, Any]:
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}
