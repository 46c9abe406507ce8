"""One causal attention layer for the softmax family: full, grouped-query, windowed or linear.

Every token mixer of the course maps ``x (B, T, d_model)`` to ``(B, T, d_model)`` causally. The
recurrent mechanisms have their layers in :mod:`course_lib.recurrent.layers`; this module holds
the one layer that the attention-like mechanisms share, because they differ only in the core
that turns ``q, k, v`` into the output:

- ``core="softmax"``: exact causal softmax attention (MHA with ``num_kv_heads = num_heads``,
  GQA with fewer key/value heads, MQA with one);
- ``core="window"``: sliding-window attention over the last ``window`` tokens;
- ``core="linear"``: causal linear attention (elu + 1 features, chunk form);
- ``core="hybrid"``: half the heads sliding-window attention, half linear attention, in one layer
  (the recipe of Based: exact recall of recent tokens, a fixed-size state for the rest).

Around the core: q, k, v projections (``num_kv_heads`` heads for k and v), an optional short
causal convolution over q, k and v (``conv_size``, as Zoology's recall models use), optional
rotary positions (``rope``) and an output projection. With a :class:`~course_lib.kv_cache.KVCache`
the layer decodes: new keys and values are appended and the queries attend to everything cached
(softmax and window cores).

**Cross-layer KV sharing** (cross-layer attention, Brandon et al., 2024): a layer built with
``owns_kv=False`` has no key/value projections; it attends with its own queries over the keys and
values of an earlier layer, passed in as ``shared_kv`` (see ``ModelConfig(kv_share=...)`` in
:mod:`course_lib.models`, which wires the layers). Only the owning layers write to the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checks import check_bool, check_choice, check_int, check_tensor
from .kv_cache import GroupedQueryAttention, KVCache, repeat_kv
from .linear import linear_attention
from .recurrent.layers import ShortConvolution
from .sparse import sliding_window_attention
from .standard import apply_rope, causal_mask

__all__ = ["CORES", "AttentionMixer", "causal_softmax"]

CORES = ("softmax", "window", "linear", "hybrid")


def causal_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with the diagonal aligned to the end, GQA-aware, fused.

    q (B, H, T, D); k, v (B, H_kv, S, D) with S >= T. PyTorch's fused kernel computes the same
    numbers as :func:`course_lib.standard.attention` (tested in chapter 01) with a fused backward,
    which keeps training the tiny models affordable on a CPU. Its ``is_causal`` aligns the
    diagonal to the start, so a query block shorter than the keys gets an explicit mask.
    """
    T, S = q.shape[2], k.shape[2]
    group = q.shape[1] != k.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group)
    mask = causal_mask(T, S, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group)


class AttentionMixer(GroupedQueryAttention):
    """A causal attention layer: ``x (B, T, d_model) -> (B, T, d_model)``, see the module docstring.

    Chapter 04's :class:`~course_lib.kv_cache.GroupedQueryAttention` (same projections, same
    parameter names) plus what a model needs: the core, the short convolution, RoPE and a cache
    factory.

    Args:
        d_model, num_heads: width and query heads (``head_dim = d_model / num_heads`` by default).
        num_kv_heads: key/value heads, dividing ``num_heads`` (default ``num_heads``: MHA).
        core: one of :data:`CORES`.
        window: tokens a query sees with ``core="window"`` (itself included).
        conv_size: width of the short causal convolution over q, k, v (0: none).
        rope: rotate queries and keys by their positions.
        chunk_size: chunk length of the linear core.
        owns_kv: False for a layer that reads another layer's keys and values (cross-layer KV
            sharing): it keeps no ``k_proj`` / ``v_proj`` (they are None) and no short convolution.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        core: str = "softmax",
        window: int = 16,
        conv_size: int = 0,
        rope: bool = False,
        chunk_size: int = 64,
        owns_kv: bool = True,
    ) -> None:
        num_heads = check_int(num_heads, "num_heads", min=1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        super().__init__(d_model, num_heads, num_kv_heads, head_dim=head_dim)
        self.core = check_choice(core, "core", CORES)
        self.window = check_int(window, "window", min=1)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        self.rope = check_bool(rope, "rope")
        self.chunk_size = check_int(chunk_size, "chunk_size", min=1)
        self.owns_kv = check_bool(owns_kv, "owns_kv")
        if not owns_kv:
            if conv_size:
                raise ValueError(
                    f"conv_size={conv_size}: a layer that reads another layer's keys and values "
                    "(owns_kv=False) has no short convolution"
                )
            # The keys and values come from the owning layer: no projections of its own.
            self.k_proj = self.v_proj = None
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.conv = ShortConvolution(q_width + 2 * kv_width, conv_size) if conv_size > 0 else None

    def kv_numbers_per_token(self) -> int:
        """Numbers this layer adds to the cache per token: ``2 * num_kv_heads * head_dim``, 0 when shared."""
        return super().kv_numbers_per_token() if self.owns_kv else 0

    # Set only by course_lib.models.forward_with_attention: replaces the core by attend(q, k, v).
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def make_cache(self, num_layers, batch_size, max_len, *, dtype=torch.float32, device=None) -> KVCache:
        """A KV cache for ``num_layers`` layers like this one (the model shares one across blocks).

        ``num_layers`` counts the layers that own keys and values (with cross-layer sharing, fewer
        than the model's blocks).
        """
        if self.core in ("linear", "hybrid") or self.conv is not None:
            raise ValueError(
                f"core={self.core!r}, conv_size={self.conv_size}: only softmax and window cores without a "
                "short convolution decode from a KV cache"
            )
        return KVCache(
            num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim, dtype=dtype, device=device
        )

    def queries_keys_values(
        self, x: torch.Tensor, *, start: int = 0, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Project ``x (B, T, d_model)`` to ``q (B, H, T, D)`` and ``k, v (B, H_kv, T, D)``.

        With RoPE, queries and keys are rotated at positions ``start .. start + T - 1`` (``start``
        is the number of tokens already cached), or at ``positions`` (``(T,)`` integers) when given:
        a serving engine packs tokens of many requests into one row, each at its own position.
        A layer that shares another layer's keys and values (``owns_kv=False``) returns
        ``(q, None, None)``.
        """
        check_tensor(x, "x", ndim=3, floating=True)
        B, T, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        else:
            check_tensor(positions, "positions", ndim=1)
            if positions.shape[0] != T:
                raise ValueError(f"positions must have length T={T}, got {positions.shape[0]}")
        q = self.q_proj(x)
        if not self.owns_kv:
            q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            return (apply_rope(q, positions) if self.rope else q), None, None
        k, v = self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(torch.cat([q, k, v], dim=-1)).split(
                [q.shape[-1], k.shape[-1], v.shape[-1]], -1
            )
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head output ``(B, H, T, D)`` -> the layer output ``(B, T, d_model)``, through ``out_proj``."""
        B, H, T, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * D))

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        cache=None,
        layer_index: int = 0,
        shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ):
        """``x (B, T, d_model) -> (B, T, d_model)``; with ``return_kv``, also the ``(k, v)`` attended to.

        An owning layer computes its keys and values (appended to layer ``layer_index`` of ``cache``
        when one is given: then ``k, v`` are everything cached). A sharing layer (``owns_kv=False``)
        takes ``shared_kv = (k, v)``, ``(B, H_kv, S, D)`` with ``S >= T``, from its owner: its
        ``T`` queries are the last ``T`` positions of those ``S``; it writes nothing to the cache.
        """
        if cache is not None and (self.core in ("linear", "hybrid") or self.conv is not None):
            raise ValueError("cache: this layer has no KV cache (linear core or short convolution)")
        check_bool(return_kv, "return_kv")
        if self.owns_kv:
            if shared_kv is not None:
                raise ValueError("shared_kv must be None for a layer that computes its own keys and values")
            start = 0 if cache is None else cache.length(layer_index)
            q, k, v = self.queries_keys_values(x, start=start)
            if cache is not None:
                k, v = cache.append(layer_index, k, v)
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = self._check_shared(x, shared_kv)
            q, _, _ = self.queries_keys_values(x, start=k.shape[2] - x.shape[1])
        out = self.merge_heads(self.attend(q, k, v) if self.attend is not None else self._core(q, k, v))
        return (out, (k, v)) if return_kv else out

    def _check_shared(self, x: torch.Tensor, shared_kv) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner's ``(k, v)`` for a sharing layer, checked against ``x (B, T, d_model)``."""
        if not isinstance(shared_kv, tuple) or len(shared_kv) != 2:
            raise ValueError(
                "shared_kv must be the (k, v) pair of the layer whose keys and values this one reads "
                f"(owns_kv=False), got {type(shared_kv).__name__}"
            )
        check_tensor(x, "x", ndim=3, floating=True)
        k, v = shared_kv
        check_tensor(k, "shared_kv", ndim=4, floating=True)
        check_tensor(v, "shared_kv", ndim=4, floating=True)
        B, T = x.shape[:2]
        expected = (B, self.num_kv_heads, k.shape[2], self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected or k.shape[2] < T:
            raise ValueError(
                f"shared_kv must hold k and v of shape (B={B}, H_kv={self.num_kv_heads}, S >= T={T}, "
                f"D={self.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        return k, v

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.core == "softmax":
            return causal_softmax(q, k, v)
        group = self.num_heads // self.num_kv_heads
        k, v = (repeat_kv(t, group) for t in (k, v)) if group > 1 else (k, v)
        if self.core == "window":
            return sliding_window_attention(q, k, v, self.window, causal=True)
        if self.core == "linear":
            return linear_attention(q, k, v, causal=True, form="chunk", chunk_size=self.chunk_size)
        local = self.num_heads // 2  # hybrid: the first half of the heads local, the rest linear
        return torch.cat(
            [
                sliding_window_attention(q[:, :local], k[:, :local], v[:, :local], self.window, causal=True),
                linear_attention(
                    q[:, local:],
                    k[:, local:],
                    v[:, local:],
                    causal=True,
                    form="chunk",
                    chunk_size=self.chunk_size,
                ),
            ],
            dim=1,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"core={self.core!r}, conv_size={self.conv_size}, rope={self.rope}"
            + ("" if self.owns_kv else ", owns_kv=False")
        )
