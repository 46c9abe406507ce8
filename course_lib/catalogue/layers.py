"""Layers as functions of their inputs: how MLA and SwitchHead join the comparison of chapter 08.

Most mechanisms of the catalogue are functions on q, k, v. A few exist only as layers
(``nn.Module``), because what they change lives in the projections: MLA rebuilds keys and values
from a cached latent, SwitchHead routes each token to value and output experts. :class:`LayerForm`
gives such a layer the catalogue's functional form, so the three phases run it like the others:

- ``inputs``: the layer's input tokens ``x`` as ``(B, 1, T, H D)`` (a head axis of one, so that
  time is on dim 2 like every per-token input; the width is that of H heads of D), and every
  weight of the layer under its parameter name. The weights come from the layer's own
  initialisation under a seed drawn from the generator, so they are seeded like every input,
  float64 on the CPU, moved by ``.to(device, dtype)`` with the rest, and the train phase
  differentiates them (they are in ``trainable``) as a training step would.
- ``call``: :func:`torch.func.functional_call` of a weightless copy of the layer (built on the
  meta device, one per shape) with those weights; the output is ``(B, 1, T, H D)``.
- ``decoder``: the layer with those weights, and its own cache (``layer.make_cache``) filled with
  the first T - 1 tokens outside the timed step (in chunks of :data:`PREFILL_CHUNK`, so that a
  context of 16384 tokens never holds its T x T scores at once); the step feeds token T, reads
  the output and the cache, and rolls the cache back to T - 1 tokens, so that it can be timed
  again and again.

Because the projections are part of the layer, these entries are measured as whole layers; the
comparison says so beside its tables (``Mechanism.layer``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import builders
from .core import Geometry

__all__ = ["LayerForm", "PREFILL_CHUNK"]

PREFILL_CHUNK = 512  # tokens per forward call when a decoder fills its cache (bounds the score memory)


class LayerForm:
    """The functional form of a layer ``build(geometry)`` (see the module docstring).

    Args:
        build: ``build(geometry) -> nn.Module`` mapping ``(B, T, H D)`` to ``(B, T, H D)``; the
            same geometry must give the same parameter names and shapes.
        geometry_of: ``geometry_of(weights) -> Geometry``: the heads and head size that built
            these weights (read off their shapes), so that a call finds its layer.
    """

    def __init__(
        self,
        build: Callable[[Geometry], nn.Module],
        geometry_of: Callable[[Mapping[str, torch.Tensor]], Geometry],
    ) -> None:
        self.build = build
        self.geometry_of = geometry_of
        self._skeleton = functools.cache(self._weightless)
        self.weight_names = tuple(name for name, _ in self._skeleton(Geometry()).named_parameters())

    # --- the pieces a declaration takes --------------------------------------------------------

    @property
    def trainable(self) -> tuple[str, ...]:
        """The tokens and every weight: what a training step differentiates."""
        return ("x", *self.weight_names)

    @property
    def static_inputs(self) -> tuple[str, ...]:
        """The weights: inputs without a time axis."""
        return self.weight_names

    def inputs(self, T: int, g: Geometry, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Seeded tokens ``x (B, 1, T, H D)`` and the weights of a layer of geometry ``g`` (float64)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # the layer's own initialisation, seeded
            torch.manual_seed(seed)
            layer = self.build(g)
        weights = {name: p.detach().to(builders.F64) for name, p in layer.named_parameters()}
        return {"x": builders.normal(generator, g.batch, 1, T, g.heads * g.head_dim), **weights}

    def weights(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: inputs[name] for name in self.weight_names}

    def apply(self, inputs: Mapping[str, torch.Tensor], **forward: Any) -> torch.Tensor:
        """The layer's forward pass on ``inputs["x"]`` with ``inputs``' weights: ``(B, 1, T, H D)``."""
        weights = self.weights(inputs)
        layer = self._skeleton(self.geometry_of(weights))
        return functional_call(layer, weights, (inputs["x"][:, 0],), forward).unsqueeze(1)

    def module(self, inputs: Mapping[str, torch.Tensor]) -> nn.Module:
        """A layer for inference that holds ``inputs``' weights (their storage, not copies; no gradients)."""
        weights = self.weights(inputs)
        layer = self.build_on_meta(self.geometry_of(weights))
        layer.load_state_dict(weights, assign=True)
        return layer.requires_grad_(False)

    def decoder(
        self, *, prepare: Callable[[nn.Module], dict[str, Any]] | None = None, **forward: Any
    ) -> Callable[..., Callable[[], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]]:
        """A catalogue ``decoder`` through the layer's own cache (``make_cache``, ``cache=``,
        ``truncate``, ``get``). ``forward``: keyword arguments of every forward call; ``prepare(layer)``:
        more of them, computed once per decoder outside the timed step (MLA's folded weights)."""

        def decoder(inputs: Mapping[str, torch.Tensor], T: int, **_: Any):
            layer = self.module(inputs)
            tokens = inputs["x"][:, 0]
            options = {**forward, **({} if prepare is None else prepare(layer))}
            cache = layer.make_cache(1, tokens.shape[0], T, dtype=tokens.dtype, device=tokens.device)
            with torch.no_grad():  # chunk by chunk: one pass would hold T x T scores per head
                for start in range(0, T - 1, PREFILL_CHUNK):
                    layer(tokens[:, start : min(start + PREFILL_CHUNK, T - 1)], cache=cache, **options)
            last = tokens[:, T - 1 : T]

            def step() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
                out = layer(last, cache=cache, **options)
                state = tuple(cache.get(0))  # what the cache keeps after token T (views)
                cache.truncate(T - 1)  # roll back, so that the next call decodes token T again
                return out.unsqueeze(1), state

            return step

        return decoder

    # --- helpers -------------------------------------------------------------------------------

    def build_on_meta(self, g: Geometry) -> nn.Module:
        """The layer's structure without storage (weights are supplied per call)."""
        with torch.device("meta"):
            return self.build(g)

    def _weightless(self, g: Geometry) -> nn.Module:
        return self.build_on_meta(g)
