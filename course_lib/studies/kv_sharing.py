"""Chapter 04's cross-layer KV sharing study: what sharing keys and values across layers costs in loss.

Cross-layer attention (CLA; Brandon et al., 2024) lets groups of ``kv_share`` adjacent layers use
the keys and values of the group's first layer (``ModelConfig(kv_share=...)``), dividing the KV
cache by ``kv_share``. GQA and MQA divide it by sharing key/value heads *within* a layer instead.
The question is what each costs in quality for the same cache saving. Here every variant of
:data:`VARIANTS` is the same tiny transformer (:data:`SHARING_MODEL`) trained with the same budget
(:data:`SHARING_TRAINING`: steps, batch, context, learning rate, seeds) on the course corpus, and
its held-out loss is measured:

- "MHA": every layer its own keys and values, one per head;
- "CLA-2" and "CLA-4": MHA with pairs / groups of four layers sharing;
- "GQA-2" (2 key/value heads): the same cache as CLA-2, saved within each layer;
- "MQA" (1 key/value head): the same cache as CLA-4.

:func:`train_variant` trains one model; :func:`kv_sharing_study` runs the grid; the stored grid
``results/kv_sharing.json`` (5 variants x 3 seeds, about 20 minutes on one loaded CPU thread)
comes from::

    python -m course_lib.studies.kv_sharing --threads 1 --json results/kv_sharing.json

and :func:`load_kv_sharing` reads it back; :func:`summarise` gives mean and spread per variant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checks import check_choice, check_int
from ..measure import environment_summary
from ..models import VOCAB, ModelConfig, TinyTransformer, corpus_split, evaluate_loss, train
from ..results import RESULTS_DIR, load_payload

__all__ = [
    "SHARING_MODEL",
    "SHARING_TRAINING",
    "SEEDS",
    "VARIANTS",
    "KV_SHARING_PATH",
    "variant_config",
    "cache_numbers_per_token",
    "train_variant",
    "kv_sharing_study",
    "summarise",
    "load_kv_sharing",
]

# The shared shape: 4 layers of 4 heads of 12, RoPE (so every variant has the same positions).
SHARING_MODEL = dict(d_model=48, num_layers=4, num_heads=4, positions="rope", max_len=64)
SHARING_TRAINING = {"steps": 600, "batch_size": 16, "context": 64, "lr": 3e-3}
SEEDS = (0, 1, 2)
VARIANTS: dict[str, dict] = {
    "MHA": dict(attention="mha"),
    "CLA-2": dict(attention="mha", kv_share=2),
    "GQA-2": dict(attention="gqa", num_kv_heads=2),
    "CLA-4": dict(attention="mha", kv_share=4),
    "MQA": dict(attention="mqa"),
}
KV_SHARING_PATH = RESULTS_DIR / "kv_sharing.json"


def variant_config(variant: str) -> ModelConfig:
    """The :class:`ModelConfig` of one variant of :data:`VARIANTS`."""
    check_choice(variant, "variant", VARIANTS)
    return ModelConfig(vocab_size=len(VOCAB), **SHARING_MODEL, **VARIANTS[variant])


def cache_numbers_per_token(model: TinyTransformer) -> int:
    """Numbers the model caches per token, summed over its layers (read off the layers themselves)."""
    return sum(block.attention.kv_numbers_per_token() for block in model.blocks)


def train_variant(
    variant: str, *, seed: int = 0, steps: int | None = None, progress: bool = False
) -> tuple[TinyTransformer, dict]:
    """Train one variant with :data:`SHARING_TRAINING` (``steps`` overrides its steps); returns the
    model and its row: variant, seed, steps, ``held_out_loss`` (nats per character on the held-out
    corpus), ``train_loss`` (mean of the last 50 steps), ``parameters``, ``cache_numbers_per_token``
    and measured ``seconds``."""
    config = variant_config(variant)
    seed = check_int(seed, "seed", min=0)
    training = dict(SHARING_TRAINING)
    if steps is not None:
        training["steps"] = check_int(steps, "steps", min=1)
    train_tokens, held_out = corpus_split()
    model = TinyTransformer(config, seed=seed)
    started = time.perf_counter()
    losses = train(model, train_tokens, seed=seed, progress=progress, **training)
    seconds = time.perf_counter() - started
    tail = losses[-50:]
    row = {
        "variant": variant,
        "seed": seed,
        "steps": training["steps"],
        "held_out_loss": evaluate_loss(model, held_out, context=training["context"]),
        "train_loss": sum(tail) / len(tail),
        "parameters": model.num_parameters(),
        "cache_numbers_per_token": cache_numbers_per_token(model),
        "seconds": seconds,
    }
    return model, row


def kv_sharing_study(
    variants: Sequence[str] = tuple(VARIANTS),
    seeds: Sequence[int] = SEEDS,
    *,
    steps: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """:func:`train_variant` for every variant and seed: one row per run."""
    return [train_variant(v, seed=s, steps=steps, progress=progress)[1] for v in variants for s in seeds]


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Per variant (in the order they first appear): mean held-out loss, its min and max over
    seeds, the difference of the mean to "MHA" (when present), parameters and cache per token."""
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    summary = []
    for variant, runs in by_variant.items():
        losses = [r["held_out_loss"] for r in runs]
        summary.append(
            {
                "variant": variant,
                "runs": len(runs),
                "held_out_loss": sum(losses) / len(losses),
                "min": min(losses),
                "max": max(losses),
                "parameters": runs[0]["parameters"],
                "cache_numbers_per_token": runs[0]["cache_numbers_per_token"],
            }
        )
    reference = next((s["held_out_loss"] for s in summary if s["variant"] == "MHA"), None)
    for s in summary:
        s["vs_mha"] = s["held_out_loss"] - reference if reference is not None else float("nan")
    return summary


def load_kv_sharing(path: str | Path | None = None) -> dict:
    """The stored study (default ``results/kv_sharing.json``): ``model``, ``training``,
    ``environment`` and ``rows`` (one per run, as :func:`train_variant` returns)."""
    return load_payload(KV_SHARING_PATH if path is None else path)


def _main(argv: Sequence[str] | None = None) -> Path:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Train every KV-sharing variant and store the losses.")
    parser.add_argument("--json", default=str(KV_SHARING_PATH), help="where to write the results")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    rows = []
    for variant in VARIANTS:
        for seed in arguments.seeds:
            rows.append(train_variant(variant, seed=seed, steps=arguments.steps)[1])
            print(f"{variant:>6} seed {seed}: held-out loss {rows[-1]['held_out_loss']:.4f}", flush=True)
    training = dict(SHARING_TRAINING, seeds=arguments.seeds)
    if arguments.steps is not None:
        training["steps"] = arguments.steps
    payload = {
        "study": "kv_sharing",
        "model": SHARING_MODEL,
        "variants": VARIANTS,
        "training": training,
        "environment": environment_summary("cpu"),
        "rows": rows,
    }
    path = Path(arguments.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    _main()
