"""The shape of the tiny model, and the attention layers it can be built with, by name.

``ModelConfig(attention=name)`` builds every block's mixer with ``ATTENTION_LAYERS[name](config)``:
"mha", "mqa", "gqa" and "mla" (chapter 04's layers, :mod:`course_lib.models.layers`) are here from
the start; later chapters add theirs with :func:`register_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..checks import check_choice, check_int
from .layers import CachedGQA, CachedMLA

__all__ = ["ModelConfig", "ATTENTION_LAYERS", "register_attention"]


@dataclass
class ModelConfig:
    """Shape of a :class:`TinyTransformer`.

    ``attention`` names an entry of ``ATTENTION_LAYERS``; ``num_kv_heads`` is used by "gqa"
    (default ``num_heads // 2``); ``latent_dim`` and ``rope_dim`` by "mla". ``positions`` is
    "learned" (an embedding added to the tokens, at most ``max_len`` positions) or "rope"
    (queries and keys rotated inside attention; MLA always has its own decoupled RoPE key).
    """

    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    attention: str = "mha"
    num_kv_heads: int | None = None
    latent_dim: int = 16
    rope_dim: int = 8
    mla_mode: str = "absorbed"
    positions: str = "learned"
    max_len: int = 256
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", min=1)
        check_int(self.d_model, "d_model", min=1)
        check_int(self.num_layers, "num_layers", min=1)
        check_int(self.num_heads, "num_heads", min=1)
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        check_choice(self.attention, "attention", tuple(ATTENTION_LAYERS))
        check_choice(self.positions, "positions", ("learned", "rope"))
        check_choice(self.mla_mode, "mla_mode", ("naive", "absorbed"))
        check_int(self.max_len, "max_len", min=1)
        check_int(self.mlp_ratio, "mlp_ratio", min=1)
        if self.num_kv_heads is not None:
            check_int(self.num_kv_heads, "num_kv_heads", min=1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# name -> constructor(config) -> mixer module. Chapters 07/08 add theirs with register_attention.
ATTENTION_LAYERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "mha": lambda config: CachedGQA(config, config.num_heads),
    "gqa": lambda config: CachedGQA(config, config.num_kv_heads or max(config.num_heads // 2, 1)),
    "mqa": lambda config: CachedGQA(config, 1),
    "mla": CachedMLA,
}


def register_attention(name: str, constructor: Callable[[ModelConfig], nn.Module]) -> None:
    """Make ``ModelConfig(attention=name)`` build its mixers with ``constructor(config)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(constructor):
        raise TypeError(f"constructor must be callable, got {type(constructor).__name__}")
    ATTENTION_LAYERS[name] = constructor
