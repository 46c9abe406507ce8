"""SwitchHead: mixture-of-experts attention (Csordás, Piękos, Irie, Schmidhuber; NeurIPS 2024).

A standard layer with many heads computes one attention matrix per head. SwitchHead keeps a few
heads (few attention matrices) but gives each head ``E`` experts for its value projection and
``E`` experts for its output projection. Per token, a router picks the ``top_k`` experts of each
kind; only those are computed. Queries and keys stay dense, shared by the experts of a head.

For head ``h``, source token ``j`` and destination token ``i``:

    s_j = sigmoid(x_j W_S^h)    E_j = top_k(s_j)    v_j = sum_{e in E_j} s_j[e] x_j W_V^{h,e}
    d_i = sigmoid(x_i W_D^h)    F_i = top_k(d_i)    y_i += sum_{e in F_i} d_i[e] (A^h v)_i W_O^{h,e}

The gate is a sigmoid, not a softmax: experts do not compete for a fixed budget, which the
paper found trains stably without load-balancing losses. ``gate="softmax"`` is offered to
compare (with one expert it makes every gate exactly 1, i.e. plain multi-head attention).

Decoding: the experts change the compute, not the cache. A token's key and its (expert-mixed)
value are computed once, so the layer keeps an ordinary :class:`~course_lib.kv_cache.KVCache`
of ``H`` heads, ``2 H D`` numbers per token, and a new token only routes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_bool, check_choice, check_int, check_shape, check_tensor
from ..kv_cache import KVCache
from ..standard import attention

__all__ = ["route_top_k", "expert_projection", "SwitchHeadStats", "SwitchHeadAttention"]

GATES = ("sigmoid", "softmax")


def route_top_k(
    logits: torch.Tensor, top_k: int, *, gate: str = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``top_k`` experts per row of ``logits`` ``(..., E)``.

    Returns ``(weights, indices)``, both ``(..., top_k)``: the chosen experts' gate values
    (``sigmoid(logit)``, or the softmax over all ``E`` experts, not renormalised) and their indices.
    """
    check_tensor(logits, "logits", floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dim (..., E), got a scalar")
    top_k = check_int(top_k, "top_k", min=1, max=logits.shape[-1])
    check_choice(gate, "gate", GATES)
    scores = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(scores, top_k, dim=-1)
    return weights, indices


def expert_projection(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """``sum_{chosen e} weight_e * x W[h, e]`` per head, computing only the chosen experts.

    Args:
        x: ``(N, C_in)`` shared by all heads (the value side reads the token) or ``(N, H, C_in)``
            one input per head (the output side reads each head's attention output).
        weights, indices: ``(N, H, k)`` from :func:`route_top_k`.
        experts: ``(H, E, C_in, C_out)`` the expert matrices.

    Returns ``(N, H, C_out)``. Each expert multiplies only the tokens routed to it (a gather,
    a matmul, a scatter-add), so the cost follows ``k``, not ``E``.
    """
    check_tensor(experts, "experts", ndim=4, floating=True)
    H, E, C_in, C_out = experts.shape
    check_tensor(x, "x", ndim=(2, 3), floating=True)
    check_tensor(indices, "indices", ndim=3, dtype=torch.long)
    check_tensor(weights, "weights", ndim=3, floating=True)
    N = x.shape[0]
    check_shape(x, "x", (N, C_in) if x.dim() == 2 else (N, H, C_in), names="N, C_in or N, H, C_in")
    check_shape(indices, "indices", (N, H, None), names="N, H, k")
    check_shape(weights, "weights", tuple(indices.shape), names="N, H, k")
    if indices.numel() and (indices.min() < 0 or indices.max() >= E):
        raise ValueError(
            f"indices must lie in [0, E={E}), got values from {indices.min()} to {indices.max()}"
        )
    head_outputs = []
    for head in range(H):
        head_input = x if x.dim() == 2 else x[:, head]
        out = head_input.new_zeros(N, C_out)
        for expert in range(E):
            token, slot = torch.nonzero(indices[:, head] == expert, as_tuple=True)
            if token.numel() == 0 and N > 0:
                continue  # nobody chose this expert: it costs nothing
            # (With no token at all the empty products still run, so the empty output keeps its
            # graph and a loss over it back-propagates zeros instead of failing.)
            contribution = weights[token, head, slot].unsqueeze(-1) * (
                head_input[token] @ experts[head, expert]
            )
            out = out.index_add(0, token, contribution)
        head_outputs.append(out)
    return torch.stack(head_outputs, dim=1)


@dataclass
class SwitchHeadStats:
    """Expert load of one forward pass.

    ``value_load`` and ``output_load`` are ``(H, E)``: the fraction of tokens that chose each
    expert (each row sums to ``top_k``). ``attention_matrices`` is the number of ``T x S``
    matrices computed (``H``); a dense layer with the same number of value experts would need
    ``H * E``.
    """

    value_load: torch.Tensor
    output_load: torch.Tensor
    attention_matrices: int
    dense_equivalent_matrices: int


def _load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of tokens choosing each expert: ``(N, H, k)`` indices -> ``(H, E)``."""
    N, H, _ = indices.shape
    one_hot = torch.nn.functional.one_hot(indices, num_experts).sum(dim=2)  # (N, H, E)
    return one_hot.sum(dim=0).to(torch.float32) / max(N, 1)


class SwitchHeadAttention(nn.Module):
    """Multi-head attention whose value and output projections are mixtures of experts.

    Args:
        embed_dim: model width ``C``.
        num_heads: heads ``H`` (attention matrices computed).
        num_experts: experts ``E`` per head, for values and for outputs.
        head_dim: ``D`` per head; defaults to ``embed_dim // num_heads``.
        top_k: experts chosen per token, per head, per side.
        gate: ``"sigmoid"`` (the paper) or ``"softmax"``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_experts: int,
        *,
        head_dim: int | None = None,
        top_k: int = 2,
        gate: str = "sigmoid",
    ) -> None:
        super().__init__()
        embed_dim = check_int(embed_dim, "embed_dim", min=1)
        num_heads = check_int(num_heads, "num_heads", min=1)
        num_experts = check_int(num_experts, "num_experts", min=1)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"num_heads={num_heads} must divide embed_dim={embed_dim} (or pass head_dim)"
                )
            head_dim = embed_dim // num_heads
        head_dim = check_int(head_dim, "head_dim", min=1)
        self.top_k = check_int(top_k, "top_k", min=1, max=num_experts)
        self.gate = check_choice(gate, "gate", GATES)
        self.embed_dim, self.num_heads, self.num_experts, self.head_dim = (
            embed_dim,
            num_heads,
            num_experts,
            head_dim,
        )
        H, E, D, C = num_heads, num_experts, head_dim, embed_dim
        self.W_q = nn.Linear(C, H * D, bias=False)
        self.W_k = nn.Linear(C, H * D, bias=False)
        # Routers W_S (source side, values) and W_D (destination side, outputs): one per head.
        self.value_router = nn.Parameter(torch.randn(H, C, E) * C**-0.5)
        self.output_router = nn.Parameter(torch.randn(H, C, E) * C**-0.5)
        self.value_experts = nn.Parameter(torch.randn(H, E, C, D) * C**-0.5)
        self.output_experts = nn.Parameter(torch.randn(H, E, D, C) * (H * D) ** -0.5)

    def make_cache(
        self, num_layers: int, batch_size: int, max_len: int, *, dtype=torch.float32, device=None
    ) -> KVCache:
        """A :class:`~course_lib.kv_cache.KVCache` for layers like this one: H heads of keys and values."""
        return KVCache(
            num_layers, batch_size, self.num_heads, max_len, self.head_dim, dtype=dtype, device=device
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_stats: bool = False,
        cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, SwitchHeadStats]:
        """``x`` ``(B, T, embed_dim)`` -> ``(B, T, embed_dim)`` (and :class:`SwitchHeadStats`).

        With ``cache`` the T tokens follow the cached ones: their keys and values are appended to
        layer ``layer_index`` and the queries attend to everything cached (``causal`` aligned to
        the end; ``mask`` then covers the ``S`` cached keys).
        """
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        check_bool(causal, "causal")
        check_bool(return_stats, "return_stats")
        B, T, C = x.shape
        H, D, E = self.num_heads, self.head_dim, self.num_experts
        q = self.W_q(x).view(B, T, H, D).transpose(1, 2)
        k = self.W_k(x).view(B, T, H, D).transpose(1, 2)
        tokens = x.reshape(B * T, C)
        router_dtype = self.value_router.dtype

        # Source side: each token's value is a gated sum of its chosen value experts.
        value_logits = torch.einsum("nc,hce->nhe", tokens.to(router_dtype), self.value_router)
        value_weights, value_indices = route_top_k(value_logits, self.top_k, gate=self.gate)
        v = expert_projection(
            tokens, value_weights.to(x.dtype), value_indices, self.value_experts.to(x.dtype)
        )
        v = v.view(B, T, H, D).transpose(1, 2)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
            k, v = cache.append(layer_index, k, v)
            k, v = k.to(x.dtype), v.to(x.dtype)

        heads = attention(q, k, v, mask, causal=causal)  # (B, H, T, D): H matrices, not H * E

        # Destination side: each head's output goes through the query token's chosen output experts.
        output_logits = torch.einsum("nc,hce->nhe", tokens.to(router_dtype), self.output_router)
        output_weights, output_indices = route_top_k(output_logits, self.top_k, gate=self.gate)
        per_head = heads.transpose(1, 2).reshape(B * T, H, D)
        y = expert_projection(
            per_head, output_weights.to(x.dtype), output_indices, self.output_experts.to(x.dtype)
        )
        out = y.sum(dim=1).view(B, T, C)
        if not return_stats:
            return out
        stats = SwitchHeadStats(
            value_load=_load(value_indices, E),
            output_load=_load(output_indices, E),
            attention_matrices=H,
            dense_equivalent_matrices=H * E,
        )
        return out, stats
