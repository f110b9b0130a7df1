"""The semantic-aligned prompt generator (spec §2.2), as far as it works offline.

Paper: defect words -> WordNet synonyms -> x object category x CLIP templates = a library of
sentences; per training image, the sentence whose CLIP text embedding is closest (cosine) to the
image's CLIP embedding becomes its prompt. Here WordNet and CLIP are unavailable, so:

* :data:`SYNONYMS` is a built-in synonym table per NEU-Seg class (the WordNet stand-in);
* :data:`TEMPLATES` are sentence skeletons written for strip-inspection images;
* :class:`TinyClip` is a small dual encoder trained from scratch, contrastively, on the labelled
  subset: a text embedding table (token embeddings, mean-pooled, projected) and a small image CNN.

Its only supervision is the class of each image, so it learns which words go with which class;
what the paper gets from CLIP's prior (a prompt that describes *this* image's look) cannot be
reproduced without pretrained encoders. The text embedding of the selected prompt is the UNet's
cross-attention condition (:meth:`TinyClip.encode_text`), which ties prompt choice and
conditioning to one embedding space.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["SYNONYMS", "CATEGORIES", "TEMPLATES", "PromptLibrary", "build_library", "TinyClip",
           "train_tinyclip", "select_prompts"]

#: NEU-Seg class -> defect words (the first is the class name itself). Why a table: WordNet's
#: corpus needs a download; these are the synsets an inspector would use for each class.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "inclusion": ("inclusion", "slag inclusion", "nonmetallic inclusion", "embedded particle",
                  "impurity", "dark speck"),
    "patches": ("patches", "patch", "blotch", "stain", "discoloured area", "mottled region"),
    "scratches": ("scratches", "scratch", "scrape", "abrasion", "score mark", "linear groove"),
}

#: the "workpiece category" slot of the paper's composition rule
CATEGORIES: tuple[str, ...] = ("steel strip", "hot-rolled steel surface")

#: sentence skeletons; "{}" takes "<defect word> on a <category>"
TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a grey photo of {}.",
    "a close-up photo of {}.",
    "a cropped photo of {}.",
    "a low resolution photo of {}.",
    "a bright photo of {}.",
    "a dark photo of {}.",
    "a blurry photo of {}.",
    "an inspection image of {}.",
    "a camera image of {}.",
    "a greyscale image of {}.",
    "a good photo of {}.",
)

_TOKEN = re.compile(r"[a-z0-9\-]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words (hyphenated words kept whole); punctuation dropped."""
    return _TOKEN.findall(text.lower())


@dataclass
class PromptLibrary:
    """Every candidate sentence, its class, and the token ids the text encoder reads."""

    prompts: list[str]
    classes: list[str]  # class name of each prompt
    vocab: list[str]  # index 0 is padding
    max_len: int

    @property
    def class_names(self) -> list[str]:
        return list(dict.fromkeys(self.classes))

    def token_ids(self, texts: Sequence[str] | None = None) -> torch.Tensor:
        """[N, max_len] int64, 0-padded; unknown words map to padding (ignored by the encoder)."""
        index = {w: i for i, w in enumerate(self.vocab)}
        texts = self.prompts if texts is None else texts
        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [index.get(w, 0) for w in tokenize(t)][: self.max_len]
            out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def of_class(self, name: str) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c == name]

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "classes": self.classes, "vocab": self.vocab,
                "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptLibrary":
        return cls(list(d["prompts"]), list(d["classes"]), list(d["vocab"]), int(d["max_len"]))


def build_library(classes: Sequence[str], synonyms: dict[str, Sequence[str]] | None = None,
                  categories: Sequence[str] = CATEGORIES,
                  templates: Sequence[str] = TEMPLATES) -> PromptLibrary:
    """synonyms x categories x templates per class, de-duplicated, in a fixed order.

    >>> lib = build_library(["scratches"], {"scratches": ["scratch"]}, ["steel"], ["a {}."])
    >>> lib.prompts
    ['a scratch on a steel.']
    """
    synonyms = SYNONYMS if synonyms is None else synonyms
    prompts: list[str] = []
    owners: list[str] = []
    seen: set[str] = set()
    for c in classes:
        if c not in synonyms:
            raise ValueError(f"no defect words for class {c!r}; known: {sorted(synonyms)}")
        for word in synonyms[c]:
            for cat in categories:
                for tpl in templates:
                    p = tpl.format(f"{word} on a {cat}")
                    if p not in seen:
                        seen.add(p)
                        prompts.append(p)
                        owners.append(c)
    vocab = ["<pad>"] + sorted({w for p in prompts for w in tokenize(p)})
    max_len = max(len(tokenize(p)) for p in prompts)
    return PromptLibrary(prompts, owners, vocab, max_len)


class TinyClip(nn.Module):
    """A small dual encoder: text = token embedding table + positions, mean over real tokens,
    linear projection; image = 4 stride-2 conv stages, global mean, linear projection. Both
    outputs are L2-normalised ``dim``-vectors compared by cosine (eq. 3)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 64, width: int = 16,
                 in_channels: int = 1):
        super().__init__()
        self.dim = dim
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.text_proj = nn.Linear(dim, dim)
        layers: list[nn.Module] = []
        c = in_channels
        for k in range(4):
            w = width * 2 ** k
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(4, w), nn.SiLU()]
            c = w
        self.image_net = nn.Sequential(*layers)
        self.image_proj = nn.Linear(c, dim)
        # CLIP's learnable temperature, started at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids > 0).unsqueeze(-1).to(self.pos.dtype)
        h = (self.tok(ids) + self.pos[: ids.shape[1]]) * keep
        h = h.sum(1) / keep.sum(1).clamp_min(1.0)
        return F.normalize(self.text_proj(h), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        h = self.image_net(x).mean(dim=(2, 3))
        return F.normalize(self.image_proj(h), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair of the same class counts as a positive. Why
    multi-positive: with three classes a batch always repeats classes, and plain InfoNCE would
    push apart an image and a correct caption of another image of its class."""
    logits = scale.exp().clamp(max=100.0) * img @ txt.t()
    pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean()
                  - (target.t() * F.log_softmax(logits.t(), 1)).sum(1).mean())


def train_tinyclip(model: TinyClip, lib: PromptLibrary, images: torch.Tensor, labels: Sequence[str],
                   steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
                   ) -> list[float]:
    """Train ``model`` on (image, random library prompt of its class) pairs; returns the loss per
    step. ``images`` [N, 1, H, W] in [-1, 1]; ``labels`` the class name of each image."""
    g = torch.Generator().manual_seed(seed)
    ids = lib.token_ids()
    names = lib.class_names
    by_class = [torch.tensor(lib.of_class(c)) for c in names]
    y = torch.tensor([names.index(c) for c in labels])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        x = images[pick]
        if augment is not None:
            x = augment(x, g)
        yc = y[pick]
        tp = torch.stack([by_class[int(c)][torch.randint(0, len(by_class[int(c)]), (1,), generator=g)]
                          for c in yc]).squeeze(1)
        loss = contrastive_loss(model.encode_image(x), model.encode_text(ids[tp]), yc,
                                model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def select_prompts(image_emb: torch.Tensor, text_emb: torch.Tensor,
                   allowed: Sequence[Sequence[int]] | None = None) -> tuple[list[int], torch.Tensor]:
    """Eq. (4): per image, the index of the highest-cosine prompt, and those scores.

    ``allowed`` (optional, per image) restricts the argmax to those prompt indices: the
    training images' class is known, so a prompt naming another class is never chosen even when
    the small encoder scores it higher (the paper's candidates are per object category too).
    """
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()
    if allowed is not None:
        mask = torch.full_like(sims, float("-inf"))
        for r, idx in enumerate(allowed):
            mask[r, list(idx)] = 0.0
        sims = sims + mask
    best = sims.argmax(1)
    return [int(i) for i in best], sims.gather(1, best[:, None]).squeeze(1)
