"""The CLIP family's quality metrics, computed from embeddings (any model, any backend).

- Retrieval (COCO/Flickr protocol): every image against every caption of the set. Image→text
  R@k: the share of images with at least one of their own captions among the k most similar
  captions. Text→image R@k: the share of captions whose image is among the k most similar
  images. `r_mean` is the mean of the six recalls (R@1/5/10 both ways).
- Zero-shot classification: each class is the normalised mean of its prompts' normalised text
  embeddings (CLIP's prompt ensembling); top-1 / top-5 accuracy over the images.
- VQA with a dual encoder: each candidate answer becomes one text ("<question> <answer>"), the
  image picks the most similar; accuracy overall and per answer type (yes/no, number, other).

Ties are broken by index (the first candidate wins), the same for every model.
"""

from __future__ import annotations

import math

import torch

KS = (1, 5, 10)
ANSWER_TYPES = ("yes/no", "number", "other")


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rank_of_best_hit(scores: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based rank of the best-scored hit (ties counted pessimistically: a hit
    tied with a non-hit ranks after it, so a constant model is not rewarded)."""
    best_hit = torch.where(hits, scores, torch.full_like(scores, -math.inf)).max(dim=1).values
    return (scores > best_hit[:, None]).sum(dim=1) + ((scores == best_hit[:, None]) & ~hits).sum(dim=1)


def retrieval_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: list[int]) -> dict[str, float]:
    """R@1/5/10 image→text and text→image, and their mean. `text_image[j]` is the image of
    caption j."""
    sims = normalise(image_emb.double()) @ normalise(text_emb.double()).T  # (N_img, N_txt)
    owner = torch.tensor(text_image)
    own = owner[None, :] == torch.arange(len(image_emb))[:, None]  # (N_img, N_txt)
    i2t = _rank_of_best_hit(sims, own)
    t2i = _rank_of_best_hit(sims.T, own.T)
    out = {}
    for k in KS:
        out[f"r{k}_i2t"] = float((i2t < k).double().mean())
        out[f"r{k}_t2i"] = float((t2i < k).double().mean())
    out["r_mean"] = sum(out[f"r{k}_{d}"] for k in KS for d in ("i2t", "t2i")) / (2 * len(KS))
    return out


def chance_recalls(n_images: int, captions_per_image: list[int]) -> dict[str, float]:
    """The expected recalls of a random ranking (exact: hypergeometric for image→text)."""
    n_texts = sum(captions_per_image)
    out = {}
    for k in KS:
        kk = min(k, n_texts)
        i2t = [1.0 - math.comb(n_texts - m, kk) / math.comb(n_texts, kk) for m in captions_per_image]
        out[f"r{k}_i2t"] = sum(i2t) / len(i2t)
        out[f"r{k}_t2i"] = min(k, n_images) / n_images
    out["r_mean"] = sum(out[f"r{k}_{d}"] for k in KS for d in ("i2t", "t2i")) / (2 * len(KS))
    return out


def class_embeddings(prompt_emb: torch.Tensor, n_classes: int, n_prompts: int) -> torch.Tensor:
    """(n_classes * n_prompts, E) prompt embeddings, class-major -> (n_classes, E) class vectors."""
    per_class = normalise(prompt_emb.double()).reshape(n_classes, n_prompts, -1).mean(dim=1)
    return normalise(per_class)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: list[int]) -> dict[str, float]:
    scores = normalise(image_emb.double()) @ class_emb.T
    target = torch.tensor(labels)
    hits = torch.zeros_like(scores, dtype=torch.bool)
    hits[torch.arange(len(labels)), target] = True
    rank = _rank_of_best_hit(scores, hits)
    return {"zs_top1": float((rank < 1).double().mean()),
            "zs_top5": float((rank < min(5, scores.shape[1])).double().mean())}


def vqa_texts(question: str, choices: list[str]) -> list[str]:
    """The texts a dual encoder scores for one question: the question followed by each answer."""
    return [f"{question} {choice}" for choice in choices]


def vqa_accuracy(image_emb: torch.Tensor, choice_emb: list[torch.Tensor], answers: list[int],
                 answer_types: list[str]) -> dict[str, float | None]:
    """`image_emb[q]` is the embedding of question q's image, `choice_emb[q]` its candidate
    texts' embeddings, `answers[q]` the index of the right one. Accuracy overall and per answer type (None for a type with no question)."""
    right: dict[str, list[bool]] = {t: [] for t in ANSWER_TYPES}
    image = normalise(image_emb.double())
    for q, (emb, answer, kind) in enumerate(zip(choice_emb, answers, answer_types)):
        scores = normalise(emb.double()) @ image[q]
        right.setdefault(kind, []).append(int(torch.argmax(scores)) == answer)
    every = [r for values in right.values() for r in values]
    out: dict[str, float | None] = {"vqa_acc": sum(every) / len(every) if every else None}
    for kind in ANSWER_TYPES:
        values = right[kind]
        out[f"vqa_{_column(kind)}"] = sum(values) / len(values) if values else None
    return out


def vqa_chance(choice_counts: list[int], answer_types: list[str]) -> dict[str, float | None]:
    """Expected accuracy of picking an answer at random among each question's candidates."""
    per: dict[str, list[float]] = {t: [] for t in ANSWER_TYPES}
    for n, kind in zip(choice_counts, answer_types):
        per.setdefault(kind, []).append(1.0 / n)
    every = [p for values in per.values() for p in values]
    out: dict[str, float | None] = {"vqa_acc": sum(every) / len(every) if every else None}
    for kind in ANSWER_TYPES:
        out[f"vqa_{_column(kind)}"] = sum(per[kind]) / len(per[kind]) if per[kind] else None
    return out


def _column(answer_type: str) -> str:
    return answer_type.replace("/", "")
