"""Chapter 05's trained model: the tiny transformer trained once on the corpus, shipped as weights.

``python -m course_lib.models --make-eviction-model`` trains it (:func:`make_eviction_model`)
and writes ``course_lib/data/eviction_model.pt``; :func:`load_eviction_model` loads it once per
process. Chapter 05 measures KV-cache eviction on its real attention.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .config import ModelConfig
from .corpus import VOCAB, corpus_split
from .training import evaluate_loss, train
from .transformer import TinyTransformer

__all__ = [
    "EVICTION_MODEL_PATH",
    "EVICTION_TRAINING",
    "eviction_model_config",
    "make_eviction_model",
    "load_eviction_model",
]

# The weights ship as package data of course_lib (course_lib/data/, see pyproject.toml).
EVICTION_MODEL_PATH = Path(__file__).resolve().parents[1] / "data" / "eviction_model.pt"
# How the shipped weights were trained: `python -m course_lib.models --make-eviction-model`.
EVICTION_TRAINING = {"steps": 1000, "batch_size": 8, "context": 320, "lr": 3e-3, "seed": 0}


def eviction_model_config() -> ModelConfig:
    """The shape of chapter 05's model: 2 layers, 4 query heads sharing 2 key/value heads, RoPE."""
    return ModelConfig(
        vocab_size=len(VOCAB),
        d_model=64,
        num_layers=2,
        num_heads=4,
        attention="gqa",
        num_kv_heads=2,
        positions="rope",
        max_len=EVICTION_TRAINING["context"],
    )


def make_eviction_model(
    path: str | Path | None = EVICTION_MODEL_PATH, *, progress: bool = True
) -> TinyTransformer:
    """Train chapter 05's model with :data:`EVICTION_TRAINING` and save its weights to ``path``.

    Deterministic for a given machine and PyTorch version (seeded batches and initialisation);
    takes a few minutes on one CPU core. ``path=None`` trains without saving.
    """
    train_tokens, held_out = corpus_split()
    model = TinyTransformer(eviction_model_config(), seed=EVICTION_TRAINING["seed"])
    train(model, train_tokens, progress=progress, **EVICTION_TRAINING)
    if path is not None:
        context = EVICTION_TRAINING["context"]
        held_out_loss = evaluate_loss(model, held_out, batches=4, batch_size=8, context=context)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "training": dict(EVICTION_TRAINING),
                "held_out_loss": held_out_loss,
                "torch_version": str(torch.__version__),
            },
            path,
        )
    return model


@functools.cache
def _load_eviction_model(path: str) -> TinyTransformer:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no weights at {path}: run `python -m course_lib.models --make-eviction-model` to train them"
        )
    saved = torch.load(path, weights_only=True)
    model = TinyTransformer(eviction_model_config())
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False)


def load_eviction_model(path: str | Path = EVICTION_MODEL_PATH) -> TinyTransformer:
    """Chapter 05's trained model, loaded from the shipped weights once per process (in eval mode).

    The model is shared by every caller: do not train or modify it (``copy.deepcopy`` it first).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return _load_eviction_model(str(Path(path).resolve()))
