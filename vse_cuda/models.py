"""Dual encoders for the training harness: projection heads over precomputed image and caption
features, and a bidirectional GRU over word embeddings for raw captions (as VSE++ / VSE∞).
Both sides output L2-normalized float32 embeddings, so S = img·txtᵀ is the cosine similarity
the losses expect (spec §1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """``fc(x) + mlp(x)`` as VSE∞'s precomputed-feature encoder (without its BatchNorm, whose
    batch statistics would make embeddings depend on the batch); ``hidden=0`` is a linear head."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp = (nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
                    if hidden > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if self.mlp is None else y + self.mlp(x)


class ImageEncoder(nn.Module):
    """Pooled [B, d] or region [B, r, d] features (regions mean-pooled) → unit-norm [B, embed]."""

    def __init__(self, feature_dim: int, embed_dim: int, hidden: int = 0):
        super().__init__()
        self.head = ProjectionHead(feature_dim, embed_dim, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            features = features.mean(dim=1)
        return _l2norm(self.head(features))


class FeatureTextEncoder(nn.Module):
    """Precomputed caption features [B, d] → unit-norm [B, embed]."""

    def __init__(self, feature_dim: int, embed_dim: int, hidden: int = 0):
        super().__init__()
        self.head = ProjectionHead(feature_dim, embed_dim, hidden)

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return _l2norm(self.head(captions))


class GRUTextEncoder(nn.Module):
    """Token ids [B, L] (padded with 0) → word embeddings → 1-layer bidirectional GRU; the two
    directions are averaged (VSE∞) and mean-pooled over each caption's words → unit-norm [B, embed]."""

    def __init__(self, vocab_size: int, embed_dim: int, word_dim: int = 300):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            raise ValueError("GRUTextEncoder needs the caption lengths")
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        out = out.view(out.size(0), out.size(1), 2, -1).mean(dim=2)
        mask = (torch.arange(tokens.size(1), device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None])
        pooled = (out * mask[:, :, None]).sum(1) / lengths.to(out.device, out.dtype)[:, None]
        return _l2norm(pooled)


#: CLIP's bound on its learnable temperature γ = exp(logit_scale) [open_clip train.py].
MAX_LOGIT_SCALE = math.log(100)


class DualEncoder(nn.Module):
    """An image encoder and a text encoder sharing one embedding space and, for the CLIP-style
    losses, a learnable temperature ``logit_scale`` (a log: γ = exp(logit_scale)) and, for
    SigLIP, a learnable ``logit_bias``; None where the loss has none."""

    def __init__(self, image: nn.Module, text: nn.Module, logit_scale: float | None = None,
                 logit_bias: float | None = None):
        super().__init__()
        self.image = image
        self.text = text
        self.logit_scale = None if logit_scale is None else nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)))

    def logit_options(self) -> dict[str, torch.Tensor]:
        """The learned loss options a CLIP-style loss takes: scale = exp(logit_scale), bias."""
        options = {} if self.logit_scale is None else {"scale": self.logit_scale.exp()}
        return options if self.logit_bias is None else {**options, "bias": self.logit_bias}

    def clamp_logit_scale(self) -> None:
        """Keep γ in [1, 100] after an optimizer step, as CLIP does (open_clip clamps the
        parameter in place; clamping exp() instead would zero its gradient above 100)."""
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def build_model(*, image_dim: int, caption_dim: int | None, vocab_size: int | None, embed_dim: int,
                head_hidden: int, word_dim: int, logit_scale: float | None = None,
                logit_bias: float | None = None) -> DualEncoder:
    """Projection heads for features; a BiGRU text side when ``caption_dim`` is None (raw
    captions); learnable ``logit_scale`` and ``logit_bias`` parameters when given (their initial values)."""
    image = ImageEncoder(image_dim, embed_dim, head_hidden)
    if caption_dim is not None:
        text: nn.Module = FeatureTextEncoder(caption_dim, embed_dim, head_hidden)
    elif vocab_size is not None:
        text = GRUTextEncoder(vocab_size, embed_dim, word_dim)
    else:
        raise ValueError("build_model needs caption_dim (caption features) or vocab_size (raw captions)")
    return DualEncoder(image, text, logit_scale, logit_bias)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # float32 whatever the autocast dtype: both sides then agree on dtype and the norm is exact.
    return F.normalize(x.float(), dim=-1)
