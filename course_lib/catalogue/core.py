"""What a catalogue entry holds, and the one registry of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..checks import check_choice, check_int

__all__ = ["FAMILIES", "PHASES", "Geometry", "Gates", "Mechanism", "register", "get", "names", "mechanisms"]

# The four classes of efficient attention of the sources, the exact baseline and the specialised
# variants of chapter 08.
FAMILIES = ("exact", "hardware-efficient", "compact", "sparse", "linear", "specialised")
# The phases of chapter 08's comparison: forward + backward, one causal forward, one decoding step.
PHASES = ("train", "prefill", "decode")
# What ``mechanisms(has=...)`` can ask for.
CAPABILITIES = ("run", "mixer", "decode", "recurrent", "cost", "state", "gates")


@dataclass(frozen=True)
class Geometry:
    """The shape of one benchmark point: ``batch`` sequences, ``heads`` heads of ``head_dim``.

    ``value_dim`` defaults to ``head_dim``. ``kv_heads`` is the number of key/value heads of the
    compact mechanisms (MQA uses 1, GQA ``kv_heads``). ``state_size`` is N of the state-space
    models (the key dimension of their state).
    """

    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    value_dim: int | None = None
    kv_heads: int = 2
    state_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim", "kv_heads"):
            check_int(getattr(self, name), name, min=1)
        for name in ("value_dim", "state_size"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, min=1)

    @property
    def dv(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim

    @property
    def n(self) -> int:
        return self.head_dim if self.state_size is None else self.state_size


@dataclass(frozen=True)
class Gates:
    """How a recurrent mechanism forgets and writes, for chapter 07's taxonomy and gate explorer.

    ``forget``: "none" (never forgets), "fixed" (a constant per head), "scalar" (data dependent,
    one number per head and token), "vector" (one per key dimension and token).
    ``select``: the name of the data-dependent write strength (e.g. "beta", "dt"), or None.
    ``write``: "add" (``k v^T`` added) or "delta" (the error of the current read-out is written).
    """

    forget: str = "none"
    select: str | None = None
    write: str = "add"

    def __post_init__(self) -> None:
        check_choice(self.forget, "forget", ("none", "fixed", "scalar", "vector"))
        check_choice(self.write, "write", ("add", "delta"))


def _no_inputs(T: int, geometry: Geometry, generator: torch.Generator) -> dict[str, torch.Tensor]:
    raise NotImplementedError


@dataclass(frozen=True)
class Mechanism:
    """One mechanism of the course. See the package docstring for how the course uses it.

    Attributes:
        name: the one name used everywhere (code, notebooks, benchmarks, stored results, figures).
        title: how tables and plots print it.
        family: one of :data:`FAMILIES`.
        chapter: the chapter that teaches it.
        summary: one line: what it changes.
        reference: the paper (title, authors, year).
        function: the library function (or layer class) that computes it.
        inputs: ``inputs(T, geometry, generator) -> dict`` of float64 CPU tensors: one seeded
            input of length T (None when the mechanism has no functional form to compare).
        call: ``call(inputs, **options) -> output`` (or ``(output, state)``): the library
            function applied to those inputs; causal wherever the mechanism can be.
        options: default keyword options of ``call`` (chunk size, window, block sizes).
        forms: the values of ``form=`` its function accepts.
        causal: whether ``call`` is causal (a token mixer for decoders); the non-causal ones
            (efficient attention, Linformer) take part only in the non-causal comparisons.
        trainable: the inputs that the train phase differentiates.
        static_inputs: inputs without a time axis (per-head parameters); the others have time on dim 2.
        query_inputs: the per-token inputs that belong to the queries; when decoding from a cache
            only their last token is fed, while the other per-token inputs are the cache.
        decode: how it decodes one token: "cache" (attend to the cached keys and values), "state"
            (one recurrent step from a fixed-size state) or None (no decoding phase).
        decoder: ``decoder(inputs, T, **options) -> step``: a decoding step of the entry's own, for
            a mechanism whose cache is not a slice of its inputs (MLA's latent cache, a layer's
            KV cache); it prepares the cache of the first T - 1 tokens and returns the
            zero-argument ``step() -> (output (B, H, 1, D_v), state)`` that decodes token T, where
            ``state`` holds the tensors the cache keeps after it. None: the generic step of
            ``decode`` (see :func:`course_lib.studies.phases.decode_step`).
        cache_window: for "cache": at most this many cached tokens are read (sliding window).
        state_numbers: ``state_numbers(T, geometry, **options) -> int``: numbers one sequence keeps
            per layer for decoding after T tokens (KV cache or recurrent state); ``options`` are
            ``call``'s (e.g. the window).
        cost: ``cost(phase, T, geometry) -> {"flops", "bytes"}``: a model of one call (float32).
        mixer: ``mixer(d_model, num_heads, **options) -> nn.Module`` mapping (B, T, d_model) to
            (B, T, d_model) causally, or None.
        mixer_geometry: ``mixer_geometry(d_model, num_heads) -> Geometry``: the heads and state
            sizes of the mixer at its default options (default: ``num_heads`` heads of
            ``d_model / num_heads``), so the state of a model's layer can be read off the catalogue.
        config_fields: fields of ``models.ModelConfig`` passed to ``mixer`` as options.
        gates: :class:`Gates` of a recurrent mechanism, or None.
        layer: whether ``call`` runs a whole layer (its projections, routers and experts
            included) on the layer's input tokens ``x`` and its weights
            (:mod:`course_lib.catalogue.layers`), rather than the mechanism on q, k, v.
        not_run: for an entry without a functional form: why the comparison does not run it.
    """

    name: str
    title: str
    family: str
    chapter: int
    summary: str
    reference: str
    function: Callable[..., Any]
    inputs: Callable[[int, Geometry, torch.Generator], dict[str, torch.Tensor]] | None = None
    call: Callable[..., Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    forms: tuple[str, ...] = ()
    causal: bool = True
    trainable: tuple[str, ...] = ("q", "k", "v")
    static_inputs: tuple[str, ...] = ()
    query_inputs: tuple[str, ...] = ("q",)
    decode: str | None = None
    decoder: Callable[..., Callable[[], tuple[torch.Tensor, Any]]] | None = None
    cache_window: int | None = None
    state_numbers: Callable[..., int] | None = None
    cost: Callable[[str, int, Geometry], dict[str, float]] | None = None
    mixer: Callable[..., nn.Module] | None = None
    mixer_geometry: Callable[[int, int], Geometry] | None = None
    config_fields: tuple[str, ...] = ()
    gates: Gates | None = None
    layer: bool = False
    not_run: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.family, "family", FAMILIES)
        check_int(self.chapter, "chapter", min=0)
        if self.decode is not None:
            check_choice(self.decode, "decode", ("cache", "state"))
        if (self.inputs is None) != (self.call is None):
            raise ValueError(f"{self.name}: inputs and call go together (both or neither)")
        if self.decoder is not None and (self.decode is None or self.call is None):
            raise ValueError(f"{self.name}: a decoder needs a decode kind and a functional form")
        if self.not_run is not None and self.call is not None:
            raise ValueError(f"{self.name}: not_run explains a missing functional form, but call is given")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __repr__(self) -> str:
        return f"Mechanism({self.name!r}, {self.family}, chapter {self.chapter})"

    # --- what the studies call ----------------------------------------------------------------

    def has(self, capability: str) -> bool:
        """Whether this entry supports ``capability`` (one of :data:`CAPABILITIES`)."""
        check_choice(capability, "capability", CAPABILITIES)
        return {
            "run": self.call is not None,
            "mixer": self.mixer is not None,
            "decode": self.decode is not None and self.call is not None,
            "recurrent": "recurrent" in self.forms,
            "cost": self.cost is not None,
            "state": self.state_numbers is not None,
            "gates": self.gates is not None,
        }[capability]

    def make_inputs(
        self,
        T: int,
        geometry: Geometry | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs of length ``T`` (the same seed gives the same numbers on every device)."""
        if self.inputs is None:
            raise ValueError(f"{self.name} has no functional form to feed inputs to")
        T = check_int(T, "T", min=0)
        geometry = Geometry() if geometry is None else geometry
        generator = torch.Generator().manual_seed(check_int(seed, "seed", min=0))
        values = self.inputs(T, geometry, generator)
        return {key: value.to(device=device, dtype=dtype) for key, value in values.items()}

    def run(self, inputs: Mapping[str, torch.Tensor], **options: Any) -> Any:
        """The library function on ``inputs``, with :attr:`options` overridden by ``options``."""
        if self.call is None:
            raise ValueError(f"{self.name} has no functional form to run")
        return self.call(inputs, **{**self.options, **options})

    def tokens(self, inputs: Mapping[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
        """Tokens ``start:end`` of every per-token input (static inputs are kept whole)."""
        return {
            key: value if key in self.static_inputs else value[:, :, start:end]
            for key, value in inputs.items()
        }

    def state_bytes(
        self, T: int, geometry: Geometry | None = None, *, dtype: torch.dtype = torch.float32, **options: Any
    ) -> int:
        """Bytes one sequence keeps per layer for decoding after ``T`` tokens (``options`` as ``run``'s)."""
        if self.state_numbers is None:
            raise ValueError(f"{self.name} declares no decoding state")
        geometry = Geometry() if geometry is None else geometry
        numbers = self.state_numbers(check_int(T, "T", min=0), geometry, **{**self.options, **options})
        return int(numbers) * torch.empty((), dtype=dtype).element_size()

    def layer_geometry(self, d_model: int, num_heads: int) -> Geometry:
        """The geometry of this mechanism's mixer at its default options (see :attr:`mixer_geometry`)."""
        if self.mixer_geometry is not None:
            return self.mixer_geometry(d_model, num_heads)
        return Geometry(heads=num_heads, head_dim=d_model // num_heads, kv_heads=num_heads)

    def build_mixer(self, d_model: int, num_heads: int, **options: Any) -> nn.Module:
        """A fresh token-mixer layer of this mechanism."""
        if self.mixer is None:
            raise ValueError(
                f"{self.name} has no token-mixer layer; ones that do: {', '.join(names(has='mixer'))}"
            )
        return self.mixer(d_model, num_heads, **options)


# --- the registry -----------------------------------------------------------------------------

_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add a declaration (each name once). Returns it, so a module can keep a reference."""
    if not isinstance(mechanism, Mechanism):
        raise TypeError(f"mechanism must be a Mechanism, got {type(mechanism).__name__}")
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is declared twice")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; an unknown name is a ValueError that lists the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"name={name!r} is not a mechanism of the course; known: {', '.join(_REGISTRY)}"
        ) from None


def mechanisms(
    *, family: str | None = None, chapter: int | None = None, has: str | tuple[str, ...] | None = None
) -> tuple[Mechanism, ...]:
    """Every mechanism, in the course's order (by chapter, then as declared), optionally only those
    of one family, one chapter, or with every capability in ``has`` (see :meth:`Mechanism.has`)."""
    if family is not None:
        check_choice(family, "family", FAMILIES)
    wanted = () if has is None else ((has,) if isinstance(has, str) else tuple(has))
    return tuple(
        m
        for m in sorted(_REGISTRY.values(), key=lambda m: m.chapter)
        if (family is None or m.family == family)
        and (chapter is None or m.chapter == chapter)
        and all(m.has(c) for c in wanted)
    )


def names(**filters: Any) -> tuple[str, ...]:
    """The names of :func:`mechanisms` with the same filters."""
    return tuple(m.name for m in mechanisms(**filters))
