"""Attention for images and video: fewer keys (spatial reduction) or fewer axes at once (divided).

An image of ``height x width`` patches is a sequence of ``N = height * width`` tokens, a video of
``F`` frames one of ``F * N``, and full attention over them costs ``N^2`` scores per head. Beside
the 2-D neighbourhood attention of :mod:`.kernels` (each pixel sees a ``k x k`` square), two
standard ways out:

- **Spatial-reduction attention** (PVT, Wang et al., 2021; Segformer, Xie et al., 2021): every
  query keeps full resolution, but keys and values come from the feature map shrunk by a
  factor ``R`` in each direction (a strided ``R x R`` reduction), so there are ``N / R^2`` of
  them: ``N^2 / R^2`` scores. The function here reduces by averaging each ``R x R`` patch (as
  PVT v2's linear SRA); the layer learns the reduction (a ``R x R`` convolution with stride
  ``R``, then LayerNorm, as PVT and Segformer).
- **Divided space-time attention** (TimeSformer, Bertasius et al., 2021): attend over time
  first (each patch to the same patch in every frame, ``F`` keys), then over space (each patch
  to every patch of its own frame, ``N`` keys): ``F N (F + N)`` scores instead of ``(F N)^2``.
  Two hops connect any two tokens.

Images of tokens are ``(B, H, height, width, D)`` like :func:`neighborhood_attention_2d`; videos
``(B, H, F, N, D)`` with the ``N`` patches of a frame flattened row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_divisible,
    check_int,
    check_like,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import attention

__all__ = [
    "spatial_reduction",
    "spatial_reduction_attention",
    "SpatialReductionAttention",
    "time_attention",
    "space_attention",
    "DividedSpaceTimeAttention",
    "VisionAttentionCost",
    "vision_attention_cost",
]


def _check_same_layout(q: object, k: object, v: object, ndim: int, names: str) -> tuple[int, ...]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=ndim, floating=True)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    check_shape(k, "k", q.shape, names=names)
    check_shape(v, "v", (*q.shape[:-1], None), names=names.rsplit(",", 1)[0] + ", D_v")
    check_like(k, "k", q)
    check_like(v, "v", q)
    return tuple(q.shape)


# --- spatial reduction (PVT, Segformer) ------------------------------------------------------------


def spatial_reduction(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Average each ``ratio x ratio`` patch of an image of tokens ``(B, H, height, width, D)``.

    Returns ``(B, H, ceil(height / ratio), ceil(width / ratio), D)``; a patch cut by the border
    is averaged over the pixels it has (none is dropped).
    """
    check_tensor(x, "x", ndim=5, floating=True)
    ratio = check_int(ratio, "ratio", min=1)
    B, H, height, width, D = x.shape
    rows, cols = -(-height // ratio), -(-width // ratio)
    padded = F.pad(x, (0, 0, 0, cols * ratio - width, 0, rows * ratio - height))
    sums = padded.view(B, H, rows, ratio, cols, ratio, D).sum(dim=(3, 5))
    row_counts = (height - torch.arange(rows, device=x.device) * ratio).clamp(max=ratio)
    col_counts = (width - torch.arange(cols, device=x.device) * ratio).clamp(max=ratio)
    counts = (row_counts.unsqueeze(1) * col_counts.unsqueeze(0)).to(sums.dtype)
    return sums / counts.view(1, 1, rows, cols, 1)


def spatial_reduction_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ratio: int, *, scale: float | None = None
) -> torch.Tensor:
    """Every pixel's query attends to the ``ratio``-reduced keys and values of the whole image.

    q, k ``(B, H, height, width, D)``, v ``(B, H, height, width, D_v)``. Keys and values are
    averaged over ``ratio x ratio`` patches (:func:`spatial_reduction`), leaving
    ``ceil(height / ratio) * ceil(width / ratio)`` of them. Equals dense attention over the
    flattened pixels with those averaged keys. Returns ``(B, H, height, width, D_v)``.
    """
    B, H, height, width, D = _check_same_layout(q, k, v, 5, "B, H, height, width, D")
    ratio = check_int(ratio, "ratio", min=1)
    scale = resolve_scale(scale, D)
    D_v = v.shape[-1]
    if height == 0 or width == 0:
        return q.new_zeros(B, H, height, width, D_v)
    dtype = compute_dtype(q)
    keys = spatial_reduction(k.to(dtype), ratio).flatten(2, 3)
    values = spatial_reduction(v.to(dtype), ratio).flatten(2, 3)
    out = attention(q.to(dtype).flatten(2, 3), keys, values, scale=scale)
    return out.view(B, H, height, width, D_v).to(q.dtype)


class SpatialReductionAttention(nn.Module):
    """PVT / Segformer attention layer: ``(B, height * width, dim) -> (B, height * width, dim)``.

    Queries from every token; keys and values from the feature map reduced by a learned
    ``ratio x ratio`` convolution of stride ``ratio`` and a LayerNorm (``ratio=1``: no
    reduction, plain attention). A map whose sides are not multiples of ``ratio`` is padded
    with zeros at the bottom and right before the convolution.
    """

    def __init__(self, dim: int, num_heads: int, ratio: int) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        check_divisible(dim, "dim", num_heads, "num_heads")
        self.ratio = check_int(ratio, "ratio", min=1)
        self.head_dim = dim // num_heads
        self.W_q = nn.Linear(dim, dim)
        self.W_kv = nn.Linear(dim, 2 * dim)
        self.W_o = nn.Linear(dim, dim)
        if ratio > 1:
            self.reduce = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio)
            self.norm = nn.LayerNorm(dim)

    def reduced_tokens(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, height * width, dim)`` -> ``(B, ceil(height / R) * ceil(width / R), dim)``."""
        if self.ratio == 1:
            return x
        B, _, C = x.shape
        image = x.transpose(1, 2).reshape(B, C, height, width)
        R = self.ratio
        image = F.pad(image, (0, -width % R, 0, -height % R))
        return self.norm(self.reduce(image).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        height = check_int(height, "height", min=1)
        width = check_int(width, "width", min=1)
        check_shape(x, "x", (None, height * width, self.dim), names="B, height * width, dim")
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.W_q(x).view(B, N, H, D).transpose(1, 2)
        reduced = self.reduced_tokens(x, height, width)
        k, v = self.W_kv(reduced).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.W_o(out.transpose(1, 2).reshape(B, N, H * D))


# --- divided space-time attention (TimeSformer) --------------------------------------------------


def time_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Each patch attends to the same patch in every frame (``F`` keys).

    q, k ``(B, H, F, N, D)``, v ``(B, H, F, N, D_v)``; ``causal``: only to earlier frames and its
    own (video generation). Returns ``(B, H, F, N, D_v)``.
    """
    B, H, frames, N, D = _check_same_layout(q, k, v, 5, "B, H, F, N, D")
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    D_v = v.shape[-1]
    if frames == 0 or N == 0:
        return q.new_zeros(B, H, frames, N, D_v)

    def by_patch(x: torch.Tensor) -> torch.Tensor:  # (B, H, F, N, d) -> (B, H * N, F, d)
        return x.transpose(2, 3).reshape(B, H * N, frames, x.shape[-1])

    out = attention(by_patch(q), by_patch(k), by_patch(v), causal=causal, scale=scale)
    return out.view(B, H, N, frames, D_v).transpose(2, 3)


def space_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Each patch attends to every patch of its own frame (``N`` keys).

    q, k ``(B, H, F, N, D)``, v ``(B, H, F, N, D_v)``. Returns ``(B, H, F, N, D_v)``.
    """
    B, H, frames, N, D = _check_same_layout(q, k, v, 5, "B, H, F, N, D")
    scale = resolve_scale(scale, D)
    D_v = v.shape[-1]
    if frames == 0 or N == 0:
        return q.new_zeros(B, H, frames, N, D_v)
    out = attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), scale=scale)
    return out.view(B, H, frames, N, D_v)


class DividedSpaceTimeAttention(nn.Module):
    """TimeSformer's divided attention: ``(B, F, N, dim) -> (B, F, N, dim)``.

    ``y = time(x)`` (its own projections), then ``z = space(LayerNorm(x + y))`` (its own
    projections); returns the update ``y + z``, so a block's residual ``x + update`` is
    TimeSformer's ``x + y + z`` with the residual between the two halves. ``causal_time``: each
    frame sees only earlier frames in the time half.
    """

    def __init__(self, dim: int, num_heads: int, *, causal_time: bool = False) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        check_divisible(dim, "dim", num_heads, "num_heads")
        self.causal_time = check_bool(causal_time, "causal_time")
        self.head_dim = dim // num_heads
        self.time_qkv, self.time_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.space_qkv, self.space_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.space_norm = nn.LayerNorm(dim)

    def _heads(self, qkv: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, frames, N, _ = x.shape
        # (B, F, N, 3, H, D) -> three of (B, H, F, N, D)
        return qkv(x).view(B, frames, N, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        B, H, frames, N, D = out.shape
        return out.permute(0, 2, 3, 1, 4).reshape(B, frames, N, H * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4, floating=True)
        check_shape(x, "x", (None, None, None, self.dim), names="B, F, N, dim")
        y = self.time_out(
            self._merge(time_attention(*self._heads(self.time_qkv, x), causal=self.causal_time))
        )
        z = self.space_out(self._merge(space_attention(*self._heads(self.space_qkv, self.space_norm(x + y)))))
        return y + z


# --- what each costs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionAttentionCost:
    """Per layer, all heads: ``keys_per_query``, ``score_entries`` (the score matrix a dense
    implementation stores, ``H * tokens * keys``) and ``flops`` (``Q K^T`` and ``P V``, plus the
    reduction's convolution for spatial reduction; a multiply-add counts 2)."""

    name: str
    keys_per_query: int
    score_entries: int
    flops: int


def vision_attention_cost(
    height: int,
    width: int,
    frames: int = 1,
    *,
    num_heads: int = 1,
    head_dim: int = 64,
    ratio: int = 8,
    kernel_size: int = 7,
) -> list[VisionAttentionCost]:
    """Full attention over ``frames * height * width`` tokens against the three cheaper patterns.

    Spatial reduction keeps every frame's reduced tokens as keys (``F * ceil(h/R) * ceil(w/R)``);
    neighbourhood attention a ``kernel_size^2`` square in the query's frame; divided space-time
    ``F`` keys in the time half plus ``h * w`` in the space half.
    """
    height = check_int(height, "height", min=1)
    width = check_int(width, "width", min=1)
    frames = check_int(frames, "frames", min=1)
    H = check_int(num_heads, "num_heads", min=1)
    D = check_int(head_dim, "head_dim", min=1)
    ratio = check_int(ratio, "ratio", min=1)
    kernel_size = check_int(kernel_size, "kernel_size", min=1, max=min(height, width))
    pixels = height * width
    tokens = frames * pixels
    reduced = frames * -(-height // ratio) * -(-width // ratio)
    width_model = H * D
    conv_flops = 0 if ratio == 1 else 2 * reduced * (ratio * ratio * width_model) * width_model
    rows = [
        ("full", tokens, 0),
        ("spatial reduction", reduced, conv_flops),
        ("neighborhood", kernel_size * kernel_size, 0),
        ("divided space-time", frames + pixels, 0),
    ]
    return [
        VisionAttentionCost(name, keys, H * tokens * keys, 2 * 2 * H * tokens * keys * D + extra)
        for name, keys, extra in rows
    ]
