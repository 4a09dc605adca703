"""The bag-of-attributes matcher: a trivial image–text "model" the teacher must clearly beat.

Its image embedding is the multi-hot vector of the vocabulary words a hand-written pixel
detector finds in the image (`pqk.data.captions.image_attributes`: which named colours cover
enough of the picture); its text embedding is the multi-hot vector of the vocabulary words the
text contains (`caption_attributes`). Cosine similarity then counts shared words. It plugs into
the same scoring code as every model (`set_quality`), so its figures are comparable.
"""

from __future__ import annotations

import torch


class AttributeMatcher:
    description = "bag-of-attributes matcher"

    def __init__(self, data):
        from pqk.data.captions import caption_attributes, vocabulary

        self.words = sorted(vocabulary())
        self.index = {w: k for k, w in enumerate(self.words)}
        self.resolution = int(data.images.shape[-1])
        self._caption_attributes = caption_attributes

    def _multi_hot(self, attributes: set[str]) -> torch.Tensor:
        v = torch.zeros(len(self.words))
        for word in attributes:
            if word in self.index:
                v[self.index[word]] = 1.0
        return v

    def tokenize(self, texts: list[str]) -> list[str]:
        return list(texts)

    def texts(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._multi_hot(self._caption_attributes(t)) for t in texts])

    def images(self, x: torch.Tensor) -> torch.Tensor:
        from pqk.data.captions import image_attributes
        from pqk.models.clip import CLIP_MEAN, CLIP_STD

        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        return torch.stack([self._multi_hot(image_attributes(p.permute(1, 2, 0).numpy())) for p in pixels])
