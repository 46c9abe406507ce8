"""Quantised KV cache in the style of KIVI (Liu et al., 2024).

Storing the cache in 8 or 4 bits instead of 16 halves or quarters the bytes each decoded token
must read. Asymmetric min-max quantisation maps a group of numbers to integers ``0 .. 2^b - 1``:

    scale = (max - min) / (2^b - 1),  q = round((x - min) / scale),  x_hat = q * scale + min

so every number is off by at most ``scale / 2``. *Which* numbers share a (scale, min) matters.
KIVI observed that keys have a few outlier channels (large in every token) while values have no
channel structure, so it quantises:
- keys per channel: a group is one channel over ``group_size`` consecutive tokens;
- values per token: a group is ``group_size`` consecutive channels of one token.
(KIVI also keeps the most recent tokens in full precision until a group fills; omitted here.)
4-bit codes are packed two per byte, so ``nbytes`` is the real storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_choice, check_int, check_tensor
from .gqa import gqa_attention

__all__ = ["QuantizedTensor", "quantize", "quantize_kv", "quantized_attention_error"]


@dataclass
class QuantizedTensor:
    """Integer codes with one (scale, minimum) per group; ``dequantize()`` restores the tensor."""

    codes: torch.Tensor  # uint8, 4-bit codes packed in pairs along the last dim
    scale: torch.Tensor  # per group, float32
    minimum: torch.Tensor  # per group, float32
    bits: int
    dim: int  # the dimension the groups run along (-2 tokens: per channel; -1 channels: per token)
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus the float16 scale and minimum a real kernel would store."""
        return self.codes.numel() * self.codes.element_size() + 2 * 2 * self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        codes = self.codes
        if self.bits == 4:
            # Unpack pairs; an odd group was padded with one code, dropped here.
            codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[..., : self.group_size]
        values = codes.to(torch.float32) * self.scale + self.minimum  # (..., groups, group_size)
        values = values.flatten(-2)[..., : self.shape[self.dim]]
        return values.movedim(-1, self.dim).to(self.dtype)


def quantize(
    x: torch.Tensor, *, bits: int = 8, dim: int = -1, group_size: int | None = None
) -> QuantizedTensor:
    """Asymmetric min-max quantisation of ``x`` in groups of ``group_size`` along ``dim``.

    ``dim=-2`` on a ``(B, H, S, D)`` key tensor groups tokens: per-channel quantisation.
    ``dim=-1`` groups channels: per-token quantisation. ``group_size=None`` = the whole dim.
    A length not divisible by ``group_size`` is padded by repeating the last entry (which does
    not change any group's min or max).
    """
    check_tensor(x, "x", floating=True)
    bits = check_choice(bits, "bits", (4, 8))
    dim = check_choice(dim, "dim", (-1, -2))
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims, got shape {tuple(x.shape)}")
    length = x.shape[dim]
    # One group over the whole dim by default (at least one slot, so an empty dim quantises too).
    group_size = max(length, 1) if group_size is None else check_int(group_size, "group_size", min=1)
    moved = x.to(torch.float32).movedim(dim, -1)  # groups now run along the last dim
    padding = (-length) % group_size
    if padding:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], padding)], dim=-1)
    groups = moved.unflatten(-1, (-1, group_size))  # (..., num_groups, group_size)
    minimum = groups.amin(dim=-1, keepdim=True)
    maximum = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((maximum - minimum) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - minimum) / scale).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        if group_size % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], dim=-1)
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedTensor(codes, scale, minimum, bits, dim, group_size, tuple(x.shape), x.dtype)


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, *, bits: int = 8, group_size: int | None = None
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """KIVI's scheme for ``(B, H, S, D)`` tensors.

    Keys are quantised per channel (groups of tokens), values per token (groups of channels).
    """
    check_tensor(k, "k", ndim=4, floating=True)
    check_tensor(v, "v", ndim=4, floating=True)
    return quantize(k, bits=bits, dim=-2, group_size=group_size), quantize(
        v, bits=bits, dim=-1, group_size=group_size
    )


def quantized_attention_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bits: int = 8,
    group_size: int | None = None,
    causal: bool = False,
) -> dict:
    """Bytes and attention error of a quantised cache against float16 storage.

    Returns ``bytes_fp16``, ``bytes_quantized``, ``compression`` (fp16 / quantized),
    ``max_abs_error`` and ``relative_error`` (Frobenius) of ``gqa_attention`` over the
    dequantised cache versus the original one.
    """
    quantized_k, quantized_v = quantize_kv(k, v, bits=bits, group_size=group_size)
    reference = gqa_attention(q, k, v, causal=causal).to(torch.float32)
    approximate = gqa_attention(
        q, quantized_k.dequantize().to(q.dtype), quantized_v.dequantize().to(q.dtype), causal=causal
    ).to(torch.float32)
    bytes_fp16 = 2 * (k.numel() + v.numel())
    bytes_quantized = quantized_k.nbytes + quantized_v.nbytes
    difference = approximate - reference
    return {
        "bits": bits,
        "bytes_fp16": bytes_fp16,
        "bytes_quantized": bytes_quantized,
        "compression": bytes_fp16 / bytes_quantized if bytes_quantized else 1.0,  # empty: nothing saved
        "max_abs_error": difference.abs().max().item() if difference.numel() else 0.0,
        "relative_error": (difference.norm() / reference.norm().clamp_min(1e-30)).item(),
    }
