"""Chapter 08's benchmarks: every mechanism side by side, and quality on associative recall.

``python -m course_lib.bench all`` times one causal forward pass (prefill) of every mechanism of
the course at T = 256 .. 2048 (one sequence, H = 4 heads, D = 64) and measures its peak memory:
naive attention (:func:`course_lib.standard.attention`), SDPA, the course's flash_attention
(blocks of 128), sliding-window attention (w = 256), and the chunk forms of linear attention,
GLA, the delta rule and SSD. SDPA is the reference of the ratio columns.

``python -m course_lib.bench recall`` trains a tiny model per mixer (:mod:`course_lib.recall`)
on MQAR at each sequence length (num_pairs = T / 8), then times one evaluation forward pass of a
batch of 64; the held-out answer accuracy and the decoding state size go into the JSON (``extra``)
and into a table printed after the timings. The default grid (8 mixers x T = 32, 64, 300 steps)
takes several minutes on 2 cores; the stored file ``results/recall_small.json`` is its T = 32 half
(about 3 minutes), from::

    python -m course_lib.bench recall --lengths 32 --json results/recall_small.json --min-run-time 0.05
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bench import Measurement, format_bytes
from ..linear import linear_attention
from ..recall import RECALL_MIXERS, MQARTask, mqar_batch, train_recall
from ..recurrent import delta_rule, gla, ssd
from ..sparse import sliding_window_attention
from ..standard import attention
from ..tiling import flash_attention
from .ch07 import recurrent_inputs

__all__ = [
    "SUITES",
    "ALL_METHODS",
    "all_suite",
    "recall_suite",
    "recall_report",
    "RECALL_STEPS",
    "RECALL_LENGTHS",
]

HEADS, HEAD_DIM, WINDOW, CHUNK = 4, 64, 256, 64
ALL_LENGTHS = [256, 512, 1024, 2048]
RECALL_LENGTHS = [32, 64]
RECALL_STEPS = 300


ALL_METHODS = {
    "naive": lambda x: attention(x["q"], x["k"], x["v"], causal=True),
    "sdpa": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True),
    "flash": lambda x: flash_attention(x["q"], x["k"], x["v"], causal=True, block_q=128, block_k=128),
    "window": lambda x: sliding_window_attention(x["q"], x["k"], x["v"], WINDOW, causal=True),
    "linear": lambda x: linear_attention(x["q"], x["k"], x["v"], causal=True, form="chunk", chunk_size=CHUNK),
    "gla": lambda x: gla(x["q"], x["k"], x["v"], x["g"], form="chunk", chunk_size=CHUNK),
    "delta_rule": lambda x: delta_rule(
        x["q"], x["unit_k"], x["v"], x["beta"], form="chunk", chunk_size=CHUNK
    ),
    "ssd": lambda x: ssd(x["v"], x["dt"], x["A"], x["k"], x["q"], form="chunk", chunk_size=CHUNK),
}


def all_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Every mechanism's causal forward pass; SDPA is the reference; T = 256 .. 2048."""

    def method(name):
        def build(T: int):
            x = recurrent_inputs(T, device, dtype)
            return lambda: ALL_METHODS[name](x)

        return build

    return {name: method(name) for name in ALL_METHODS}, "sdpa", list(ALL_LENGTHS)


def recall_suite(device: torch.device | str = "cpu", *, steps: int = RECALL_STEPS, progress: bool = True):
    """Train every recall mixer at each length T (num_pairs = T // 8), then time its evaluation pass.

    Training runs on the CPU whatever ``device`` says (the models are tiny).
    """

    def method(mixer):
        def build(T: int):
            task = MQARTask(vocab_size=64, num_pairs=max(T // 8, 1), seq_len=T)
            result = train_recall(mixer, task, steps=steps, progress=progress)
            model = result.pop("model")
            inputs, _ = mqar_batch(task, 64, seed=99)

            @torch.no_grad()
            def call():
                return model(inputs)

            losses = result.pop("losses")
            result.pop("curve")
            call.extra = {**result, "final_loss": sum(losses[-20:]) / len(losses[-20:])}
            return call

        return build

    return {name: method(name) for name in RECALL_MIXERS}, "attention", list(RECALL_LENGTHS)


def recall_report(results: list[Measurement]) -> str:
    """Accuracy and state size per mixer and length, from the measurements' ``extra``."""
    lines = [f"{'mixer':>16} {'T':>5} {'pairs':>5} {'accuracy':>8} {'state':>10}"]
    for r in results:
        if "accuracy" in r.extra:
            e = r.extra
            lines.append(
                f"{r.method:>16} {r.T:>5} {e['num_pairs']:>5} {e['accuracy']:>8.3f} "
                f"{format_bytes(e['state_bytes']):>10}"
            )
    return "\n".join(lines)


recall_suite.report = recall_report

SUITES = {"all": all_suite, "recall": recall_suite}
