"""Chapter 08's recall grid: every mixer trained on MQAR at each sequence length, then evaluated.

:func:`recall_task` is the task of the grid at length T (``num_pairs = T / 16``, as in Zoology's
grid); :func:`grid_point` trains one mixer on it for :data:`RECALL_STEPS` steps of batch
:data:`RECALL_BATCH` at learning rate :data:`RECALL_LR` (:func:`course_lib.recall.train_recall`)
and returns the trained model, a held-out batch of 64 sequences to time it on, and what the grid
stores about the run (accuracy, state size, settings). The benchmark suite ``recall``
(:mod:`course_lib.benchmarks.ch08`) times the model on that batch::

    python -m course_lib.bench recall --threads 1 --min-run-time 0.05 --json /tmp/recall_grid.json

One fixed learning rate and 600 steps under-train most mixers (issue 19), so its accuracies are a quick
look, not a finding; chapter 08 reads the recall study (:mod:`course_lib.studies.recall_study`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int
from ..recall import MQARTask, mqar_batch, train_recall

__all__ = [
    "RECALL_LENGTHS",
    "RECALL_STEPS",
    "RECALL_LR",
    "RECALL_BATCH",
    "EVALUATION_BATCH",
    "recall_task",
    "grid_point",
]

RECALL_LENGTHS = [64, 128, 256]
RECALL_STEPS = 600
RECALL_LR = 3e-3
RECALL_BATCH = 16
EVALUATION_BATCH = 64  # sequences in the batch whose forward pass is timed


def recall_task(T: int) -> MQARTask:
    """The MQAR task of the grid at length T: ``num_pairs = T / 16`` (at least 1) as in Zoology's
    (64, 4), (128, 8), (256, 16), with 64 tokens of vocabulary (31 keys, so up to T = 496)."""
    T = check_int(T, "T", min=3)
    return MQARTask(vocab_size=64, num_pairs=max(T // 16, 1), seq_len=T)


def grid_point(
    mixer: str,
    T: int,
    *,
    steps: int = RECALL_STEPS,
    lr: float = RECALL_LR,
    batch_size: int = RECALL_BATCH,
    progress: bool = True,
) -> tuple[nn.Module, torch.Tensor, dict]:
    """Train ``mixer`` on :func:`recall_task` ``(T)``; return ``(model, inputs, record)``.

    ``inputs`` is a seeded batch of :data:`EVALUATION_BATCH` sequences the training never saw;
    ``record`` holds what :func:`course_lib.recall.train_recall` reports (accuracy, state bytes,
    parameters, the task) without the model, the loss curve and the per-step losses, plus ``lr``,
    ``batch_size`` and ``final_loss`` (the mean loss of the last 20 steps).
    """
    task = recall_task(T)
    result = train_recall(mixer, task, steps=steps, lr=lr, batch_size=batch_size, progress=progress)
    model = result.pop("model")
    inputs, _ = mqar_batch(task, EVALUATION_BATCH, seed=99)
    losses = result.pop("losses")
    result.pop("curve")
    record = {
        **result,
        "lr": lr,
        "batch_size": batch_size,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
    return model, inputs, record
