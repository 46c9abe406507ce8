"""Multi-head latent attention (MLA), as in DeepSeek-V2 (DeepSeek-AI, 2024).

GQA shrinks the cache by sharing heads; MLA shrinks it by caching a low-rank latent instead of
keys and values. Per token ``h_t``:

    c_t      = W_DKV h_t                      latent, d_c numbers (cached)
    k^C_t,i  = W_UK,i c_t,  v_t,i = W_UV,i c_t   per-head keys and values rebuilt from the latent
    k^R_t    = RoPE(W_KR h_t)                  one rope key of d_R numbers shared by all heads (cached)
    q_t,i    = [W_UQ,i c^Q_t ; RoPE(W_QR,i c^Q_t)]   with c^Q_t = W_DQ h_t (optional query compression)
    k_t,i    = [k^C_t,i ; k^R_t]
    o_t      = W_O [softmax(q_t,i . k_j,i / sqrt(d_h + d_R)) v_j,i]_i

so the cache holds ``d_c + d_R`` numbers per token and layer, whatever the head count.

Why the decoupled rope key: RoPE sits between W_UK and the query, so a rotated key could not be
folded into the query side. Keeping position in a separate small key leaves the content part
rotation-free, which allows the *absorption* trick:

    q^C_i . (W_UK,i c_j) = (W_UK,i^T q^C_i) . c_j      fold W_UK into the query side
    W_O,i (sum_j p_j W_UV,i c_j) = (W_O,i W_UV,i) (sum_j p_j c_j)   fold W_UV into W_O

With both folds the heads attend directly over the cached latents, like MQA with a single
``(d_c + d_R)``-wide key head and a ``d_c``-wide value head: keys and values are never rebuilt.
``mode="naive"`` rebuilds them; ``mode="absorbed"`` does not; both give the same output.
DeepSeek-V2 also normalises the latents (RMSNorm); that is omitted here as it does not change
the cache or the algebra.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice, check_float, check_int, check_shape, check_tensor
from ..standard import apply_rope
from .cache import track_append, truncate_tracked
from .gqa import gqa_attention

__all__ = ["LatentKVCache", "MultiHeadLatentAttention"]


class LatentKVCache:
    """MLA's cache: ``latent (num_layers, B, max_len, d_c)`` and ``rope_keys (num_layers, B, max_len, d_R)``.

    Per token and layer it holds ``d_c + d_R`` numbers.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        latent_dim: int,
        rope_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", min=1)
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.max_len = check_int(max_len, "max_len", min=1)
        self.latent_dim = check_int(latent_dim, "latent_dim", min=1)
        self.rope_dim = check_int(rope_dim, "rope_dim", min=2)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.latent = torch.zeros(num_layers, batch_size, max_len, latent_dim, dtype=dtype, device=device)
        self.rope_keys = torch.zeros(num_layers, batch_size, max_len, rope_dim, dtype=dtype, device=device)
        self._lengths = [0] * num_layers
        self._tracked: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def length(self, layer_index: int = 0) -> int:
        return self._lengths[check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)]

    def append(
        self, layer_index: int, latent: torch.Tensor, rope_key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``latent (B, T, d_c)`` and ``rope_key (B, T, d_R)``; return all stored tokens.

        Views of the storage in inference; differentiable in grad mode, as :class:`KVCache`.
        """
        layer_index = check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)
        check_tensor(latent, "latent", ndim=3, floating=True)
        check_tensor(rope_key, "rope_key", ndim=3, floating=True)
        check_shape(latent, "latent", (self.batch_size, None, self.latent_dim), names="B, T, d_c")
        T = latent.shape[1]
        check_shape(rope_key, "rope_key", (self.batch_size, T, self.rope_dim), names="B, T, d_R")
        start = self._lengths[layer_index]
        if start + T > self.max_len:
            raise ValueError(
                f"latent adds {T} tokens to {start} cached ones, more than max_len={self.max_len}"
            )
        with torch.no_grad():  # numbers only; the autograd copy is kept apart (see KVCache)
            self.latent[layer_index, :, start : start + T] = latent
            self.rope_keys[layer_index, :, start : start + T] = rope_key
        self._lengths[layer_index] = start + T
        tracked = track_append(
            self._tracked[layer_index],
            (latent, rope_key),
            (self.latent[layer_index], self.rope_keys[layer_index]),
            start,
            dim=1,
        )
        self._tracked[layer_index] = tracked
        return self.get(layer_index)

    def get(self, layer_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything stored in one layer: ``latent (B, length, d_c)`` and ``rope_keys (B, length, d_R)``.

        Views of the storage, or the autograd copy while one is kept (see :meth:`append`).
        """
        layer_index = check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)
        if self._tracked[layer_index] is not None:
            return self._tracked[layer_index]
        length = self._lengths[layer_index]
        return self.latent[layer_index, :, :length], self.rope_keys[layer_index, :, :length]

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens of every layer (at most what any layer holds)."""
        length = check_int(length, "length", min=0, max=min(self._lengths))
        self._lengths = [length] * self.num_layers
        self._tracked = truncate_tracked(self._tracked, length, dim=1)

    def reset(self) -> None:
        self._lengths = [0] * self.num_layers
        self._tracked = [None] * self.num_layers

    @property
    def numbers_per_token(self) -> int:
        """Numbers cached per token and layer: ``d_c + d_R``."""
        return self.latent_dim + self.rope_dim


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA layer: ``x (B, T, d_model)`` -> ``(B, T, d_model)``, with an optional ``LatentKVCache``.

    Args:
        d_model: model width.
        num_heads: query heads H.
        head_dim: d_h, the content (non-rope) part of each query/key head.
        latent_dim: d_c, the cached KV latent.
        rope_dim: d_R, the decoupled rope part of queries and of the shared rope key (even).
        query_latent_dim: d_c', the query latent; None = no query compression.
        value_dim: per-head value width; defaults to ``head_dim``.
        rope_base: RoPE base frequency.
        mode: the inference path ``forward`` takes unless told otherwise, "naive" (rebuild K and V
            from the latent) or "absorbed" (fold W_UK and W_UV into the query and output sides).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        head_dim: int,
        latent_dim: int,
        rope_dim: int,
        query_latent_dim: int | None = None,
        value_dim: int | None = None,
        rope_base: float = 10000.0,
        mode: str = "naive",
    ) -> None:
        super().__init__()
        self.mode = check_choice(mode, "mode", ("naive", "absorbed"))
        self.d_model = check_int(d_model, "d_model", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.latent_dim = check_int(latent_dim, "latent_dim", min=1)
        self.rope_dim = check_int(rope_dim, "rope_dim", min=2)
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim={rope_dim} must be even (RoPE rotates pairs)")
        self.value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
        self.query_latent_dim = (
            None if query_latent_dim is None else check_int(query_latent_dim, "query_latent_dim", min=1)
        )
        self.rope_base = check_float(rope_base, "rope_base", min=1.0, min_open=True)
        H = self.num_heads
        query_input = d_model if self.query_latent_dim is None else self.query_latent_dim
        if self.query_latent_dim is not None:
            self.query_down = nn.Linear(d_model, self.query_latent_dim, bias=False)  # W_DQ
        self.query_up = nn.Linear(query_input, H * head_dim, bias=False)  # W_UQ (or W_Q)
        self.query_rope = nn.Linear(query_input, H * rope_dim, bias=False)  # W_QR
        self.kv_down = nn.Linear(d_model, latent_dim, bias=False)  # W_DKV
        self.key_up = nn.Linear(latent_dim, H * head_dim, bias=False)  # W_UK
        self.value_up = nn.Linear(latent_dim, H * self.value_dim, bias=False)  # W_UV
        self.key_rope = nn.Linear(d_model, rope_dim, bias=False)  # W_KR
        self.out_proj = nn.Linear(H * self.value_dim, d_model, bias=False)  # W_O

    def kv_numbers_per_token(self) -> int:
        """Numbers cached per token: ``d_c + d_R`` (MHA of the same heads would cache ``2 * H * d_h``)."""
        return self.latent_dim + self.rope_dim

    def make_cache(
        self, num_layers: int, batch_size: int, max_len: int, *, dtype=torch.float32, device=None
    ) -> LatentKVCache:
        """A ``LatentKVCache`` sized for this layer."""
        return LatentKVCache(
            num_layers, batch_size, max_len, self.latent_dim, self.rope_dim, dtype=dtype, device=device
        )

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded matrices of the absorbed path.

        Returns ``query (H, d_c, d_in)`` = ``W_UK,i^T W_UQ,i`` (maps the query input straight to a
        query in latent space; ``d_in`` is d_c' or d_model) and ``output (d_model, H, d_c)`` =
        ``W_O,i W_UV,i`` (maps a head's attended latent straight to the output). A deployment
        computes them once; here they are recomputed per call to stay in sync with training.
        """
        H, d_h, d_c = self.num_heads, self.head_dim, self.latent_dim
        key_up = self.key_up.weight.view(H, d_h, d_c)
        query_up = self.query_up.weight.view(H, d_h, -1)
        value_up = self.value_up.weight.view(H, self.value_dim, d_c)
        out = self.out_proj.weight.view(self.d_model, H, self.value_dim)
        return torch.einsum("hdc,hdi->hci", key_up, query_up), torch.einsum("mhv,hvc->mhc", out, value_up)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: LatentKVCache | None = None,
        layer_index: int = 0,
        mode: str | None = None,
        folded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x (B, T, d_model)`` -> ``(B, T, d_model)``; with ``cache``, the T tokens follow the cached ones.

        ``folded``: the matrices of :meth:`absorbed_weights` (``mode="absorbed"`` only), computed
        once by the caller as a deployment does; None recomputes them in every call, which in a
        one-token decoding step costs more than the attention itself at short contexts.
        """
        check_tensor(x, "x", ndim=3, floating=True)
        mode = self.mode if mode is None else mode
        B, T, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        check_choice(mode, "mode", ("naive", "absorbed"))
        if folded is not None:
            if mode != "absorbed":
                raise ValueError(f"folded: the folded weights belong to mode='absorbed', not mode={mode!r}")
            if not isinstance(folded, tuple) or len(folded) != 2:
                raise TypeError(f"folded must be the pair of absorbed_weights(), got {type(folded).__name__}")
            query_input_dim = self.d_model if self.query_latent_dim is None else self.query_latent_dim
            for part, shape in zip(
                folded,
                (
                    (self.num_heads, self.latent_dim, query_input_dim),
                    (width, self.num_heads, self.latent_dim),
                ),
            ):
                check_tensor(part, "folded", ndim=3, floating=True)
                check_shape(part, "folded", shape)
        H, d_R = self.num_heads, self.rope_dim
        start = 0 if cache is None else cache.length(layer_index)
        positions = torch.arange(start, start + T, device=x.device)

        query_input = x if self.query_latent_dim is None else self.query_down(x)
        query_rope = self.query_rope(query_input).view(B, T, H, d_R).transpose(1, 2)
        query_rope = apply_rope(query_rope, positions, self.rope_base)  # (B, H, T, d_R)
        latent = self.kv_down(x)  # (B, T, d_c)
        rope_key = apply_rope(self.key_rope(x), positions, self.rope_base)  # (B, T, d_R)
        if cache is not None:
            latent, rope_key = cache.append(layer_index, latent, rope_key)
            latent, rope_key = latent.to(x.dtype), rope_key.to(x.dtype)
        S = latent.shape[1]
        scale = (self.head_dim + d_R) ** -0.5  # the query/key width of the naive form

        if mode == "naive":
            # Rebuild per-head keys and values from the cached latent: H*(d_h + d_v) numbers per token.
            query = self.query_up(query_input).view(B, T, H, self.head_dim).transpose(1, 2)
            keys = self.key_up(latent).view(B, S, H, self.head_dim).transpose(1, 2)
            values = self.value_up(latent).view(B, S, H, self.value_dim).transpose(1, 2)
            keys = torch.cat([keys, rope_key.unsqueeze(1).expand(B, H, S, d_R)], dim=-1)
            query = torch.cat([query, query_rope], dim=-1)
            out = gqa_attention(query, keys, values, causal=True, scale=scale)  # (B, H, T, d_v)
            return self.out_proj(out.transpose(1, 2).reshape(B, T, H * self.value_dim))

        # Absorbed: queries move into latent space; one shared key head [c; k^R], value head c.
        query_weight, output_weight = self.absorbed_weights() if folded is None else folded
        query_latent = torch.einsum("bti,hci->bhtc", query_input, query_weight)  # (B, H, T, d_c)
        query = torch.cat([query_latent, query_rope], dim=-1)
        keys = torch.cat([latent, rope_key], dim=-1).unsqueeze(1)  # (B, 1, S, d_c + d_R)
        out_latent = gqa_attention(query, keys, latent.unsqueeze(1), causal=True, scale=scale)
        return torch.einsum("bhtc,mhc->btm", out_latent, output_weight)
