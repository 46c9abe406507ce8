"""Training the tiny model: AdamW on random windows of a token stream, warm-up and cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_float, check_int
from .corpus import get_batch
from .transformer import TinyTransformer

__all__ = ["train", "evaluate_loss"]


def _loss(model: TinyTransformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(
    model: TinyTransformer,
    data: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 16,
    context: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """AdamW on random windows of ``data`` for ``steps`` steps; returns the loss of every step.

    The learning rate warms up over the first 10 steps and decays with a cosine to a tenth.
    Batches come from a ``torch.Generator`` seeded by ``seed``, so a run is reproducible.
    """
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    steps = check_int(steps, "steps", min=1)
    lr = check_float(lr, "lr", min=0.0, min_open=True)
    if context > model.config.max_len and model.config.positions == "learned":
        raise ValueError(f"context={context} exceeds the model's max_len={model.config.max_len}")
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(10, steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    for _ in bar:
        inputs, targets = get_batch(data, batch_size, context, generator=generator)
        loss = _loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_loss(
    model: TinyTransformer,
    data: torch.Tensor,
    *,
    batches: int = 8,
    batch_size: int = 16,
    context: int = 64,
    seed: int = 1,
) -> float:
    """Mean cross-entropy (nats per character) on ``batches`` seeded random windows of ``data``."""
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    batches = check_int(batches, "batches", min=1)
    total = 0.0
    for _ in range(batches):
        inputs, targets = get_batch(data, batch_size, context, generator=generator)
        total += _loss(model, inputs, targets).item()
    return total / batches
