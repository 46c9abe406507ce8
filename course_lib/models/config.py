"""The shape of the tiny model, and its token mixer, named by the catalogue of mechanisms.

``ModelConfig(attention=name)`` builds every block's mixer from the catalogue entry ``name``
(:mod:`course_lib.catalogue`): any mechanism with a token-mixer layer — softmax attention and its
compact forms (chapter 04), sliding-window and linear attention, every gated recurrence of chapter
07. The entry says which config fields its layer reads (``num_kv_heads`` for GQA, ``latent_dim``,
``rope_dim`` and ``mla_mode`` for MLA, ``rope`` for the softmax family); ``mixer_options`` passes
anything else (a short convolution, a window, a chunk size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .. import catalogue
from ..checks import check_choice, check_int

__all__ = ["ModelConfig", "ALIASES", "POSITIONS", "mixer_names", "build_mixer", "ATTENTION_LAYERS"]

# Chapter 04 calls standard softmax attention "MHA"; the catalogue's name for it is "attention".
ALIASES = {"mha": "attention"}
# "learned": an embedding added to the tokens; "rope": queries and keys rotated inside attention;
# "none": no positions at all (order comes from the causal mask, the recurrence or a convolution).
POSITIONS = ("learned", "rope", "none")


def mixer_names() -> tuple[str, ...]:
    """The catalogue names a model can be built with (the mechanisms that have a mixer layer)."""
    return catalogue.names(has="mixer")


@dataclass
class ModelConfig:
    """Shape of a :class:`TinyTransformer`.

    ``attention`` names a catalogue mechanism with a mixer (:func:`mixer_names`; "mha" is accepted
    for "attention"). ``num_kv_heads`` is used by "gqa" (default ``num_heads // 2``), ``latent_dim``,
    ``rope_dim`` and ``mla_mode`` by "mla". ``positions`` is one of :data:`POSITIONS` (MLA always
    rotates its own decoupled RoPE key). ``mixer_options`` are passed to the mixer as keywords.
    """

    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    attention: str = "attention"
    num_kv_heads: int | None = None
    latent_dim: int = 16
    rope_dim: int = 8
    mla_mode: str = "absorbed"
    positions: str = "learned"
    max_len: int = 256
    mlp_ratio: int = 4
    mixer_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", min=1)
        check_int(self.d_model, "d_model", min=1)
        check_int(self.num_layers, "num_layers", min=1)
        check_int(self.num_heads, "num_heads", min=1)
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        if not isinstance(self.attention, str):
            raise TypeError(f"attention must be a str, got {type(self.attention).__name__}")
        self.attention = ALIASES.get(self.attention, self.attention)
        check_choice(self.attention, "attention", mixer_names())
        check_choice(self.positions, "positions", POSITIONS)
        check_choice(self.mla_mode, "mla_mode", ("naive", "absorbed"))
        check_int(self.max_len, "max_len", min=1)
        check_int(self.mlp_ratio, "mlp_ratio", min=1)
        if self.num_kv_heads is not None:
            check_int(self.num_kv_heads, "num_kv_heads", min=1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.mixer_options is not None and not isinstance(self.mixer_options, dict):
            raise TypeError(f"mixer_options must be a dict or None, got {type(self.mixer_options).__name__}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rope(self) -> bool:
        """Whether the softmax-family mixers rotate queries and keys."""
        return self.positions == "rope"


def build_mixer(config: ModelConfig) -> nn.Module:
    """One block's token mixer: the catalogue entry ``config.attention`` with the options it reads."""
    mechanism = catalogue.get(config.attention)
    options = {field: getattr(config, field) for field in mechanism.config_fields}
    options.update(config.mixer_options or {})
    return mechanism.build_mixer(config.d_model, config.num_heads, **options)


class _AttentionLayers(Mapping):
    """Deprecated (one release): ``ATTENTION_LAYERS[name](config)``, read from the catalogue."""

    def __getitem__(self, name: str) -> Callable[[ModelConfig], nn.Module]:
        name = ALIASES.get(name, name)
        if name not in mixer_names():
            raise KeyError(name)
        return lambda config: build_mixer(replace(config, attention=name))

    def __iter__(self) -> Iterator[str]:
        return iter(mixer_names())

    def __len__(self) -> int:
        return len(mixer_names())


ATTENTION_LAYERS: Mapping[str, Callable[[ModelConfig], nn.Module]] = _AttentionLayers()
