"""The shape of the tiny model, and its token mixer, named by the catalogue of mechanisms.

``ModelConfig(attention=name)`` builds every block's mixer from the catalogue entry ``name``
(:mod:`course_lib.catalogue`): any mechanism with a token-mixer layer — softmax attention and its
compact forms (chapter 04), sliding-window and linear attention, every gated recurrence of chapter
07. The entry says which config fields its layer reads (``num_kv_heads`` for GQA, ``latent_dim``,
``rope_dim`` and ``mla_mode`` for MLA, ``rope`` for the softmax family); ``mixer_options`` passes
anything else (a short convolution, a window, a chunk size).

``kv_share`` turns on **cross-layer KV sharing** (cross-layer attention, CLA; Brandon et al., 2024)
for the softmax family: layers come in groups of ``kv_share``; the first layer of a group computes
keys and values, and the others attend over them with their own queries. Layer ``i`` reads the keys
and values of layer ``i - i % kv_share``; only those layers have key/value projections, and the KV
cache holds ``ceil(num_layers / kv_share)`` layers. (YOCO, Sun et al., 2024, goes further: one
global cache made by the middle of the network serves every layer of the upper half, while the
lower half uses a constant-size cache of its own.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .. import catalogue
from ..checks import check_choice, check_int
from ..mixers import AttentionMixer

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
    ``kv_share`` groups that many adjacent layers around one layer's keys and values (cross-layer
    KV sharing, for the softmax-family mixers; 1: every layer has its own).
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
    kv_share: int = 1

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
        check_int(self.kv_share, "kv_share", min=1, max=self.num_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rope(self) -> bool:
        """Whether the softmax-family mixers rotate queries and keys."""
        return self.positions == "rope"

    @property
    def num_cache_layers(self) -> int:
        """Layers whose keys and values are cached: ``ceil(num_layers / kv_share)``."""
        return -(-self.num_layers // self.kv_share)

    def kv_source(self, layer_index: int) -> int:
        """The layer whose keys and values layer ``layer_index`` attends over: ``i - i % kv_share``."""
        layer_index = check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)
        return layer_index - layer_index % self.kv_share

    def cache_layer(self, layer_index: int) -> int:
        """Where layer ``layer_index``'s keys and values live in the KV cache: ``i // kv_share``."""
        layer_index = check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)
        return layer_index // self.kv_share


def build_mixer(config: ModelConfig, *, layer_index: int = 0) -> nn.Module:
    """Block ``layer_index``'s token mixer: the catalogue entry ``config.attention`` with its options.

    With ``config.kv_share > 1`` the mixer must be a softmax-family :class:`AttentionMixer` without a
    short convolution; the layers that read an earlier layer's keys and values are built with
    ``owns_kv=False``.
    """
    mechanism = catalogue.get(config.attention)
    options = {field: getattr(config, field) for field in mechanism.config_fields}
    options.update(config.mixer_options or {})
    mixer = mechanism.build_mixer(config.d_model, config.num_heads, **options)
    if config.kv_share == 1:
        return mixer
    if not isinstance(mixer, AttentionMixer):
        raise ValueError(
            f"kv_share={config.kv_share} shares keys and values across layers, which needs a softmax-family "
            f"attention layer; attention={config.attention!r} builds {type(mixer).__name__}"
        )
    if mixer.conv is not None:
        raise ValueError(
            f"kv_share={config.kv_share} shares keys and values across layers, which a layer with a short "
            f"convolution over q, k and v cannot do (conv_size={mixer.conv_size})"
        )
    if config.kv_source(layer_index) != layer_index:
        mixer = mechanism.build_mixer(config.d_model, config.num_heads, **options, owns_kv=False)
    return mixer


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
