"""Chapter 01: standard (softmax) attention, its masks, multi-head attention and positions.

The module follows the notebook: the attention function, the masks it takes, the multi-head
layer built on it, then three ways to tell the model where a token is (sinusoidal, RoPE, ALiBi).
Tensors are ``(B, H, T, D)`` for queries and ``(B, H, S, D)`` for keys and values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import (
    check_attention_inputs,
    check_bool,
    check_broadcast,
    check_float,
    check_int,
    check_like,
    check_mask,
    check_tensor,
    compute_dtype,
    resolve_scale,
)

__all__ = [
    "attention",
    "masked_softmax",
    "causal_mask",
    "padding_mask",
    "MultiHeadAttention",
    "sinusoidal_positions",
    "apply_rope",
    "alibi_bias",
]


# --- masks --------------------------------------------------------------------------------


def causal_mask(T: int, S: int | None = None, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(T, S)`` mask, True where query ``i`` may see key ``j``: ``j <= S - T + i``.

    With ``S > T`` the diagonal is aligned to the end, as in decoding: the last query sees all
    keys. With ``S < T`` the first ``T - S`` queries see nothing. ``T = 0`` or ``S = 0`` gives an
    empty mask, as every kernel accepts empty sequences.
    """
    T = check_int(T, "T", min=0)
    S = T if S is None else check_int(S, "S", min=0)
    rows = torch.arange(T, device=device).unsqueeze(1)
    cols = torch.arange(S, device=device).unsqueeze(0)
    return cols <= rows + (S - T)


def padding_mask(lengths: torch.Tensor | list[int], S: int) -> torch.Tensor:
    """Key-padding mask of shape ``(B, 1, 1, S)``: True for the first ``lengths[b]`` keys.

    It broadcasts over heads and queries, ready to pass to :func:`attention`.
    """
    S = check_int(S, "S", min=0)
    if isinstance(lengths, (list, tuple)):
        for n in lengths:
            check_int(n, "lengths", min=0)
        lengths = torch.tensor(lengths, dtype=torch.long)
    check_tensor(lengths, "lengths", ndim=1)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > S):
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths.tolist()}")
    keys = torch.arange(S, device=lengths.device)
    return (keys.unsqueeze(0) < lengths.unsqueeze(1))[:, None, None, :]


# --- the attention function -----------------------------------------------------------------


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim where ``allowed``; a row with nothing allowed gets zeros, not NaN.

    A row with no key at all (last dim 0) is such a row too: the result is empty.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if scores.shape[-1] == 0:
        return torch.zeros_like(scores)
    row_max = scores.amax(dim=-1, keepdim=True)
    # An all -inf row has max -inf; subtracting a finite 0 there keeps exp() at 0 instead of NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(scores - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    return unnormalised / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias, masked) v, the reference every later chapter is checked against.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, D_v)`` values.
        mask: bool, broadcastable to ``(B, H, T, S)``; True means "may attend".
        causal: also apply :func:`causal_mask` (aligned to the end when ``T != S``).
        scale: multiplies the scores; defaults to ``D ** -0.5``; any finite number (0 gives
            uniform weights over the visible keys).
        bias: float, broadcastable to ``(B, H, T, S)``, added to the scores (e.g. ALiBi); cast to
            the compute dtype.

    ``mask`` and ``bias`` must be on q's device, and may not have dims beyond ``(B, H, T, S)``.
        return_weights: also return the ``(B, H, T, S)`` attention weights.

    Returns:
        ``(B, H, T, D_v)`` in the input dtype (and the weights). A query with no key to attend
        to gets zeros and zero weights, never NaN. Half-precision inputs are computed in float32.
    """
    B, H, T, S, D, _ = check_attention_inputs(q, k, v)
    check_bool(causal, "causal")
    check_bool(return_weights, "return_weights")
    scale = resolve_scale(scale, D)
    allowed = None
    if mask is not None:
        allowed = check_mask(mask, "mask", (B, H, T, S), device=q.device)
    if bias is not None:
        check_tensor(bias, "bias", floating=True)
        check_like(bias, "bias", q, dtype=False)
        # A bias with extra leading dims would broadcast the output to a new shape: refuse it.
        bias = check_broadcast(bias, "bias", (B, H, T, S))
    if causal:
        square = causal_mask(T, S, device=q.device)
        allowed = square if allowed is None else allowed & square

    # Accumulate in float32 (or float64) so fp16/bf16 inputs do not overflow in the softmax.
    dtype = compute_dtype(q)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    weights = masked_softmax(scores, allowed)

    out = (weights @ v.to(dtype)).to(q.dtype)
    if return_weights:
        return out, weights.to(q.dtype)
    return out


# --- multi-head attention -------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend per head, concatenate, project.

    Self-attention passes one sequence; cross-attention passes ``context`` for the keys and,
    when the values come from another tensor (as in ``nn.MultiheadAttention(query, key, value)``),
    ``value`` for the values.

    Args:
        embed_dim: model width ``d_model``; must be a multiple of ``num_heads``.
        num_heads: number of heads ``H``; each has ``D = embed_dim // num_heads``.
        bias: whether the four projections have biases.
        kdim, vdim: widths of the key input ``context`` and of the value input ``value``
            (default ``embed_dim``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
    ) -> None:
        super().__init__()
        embed_dim = check_int(embed_dim, "embed_dim", min=1)
        num_heads = check_int(num_heads, "num_heads", min=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        kdim = embed_dim if kdim is None else check_int(kdim, "kdim", min=1)
        vdim = embed_dim if vdim is None else check_int(vdim, "vdim", min=1)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.W_q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.W_k = nn.Linear(kdim, embed_dim, bias=bias)
        self.W_v = nn.Linear(vdim, embed_dim, bias=bias)
        self.W_o = nn.Linear(embed_dim, embed_dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, H * D)`` -> ``(B, H, T, D)``."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D)`` -> ``(B, T, H * D)``."""
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)

    def _check_source(self, source: object, name: str, width: int, width_name: str, x: torch.Tensor) -> None:
        check_tensor(source, name, ndim=3, floating=True)
        assert isinstance(source, torch.Tensor)
        check_like(source, name, x, "x")
        if source.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must have batch size {x.shape[0]}, got shape {tuple(source.shape)}")
        if source.shape[-1] != width:
            raise ValueError(
                f"{name} must have last dim {width_name}={width}, got shape {tuple(source.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` ``(B, T, embed_dim)`` to ``context`` ``(B, S, kdim)`` (default ``x``).

        The values come from ``value`` ``(B, S, vdim)``, by default ``context`` itself (which then
        needs ``vdim == kdim``). ``mask`` is bool, broadcastable to ``(B, H, T, S)`` (see
        :func:`padding_mask`). Returns ``(B, T, embed_dim)`` and, with ``return_weights``, the
        ``(B, H, T, S)`` weights.
        """
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        if context is None:
            if self.kdim != self.embed_dim:
                raise ValueError(
                    f"context must be given: keys come from a (B, S, kdim={self.kdim}) input, "
                    f"not from x (embed_dim={self.embed_dim})"
                )
            if value is not None:
                raise ValueError("value needs a context: pass context (keys) and value together")
            context = x
        else:
            self._check_source(context, "context", self.kdim, "kdim", x)
        if value is None:
            if self.vdim != self.kdim:
                raise ValueError(
                    f"value must be given: values come from a (B, S, vdim={self.vdim}) input, "
                    f"not from the keys' context (kdim={self.kdim})"
                )
            value = context
        else:
            self._check_source(value, "value", self.vdim, "vdim", x)
            if value.shape[1] != context.shape[1]:
                raise ValueError(
                    f"value must have the length S={context.shape[1]} of context, "
                    f"got shape {tuple(value.shape)}"
                )
        q = self.split_heads(self.W_q(x))
        k = self.split_heads(self.W_k(context))
        v = self.split_heads(self.W_v(value))
        result = attention(q, k, v, mask, causal=causal, return_weights=return_weights)
        if return_weights:
            out, weights = result
            return self.W_o(self.merge_heads(out)), weights
        return self.W_o(self.merge_heads(result))


# --- positions ------------------------------------------------------------------------------


def sinusoidal_positions(T: int, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """The ``(T, dim)`` sinusoidal table of "Attention Is All You Need".

    Column ``2i`` holds ``sin(t / base^(2i/dim))`` and column ``2i+1`` the cosine.
    """
    T = check_int(T, "T", min=0)
    dim = check_int(dim, "dim", min=2)
    if dim % 2:
        raise ValueError(f"dim={dim} must be even")
    base = check_float(base, "base", min=1.0, min_open=True)
    positions = torch.arange(T, dtype=torch.float64).unsqueeze(1)
    frequencies = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.empty(T, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies)
    return table.to(torch.get_default_dtype())


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding: rotate each pair ``(x[2i], x[2i+1])`` by ``t * base^(-2i/D)``.

    Args:
        x: ``(..., T, D)`` queries or keys, ``D`` even.
        positions: ``(T,)`` integer or float positions; defaults to ``0 .. T-1``.

    Returns the rotated tensor, same shape and dtype. Because both q and k are rotated, their dot
    product depends only on the difference of their positions.
    """
    check_tensor(x, "x", floating=True)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., T, D), got shape {tuple(x.shape)}")
    T, D = x.shape[-2], x.shape[-1]
    if D % 2:
        raise ValueError(f"x must have an even last dim D, got D={D}")
    base = check_float(base, "base", min=1.0, min_open=True)
    if positions is None:
        positions = torch.arange(T, device=x.device)
    else:
        check_tensor(positions, "positions", ndim=1)
        check_like(positions, "positions", x, "x", dtype=False)
        if positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"positions must hold integer or real positions, got dtype {positions.dtype}")
        if positions.shape[0] != T:
            raise ValueError(f"positions must have length T={T}, got {positions.shape[0]}")
    dtype = compute_dtype(x)
    inverse_frequencies = base ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)
    angles = positions.to(dtype).unsqueeze(-1) * inverse_frequencies
    cos, sin = torch.cos(angles), torch.sin(angles)
    even, odd = x[..., 0::2].to(dtype), x[..., 1::2].to(dtype)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes: the geometric sequence ``2^(-8/n), 2^(-16/n), ...``.

    For a head count that is not a power of two, the paper takes the slopes of the closest
    smaller power of two and fills up with every other slope of the next one.
    """
    num_heads = check_int(num_heads, "num_heads", min=1)

    def power_of_two_slopes(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes)


def alibi_bias(num_heads: int, T: int, S: int | None = None) -> torch.Tensor:
    """ALiBi's ``(H, T, S)`` score bias: ``-slope_h * distance`` between query and key.

    Positions are aligned to the end like :func:`causal_mask`: query ``i`` sits at position
    ``S - T + i``. Keys after the query get a bias too (``-slope * |distance|``), so the same
    table serves bidirectional models; a causal model masks them anyway.
    """
    T = check_int(T, "T", min=0)
    S = T if S is None else check_int(S, "S", min=0)
    slopes = alibi_slopes(num_heads)
    query_positions = torch.arange(T).unsqueeze(1) + (S - T)
    key_positions = torch.arange(S).unsqueeze(0)
    distance = (query_positions - key_positions).abs()
    return -slopes[:, None, None] * distance
