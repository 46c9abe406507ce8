"""Low-precision attention, simulated: SageAttention's INT8 Q K^T and FlashAttention-3's rotation.

Both make ``Q K^T`` cheaper by quantising Q and K to 8 bits, one scale per block of rows, and
both fight the same enemy: a few channels much larger than the rest, which set a block's scale
and leave every other value only a few quantisation levels.

- SageAttention (Zhang et al., 2024) subtracts K's mean over tokens, channel by channel. Each
  score of query i then drops by the same ``q_i . mean(k)``, which softmax ignores, yet the
  values left to quantise are small. ``P V`` stays in higher precision.
- FlashAttention-3 (Shah et al., 2024) multiplies Q and K by the same random orthogonal matrix
  (a Hadamard matrix with random signs) before quantising to FP8 ("incoherent processing").
  ``(Q M)(K M)^T = Q K^T``, and the rotation spreads an outlier channel over all channels.

The arithmetic is simulated in float32: integer codes times scales, the way the kernel would
dequantise the INT32 accumulator.
"""

from __future__ import annotations

import torch

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_int,
    check_like,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .online_softmax import _finite_or_zero

__all__ = ["quantize_blocks", "random_hadamard", "random_orthogonal", "quantized_attention"]

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_blocks(
    x: torch.Tensor, *, bits: int = 8, block_size: int = 64, number_format: str = "int"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``(B, H, N, D)`` with one scale per block of ``block_size`` rows (all D channels).

    ``number_format="int"``: symmetric integers in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``.
    ``number_format="fp8"``: values scaled to the FP8 e4m3 range and rounded to e4m3 (bits=8).

    Returns ``(codes, scales)``: codes ``(B, H, N, D)`` (integers or e4m3 values, stored in
    float32) and per-row scales ``(B, H, N)``; ``codes * scales[..., None]`` approximates x.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    bits = check_int(bits, "bits", min=2, max=8)
    block_size = check_int(block_size, "block_size", min=1)
    check_choice(number_format, "number_format", ("int", "fp8"))
    if number_format == "fp8" and bits != 8:
        raise ValueError(f"bits={bits} must be 8 with number_format='fp8'")
    B, H, N, D = x.shape
    values = x.to(compute_dtype(x))
    block_count = -(-N // block_size)
    padded = torch.nn.functional.pad(values, (0, 0, 0, block_count * block_size - N))
    block_max = padded.view(B, H, block_count, block_size * D).abs().amax(dim=-1)
    largest_code = FP8_E4M3_MAX if number_format == "fp8" else float(2 ** (bits - 1) - 1)
    # An all-zero block keeps scale 1 so it quantises to zeros instead of dividing by zero.
    block_scale = torch.where(block_max > 0, block_max / largest_code, torch.ones_like(block_max))
    scales = block_scale.repeat_interleave(block_size, dim=-1)[..., :N]
    scaled = values / scales.unsqueeze(-1)
    if number_format == "fp8":
        codes = scaled.to(torch.float8_e4m3fn).to(values.dtype)
    else:
        codes = torch.round(scaled).clamp(-largest_code, largest_code)
    return codes, scales


def _sylvester_hadamard(D: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < D:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def random_hadamard(D: int, *, seed: int = 0) -> torch.Tensor:
    """Random orthogonal ``(D, D)`` float64 matrix ``diag(signs) H / sqrt(D)``, H a Hadamard matrix.

    ``D`` must be a power of two. A kernel applies it in O(D log D) with the fast Hadamard
    transform; here it is a plain matrix. The random signs come from ``seed``.
    """
    D = check_int(D, "D", min=1)
    if D & (D - 1):
        raise ValueError(f"D={D} must be a power of two for a Hadamard matrix")
    seed = check_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (D,), generator=generator).to(torch.float64) * 2 - 1
    return signs.unsqueeze(1) * _sylvester_hadamard(D) / D**0.5


def random_orthogonal(D: int, *, seed: int = 0) -> torch.Tensor:
    """Random orthogonal ``(D, D)`` float64 matrix (Haar-distributed), from the QR of a Gaussian."""
    D = check_int(D, "D", min=1)
    seed = check_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(D, D, generator=generator, dtype=torch.float64)
    orthogonal, upper = torch.linalg.qr(gaussian)
    # Fixing the signs of R's diagonal makes the distribution uniform over rotations.
    return orthogonal * torch.sign(torch.diagonal(upper)).unsqueeze(0)


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bits: int = 8,
    smooth_k: bool = True,
    rotation: torch.Tensor | None = None,
    number_format: str = "int",
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with Q and K quantised per block for ``Q K^T``; ``P V`` in float32.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, D_v)`` values (not quantised).
        bits: integer bits of the Q and K codes (2 to 8).
        smooth_k: subtract K's per-channel mean over the S tokens first (SageAttention).
        rotation: an orthogonal ``(D, D)`` matrix (e.g. :func:`random_hadamard`) applied to Q and
            K before quantising (FlashAttention-3's incoherent processing); None for none.
        number_format: ``"int"`` (SageAttention's INT8) or ``"fp8"`` (e4m3, as FlashAttention-3).
        block_q, block_k: rows of q and of k that share one quantisation scale.
        causal: query ``i`` sees keys ``0 .. S - T + i``.
        scale: multiplies the scores; defaults to ``D ** -0.5``.

    Returns:
        ``(B, H, T, D_v)`` in the input dtype; zeros for a query with no key.
    """
    B, H, T, S, D, Dv = check_attention_inputs(q, k, v)
    check_bool(smooth_k, "smooth_k")
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    bits = check_int(bits, "bits", min=2, max=8)
    check_choice(number_format, "number_format", ("int", "fp8"))
    if number_format == "fp8" and bits != 8:
        raise ValueError(f"bits={bits} must be 8 with number_format='fp8'")
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    dtype = compute_dtype(q)
    queries, keys = q.to(dtype), k.to(dtype)
    if rotation is not None:
        check_tensor(rotation, "rotation", ndim=2, floating=True)
        check_like(rotation, "rotation", q, dtype=False)
        if rotation.shape != (D, D):
            raise ValueError(f"rotation must have shape ({D}, {D}) = (D, D), got {tuple(rotation.shape)}")
        rotation = rotation.to(dtype)
        identity = torch.eye(D, dtype=dtype, device=q.device)
        if not torch.allclose(rotation @ rotation.T, identity, atol=1e-4):
            raise ValueError("rotation must be orthogonal (rotation @ rotation.T == I)")

    if T == 0 or S == 0:  # no query, or no key: nothing to quantise (and a mean over 0 keys is NaN)
        return q.new_zeros(B, H, T, Dv)
    if smooth_k:
        keys = keys - keys.mean(dim=-2, keepdim=True)
    if rotation is not None:
        queries, keys = queries @ rotation, keys @ rotation
    q_codes, q_scales = quantize_blocks(queries, bits=bits, block_size=block_q, number_format=number_format)
    k_codes, k_scales = quantize_blocks(keys, bits=bits, block_size=block_k, number_format=number_format)

    # Integer (or FP8) products accumulate exactly in float32 here; dequantise with both scales.
    scores = (q_codes @ k_codes.transpose(-2, -1)) * (q_scales.unsqueeze(-1) * k_scales.unsqueeze(-2)) * scale
    if causal:
        rows = torch.arange(T, device=q.device).unsqueeze(1)
        cols = torch.arange(S, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows + (S - T), float("-inf"))
    probabilities = torch.exp(scores - _finite_or_zero(scores.amax(dim=-1, keepdim=True)))
    row_sum = probabilities.sum(dim=-1, keepdim=True)
    probabilities = probabilities / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return (probabilities @ v.to(dtype)).to(q.dtype)
