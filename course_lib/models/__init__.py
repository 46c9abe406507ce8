"""A tiny decoder-only transformer with a pluggable attention, and a corpus that needs no download.

Small on purpose (nanoGPT-like): token embedding (+ learned positions, or RoPE inside attention),
``num_layers`` pre-norm blocks ``x + attention(norm(x))`` then ``x + mlp(norm(x))``, a final norm
and a head tied to the embedding. The token mixer of every block is built by its name in the
catalogue of mechanisms (:mod:`course_lib.catalogue`): softmax attention, MQA, GQA, MLA, sliding
window, linear attention and every recurrence of chapter 07.

Read the modules by job:
- :mod:`.config`: :class:`ModelConfig` and :func:`build_mixer` (a block's mixer from the catalogue);
- :mod:`.layers`: deprecated names of the former cached layers (``CachedGQA``, ``CachedMLA``);
- :mod:`.transformer`: :class:`Block` and :class:`TinyTransformer`;
- :mod:`.hooks`: :func:`step_function` for :mod:`course_lib.decoding`, and the attention hooks
  :func:`forward_with_attention` and :func:`attention_inputs`;
- :mod:`.corpus`: :data:`VOCAB`, :func:`encode`, :func:`decode`, :func:`load_corpus`,
  :func:`corpus_split`, :func:`get_batch`;
- :mod:`.training`: :func:`train`, :func:`evaluate_loss`;
- :mod:`.eviction_model`: chapter 05's trained model, its shipped weights and how they were made
  (``python -m course_lib.models --make-eviction-model``).
"""

from .config import ALIASES, ATTENTION_LAYERS, POSITIONS, ModelConfig, build_mixer, mixer_names
from .corpus import (
    CORPUS_MODULES,
    HELD_OUT_FRACTION,
    VOCAB,
    corpus_split,
    decode,
    encode,
    get_batch,
    load_corpus,
)
from .eviction_model import (
    EVICTION_MODEL_PATH,
    EVICTION_TRAINING,
    eviction_model_config,
    load_eviction_model,
    make_eviction_model,
)
from .hooks import attention_inputs, attention_layers, forward_with_attention, step_function
from .layers import CachedGQA, CachedMLA
from .training import evaluate_loss, train
from .transformer import Block, TinyTransformer

__all__ = [
    "ModelConfig",
    "ALIASES",
    "POSITIONS",
    "mixer_names",
    "build_mixer",
    "ATTENTION_LAYERS",
    "attention_layers",
    "TinyTransformer",
    "step_function",
    "attention_inputs",
    "forward_with_attention",
    "VOCAB",
    "encode",
    "decode",
    "load_corpus",
    "get_batch",
    "train",
    "evaluate_loss",
    "corpus_split",
    "eviction_model_config",
    "EVICTION_TRAINING",
    "EVICTION_MODEL_PATH",
    "make_eviction_model",
    "load_eviction_model",
    # the building blocks, public since before the split into modules
    "Block",
    "CachedGQA",
    "CachedMLA",
    "CORPUS_MODULES",
    "HELD_OUT_FRACTION",
]
