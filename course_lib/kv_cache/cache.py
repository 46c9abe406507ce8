"""The KV cache: why decoding one token does not recompute the whole prompt.

A decoder attends causally, so the keys and values of past tokens never change once computed.
Generation therefore splits into two phases:
- prefill: the whole prompt goes through the model at once (matrix-matrix work, compute-bound)
  and every layer stores its keys and values;
- decode: each new token computes only its own q, k, v, appends k and v to the cache, and
  attends over everything cached (matrix-vector work that must read the whole cache from
  memory for every token: memory-bound).

``KVCache`` preallocates ``(num_layers, B, H_kv, max_len, D)`` once and fills it in place, so the
decode loop never reallocates. ``chunked_prefill`` runs a long prompt through a layer in chunks
against the growing cache, which bounds the score matrix of one step to ``chunk_size x S``.

Gradients: writing in place into storage that an earlier step's attention has read would break
autograd ("modified by an inplace operation") the moment a second chunk arrives. So when keys or
values that require grad are appended in grad mode, the cache also keeps the layer's contents as
an ordinary autograd tensor (the concatenation of everything appended) and returns that; the
storage still receives the numbers. Chunked prefill is then differentiable and its gradients are
those of one-shot attention, at the price of a copy of the layer's cache per append while
training. Under ``torch.no_grad()`` (inference) nothing changes: views of the storage, no copy.
"""

from __future__ import annotations

import torch

from ..checks import check_int, check_shape, check_tensor

__all__ = ["KVCache", "chunked_prefill"]


class KVCache:
    """A preallocated per-layer key/value cache.

    Storage: ``keys (num_layers, B, H_kv, max_len, D)`` and ``values (num_layers, B, H_kv, max_len, D_v)``.
    Each layer fills its own slot with ``append``; ``length(layer_index)`` tokens are valid.
    All sequences of the batch share one length (padding-free batched decoding; the paged cache
    handles sequences of different lengths).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", min=1)
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1)
        self.max_len = check_int(max_len, "max_len", min=1)
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.value_dim = self.head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (num_layers, batch_size, num_kv_heads, max_len)
        self.keys = torch.zeros(*shape, self.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, self.value_dim, dtype=dtype, device=device)
        self._lengths = [0] * num_layers
        self._tracked: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def _check_layer(self, layer_index: int) -> int:
        return check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)

    def length(self, layer_index: int = 0) -> int:
        """Number of tokens stored in layer ``layer_index``."""
        return self._lengths[self._check_layer(layer_index)]

    def append(self, layer_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k (B, H_kv, T, D)`` and ``v (B, H_kv, T, D_v)`` after the stored tokens.

        Returns ``(B, H_kv, length, D)`` and ``(B, H_kv, length, D_v)``: everything stored so far
        in that layer, in the cache's dtype. Views of the storage (no copy) in inference; a
        differentiable concatenation when ``k`` or ``v`` requires grad (see the module docstring).
        """
        layer_index = self._check_layer(layer_index)
        check_tensor(k, "k", ndim=4, floating=True)
        check_tensor(v, "v", ndim=4, floating=True)
        B, H = self.batch_size, self.num_kv_heads
        check_shape(k, "k", (B, H, None, self.head_dim), names="B, H_kv, T, D")
        T = k.shape[2]
        check_shape(v, "v", (B, H, T, self.value_dim), names="B, H_kv, T, D_v")
        start = self._lengths[layer_index]
        if start + T > self.max_len:
            raise ValueError(f"k adds {T} tokens to {start} cached ones, more than max_len={self.max_len}")
        with torch.no_grad():  # the storage holds numbers only; autograd history is kept apart
            self.keys[layer_index, :, :, start : start + T] = k
            self.values[layer_index, :, :, start : start + T] = v
        self._lengths[layer_index] = start + T
        self._tracked[layer_index] = track_append(
            self._tracked[layer_index],
            (k, v),
            (self.keys[layer_index], self.values[layer_index]),
            start,
            dim=2,
        )
        return self.get(layer_index)

    def get(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything stored in one layer: ``(B, H_kv, length, D)`` and ``(B, H_kv, length, D_v)``."""
        layer_index = self._check_layer(layer_index)
        if self._tracked[layer_index] is not None:
            return self._tracked[layer_index]
        length = self._lengths[layer_index]
        return self.keys[layer_index, :, :, :length], self.values[layer_index, :, :, :length]

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens of every layer (roll back, e.g. rejected draft tokens).

        The storage is kept; the next ``append`` overwrites what was cut. ``length`` may not exceed
        what any layer holds.
        """
        length = check_int(length, "length", min=0, max=min(self._lengths))
        self._lengths = [length] * self.num_layers
        self._tracked = truncate_tracked(self._tracked, length, dim=2)

    def reset(self) -> None:
        """Forget every stored token (the storage is kept for the next request)."""
        self._lengths = [0] * self.num_layers
        self._tracked = [None] * self.num_layers

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the preallocated storage (whether filled or not)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def truncate_tracked(
    tracked: list[tuple[torch.Tensor, ...] | None], length: int, *, dim: int
) -> list[tuple[torch.Tensor, ...] | None]:
    """The autograd copies of a cache's layers cut to their first ``length`` tokens (:func:`track_append`)."""
    return [None if layer is None else tuple(t.narrow(dim, 0, length) for t in layer) for layer in tracked]


def track_append(
    tracked: tuple[torch.Tensor, ...] | None,
    new: tuple[torch.Tensor, ...],
    storage: tuple[torch.Tensor, ...],
    start: int,
    *,
    dim: int,
) -> tuple[torch.Tensor, ...] | None:
    """The differentiable contents of one cache layer after appending ``new`` at ``start``.

    ``tracked`` is the layer's autograd copy so far (None: none kept). Once a tensor that requires
    grad arrives in grad mode, the copy starts from the stored tokens before it and grows by
    concatenation, so every returned tensor is an ordinary function of the appended ones and no
    in-place write ever touches a tensor autograd saved. An append in inference (nothing requires
    grad, or no-grad mode) drops the copy: the caller returns views of the storage again.
    """
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in new)
    if not recording:
        return None  # inference: views of the storage (an earlier autograd copy is dropped)
    if tracked is None:
        tracked = tuple(s.narrow(dim, 0, start).clone() for s in storage)
    return tuple(torch.cat([t, x.to(t.dtype)], dim=dim) for t, x in zip(tracked, new, strict=True))


def chunked_prefill(
    layer: torch.nn.Module, x: torch.Tensor, cache, *, chunk_size: int, layer_index: int = 0
) -> torch.Tensor:
    """Run a prompt ``x (B, T, d_model)`` through ``layer`` in chunks of ``chunk_size`` tokens.

    Each chunk appends its keys and values to ``cache`` and attends (causally, aligned to the end)
    over everything cached so far, so the result equals one-shot prefill while the score matrix
    of one step is ``chunk_size x S`` instead of ``T x T``. ``layer`` is any layer of this package
    taking ``forward(x, cache=..., layer_index=...)`` (GQA, MQA, MLA). Returns ``(B, T, d_model)``.
    In grad mode it is differentiable, with the gradients of one-shot prefill (module docstring).
    """
    check_tensor(x, "x", ndim=3, floating=True)
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    if cache is None:
        raise ValueError("cache must be a cache object, got None")
    outputs = [layer(chunk, cache=cache, layer_index=layer_index) for chunk in x.split(chunk_size, dim=1)]
    return torch.cat(outputs, dim=1)
