"""Multi-query associative recall (MQAR): the synthetic task that separates the token mixers.

MQAR comes from the Zoology study (Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra, Ré,
2023). A sequence first lists ``num_pairs`` key-value pairs, then asks for some of the keys again;
at each query the model must output the value that followed that key earlier::

    k1 v1 k2 v2 k3 v3 k4 v4 | _ k3 _ _ k1 _ k4 k2 _ ...
                              answers:  v3     v1    v4 v2

The loss and the accuracy count only the answer positions (the other targets are ``IGNORE``).
Softmax attention solves it with an induction-style lookup whatever the distance; a fixed-size
state must hold all pairs at once, so recall falls as pairs grow beyond what the state holds.

Models are :class:`course_lib.models.TinyTransformer` s at matched width: this module registers
one mixer per method in :data:`course_lib.models.ATTENTION_LAYERS` (``"softmax_attention"``,
``"sliding_window"``, ``"linear_attention"``, ``"retnet"``, ``"gla"``, ``"mamba2"``, ``"deltanet"``,
``"gated_deltanet"``; the recurrent ones are the layers of :mod:`course_lib.recurrent.layers`).
As in Zoology, every mixer reads its inputs through a short causal convolution (width
:data:`CONV_SIZE`), so a value token can carry its key: without it the attention baseline needs
far more steps to form an induction head than a notebook can afford. The models carry no
position embedding and each mixer keeps its own initialisation (:func:`recall_model` says why).
:func:`state_bytes` gives the decoding memory per sequence:
the KV cache for softmax and sliding-window attention, the recurrent state for the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checks import check_choice, check_float, check_int, check_tensor
from .linear import linear_attention
from .models import ATTENTION_LAYERS, ModelConfig, TinyTransformer, register_attention
from .recurrent.layers import MIXERS as RECURRENT_MIXERS
from .recurrent.layers import ShortConvolution
from .sparse import sliding_window_attention

__all__ = [
    "IGNORE",
    "MQARTask",
    "mqar_batch",
    "recall_loss",
    "answer_accuracy",
    "RECALL_MIXERS",
    "WINDOW",
    "CONV_SIZE",
    "recall_model",
    "state_bytes",
    "train_recall",
    "evaluate_recall",
    "recall_grid",
]

IGNORE = -100  # target of the positions that are not answers (cross_entropy's ignore_index)
CONV_SIZE = 4  # every mixer reads q, k, v through a causal depthwise convolution of this width
WINDOW = 16  # sliding-window size of the "sliding_window" mixer (tokens, the query included)


# --- the task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQARTask:
    """Shape of an MQAR sequence.

    Token 0 is the filler; keys are tokens ``1 .. K`` and values ``K + 1 .. vocab_size - 1`` with
    ``K = (vocab_size - 1) // 2``. Every pair's key is queried once, in a random order, at random
    positions of the query part (the ``seq_len - 2 num_pairs`` tokens after the pairs).
    """

    vocab_size: int = 64
    num_pairs: int = 4
    seq_len: int = 32

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", min=5)
        check_int(self.num_pairs, "num_pairs", min=1)
        check_int(self.seq_len, "seq_len", min=1)
        num_keys = (self.vocab_size - 1) // 2
        if self.num_pairs > num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} exceeds the {num_keys} distinct keys "
                f"of vocab_size={self.vocab_size}"
            )
        if self.seq_len < 3 * self.num_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} must be at least 3 * num_pairs={3 * self.num_pairs} "
                "(pairs + queries)"
            )


def mqar_batch(
    task: MQARTask, batch_size: int, *, generator: torch.Generator | None = None, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, both ``(batch_size, seq_len)`` long; targets are :data:`IGNORE`
    except at the queries, where they hold the value paired with the queried key.

    Pass a ``generator`` (consumed) or a ``seed``; the same seed gives the same batch.
    """
    if not isinstance(task, MQARTask):
        raise TypeError(f"task must be an MQARTask, got {type(task).__name__}")
    batch_size = check_int(batch_size, "batch_size", min=1)
    if generator is None:
        generator = torch.Generator().manual_seed(check_int(0 if seed is None else seed, "seed"))
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    B, n, T = batch_size, task.num_pairs, task.seq_len
    num_keys = (task.vocab_size - 1) // 2
    num_values = task.vocab_size - 1 - num_keys
    # Distinct keys (and values) per sequence: argsort of random numbers is a random permutation.
    keys = torch.rand(B, num_keys, generator=generator).argsort(-1)[:, :n] + 1
    values = torch.rand(B, num_values, generator=generator).argsort(-1)[:, :n] + 1 + num_keys
    inputs = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    # Queries: each pair once, in random order, at random sorted positions after the pairs.
    order = torch.rand(B, n, generator=generator).argsort(-1)
    slots = torch.rand(B, T - 2 * n, generator=generator).argsort(-1)[:, :n].sort(-1).values + 2 * n
    rows = torch.arange(B)[:, None]
    inputs[rows, slots] = keys.gather(1, order)
    targets[rows, slots] = values.gather(1, order)
    return inputs, targets


def recall_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the answer positions only (targets equal to :data:`IGNORE` are skipped)."""
    check_tensor(logits, "logits", ndim=3, floating=True)
    check_tensor(targets, "targets", ndim=2, dtype=torch.long)
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of answer positions whose arg-max prediction is the right value."""
    check_tensor(logits, "logits", ndim=3, floating=True)
    check_tensor(targets, "targets", ndim=2, dtype=torch.long)
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    answers = targets != IGNORE
    if not answers.any():
        raise ValueError("targets hold no answer position (all equal IGNORE)")
    return float((logits.argmax(-1)[answers] == targets[answers]).float().mean())


# --- mixers at matched width --------------------------------------------------------------------


class _SequenceMixer(nn.Module):
    """Adapter to the model's mixer interface: ``forward(x, *, cache=None, layer_index=0)``.

    These mixers train and evaluate on whole sequences; decoding with a cache is chapter 04's
    (softmax) and chapter 07's (recurrent) subject, so ``cache`` must be None here.
    """

    def _no_cache(self, cache) -> None:
        if cache is not None:
            raise ValueError("cache must be None: the recall mixers run on whole sequences")

    def make_cache(self, *args, **kwargs):
        raise NotImplementedError("the recall mixers have no decoding cache; use attention='mha'")


class _QKVAttention(_SequenceMixer):
    """q, k, v projections through a short convolution, a per-head core (softmax, sliding-window or
    linear attention), output projection."""

    def __init__(self, config: ModelConfig, core: str) -> None:
        super().__init__()
        self.num_heads, self.core = config.num_heads, core
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.conv = ShortConvolution(3 * config.d_model, CONV_SIZE)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        self._no_cache(cache)
        B, T, C = x.shape
        qkv = self.conv(self.qkv(x))
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, -1))
        if self.core == "softmax":
            # SDPA computes the same softmax attention as course_lib.standard.attention (tested
            # in chapter 01) with a fused backward, which makes the recall grid affordable on a CPU.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.core == "window":
            o = sliding_window_attention(q, k, v, WINDOW, causal=True)
        else:
            o = linear_attention(q, k, v, causal=True, form="chunk", chunk_size=32)
        return self.out(o.transpose(1, 2).reshape(B, T, C))


class _Recurrent(_SequenceMixer):
    """A layer of :mod:`course_lib.recurrent.layers` behind the model's mixer interface."""

    def __init__(self, config: ModelConfig, name: str) -> None:
        super().__init__()
        self.layer = RECURRENT_MIXERS[name](
            config.d_model, config.num_heads, chunk_size=32, conv_size=CONV_SIZE
        )

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        self._no_cache(cache)
        return self.layer(x)


# Display name -> ATTENTION_LAYERS name.
RECALL_MIXERS = {
    "attention": "softmax_attention",
    "sliding_window": "sliding_window",
    "linear_attention": "linear_attention",
    "retnet": "retnet",
    "gla": "gla",
    "mamba2": "mamba2",
    "deltanet": "deltanet",
    "gated_deltanet": "gated_deltanet",
}

register_attention("softmax_attention", lambda config: _QKVAttention(config, "softmax"))
register_attention("sliding_window", lambda config: _QKVAttention(config, "window"))
register_attention("linear_attention", lambda config: _QKVAttention(config, "linear"))
for _name in ("retnet", "gla", "mamba2", "deltanet", "gated_deltanet"):
    register_attention(_name, lambda config, _name=_name: _Recurrent(config, _name))


def recall_model(
    mixer: str, task: MQARTask, *, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> TinyTransformer:
    """A :class:`TinyTransformer` with ``mixer`` in every block and no position embedding.

    MQAR needs no absolute positions: order comes from the causal mask or the recurrence and the
    short convolution. Learned position embeddings only add noise to the key matching (softmax
    attention at T = 128 stayed near 0.1 accuracy after 600 steps with them and reached 0.99
    without). ``positions="rope"`` leaves the embedding out, and the recall mixers rotate nothing.
    """
    check_choice(mixer, "mixer", tuple(RECALL_MIXERS))
    if not isinstance(task, MQARTask):
        raise TypeError(f"task must be an MQARTask, got {type(task).__name__}")
    config = ModelConfig(
        vocab_size=task.vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        attention=RECALL_MIXERS[mixer],
        positions="rope",  # no position embedding; the recall mixers apply no rotation either
        max_len=task.seq_len,
    )
    model = TinyTransformer(config, seed=seed)
    # TinyTransformer's initialisation (normal, std 0.02, zero biases) would also zero the gate
    # biases the recurrent layers set on purpose and leave softmax attention's q.k scores on a
    # long plateau (hundreds of extra steps), so each mixer is rebuilt with its own initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in model.blocks:
            block.attention = ATTENTION_LAYERS[config.attention](config)
    return model


def state_bytes(
    mixer: str,
    seq_len: int,
    *,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes one sequence keeps for decoding after ``seq_len`` tokens, over all layers.

    Softmax attention: K and V of every token (``2 T d_model``). Sliding window: of the last
    :data:`WINDOW` tokens. Linear attention: ``H D^2`` plus its normaliser ``H D``. RetNet, GLA,
    DeltaNet, Gated DeltaNet: ``H D_k D_v``. Mamba-2: ``H P N`` with inner width ``2 d_model`` and
    ``N = 16``. Short-convolution buffers (3 past inputs) are left out: they are small and equal.
    """
    check_choice(mixer, "mixer", tuple(RECALL_MIXERS))
    seq_len = check_int(seq_len, "seq_len", min=1)
    D = d_model // check_int(num_heads, "num_heads", min=1)
    H = num_heads
    if mixer == "attention":
        per_layer = 2 * seq_len * d_model
    elif mixer == "sliding_window":
        per_layer = 2 * min(WINDOW, seq_len) * d_model
    elif mixer == "linear_attention":
        per_layer = H * D * D + H * D
    elif mixer == "mamba2":
        per_layer = 2 * d_model * 16
    else:
        per_layer = H * D * D
    return (
        per_layer * check_int(num_layers, "num_layers", min=1) * torch.empty((), dtype=dtype).element_size()
    )


# --- training and evaluation --------------------------------------------------------------------


@torch.no_grad()
def evaluate_recall(
    model: TinyTransformer, task: MQARTask, *, batches: int = 4, batch_size: int = 64, seed: int = 1234
) -> float:
    """Answer accuracy on ``batches`` seeded batches the training never saw (a different seed)."""
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    model.eval()
    correct = []
    for _ in range(check_int(batches, "batches", min=1)):
        inputs, targets = mqar_batch(task, batch_size, generator=generator)
        correct.append(answer_accuracy(model(inputs), targets))
    return sum(correct) / len(correct)


def train_recall(
    mixer: str,
    task: MQARTask,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    eval_every: int = 0,
    progress: bool = True,
) -> dict:
    """Train a fresh :func:`recall_model` on fresh seeded MQAR batches with AdamW; evaluate it.

    Tiny models train fastest on one thread (two threads on a busy 2-core machine spin-wait for
    each other and can run 10x slower), so training uses one thread and restores the count after.

    Returns a dict: ``mixer``, the task fields, ``steps``, ``losses`` (per step), ``curve``
    (``(step, accuracy)`` every ``eval_every`` steps, if > 0), ``accuracy`` (final, held-out),
    ``state_bytes``, ``parameters`` and the ``model``.
    """
    steps = check_int(steps, "steps", min=1)
    lr = check_float(lr, "lr", min=0.0, min_open=True)
    eval_every = check_int(eval_every, "eval_every", min=0)
    model = recall_model(mixer, task, d_model=d_model, num_layers=num_layers, num_heads=num_heads, seed=seed)
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = min(20, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    losses, curve = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_loop(
            model,
            task,
            optimizer,
            scheduler,
            generator,
            steps,
            batch_size,
            eval_every,
            losses,
            curve,
            mixer,
            progress,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "mixer": mixer,
        **asdict(task),
        "steps": steps,
        "losses": losses,
        "curve": curve,
        "accuracy": evaluate_recall(model, task),
        "state_bytes": state_bytes(
            mixer, task.seq_len, d_model=d_model, num_layers=num_layers, num_heads=num_heads
        ),
        "parameters": model.num_parameters(),
        "model": model,
    }


def _train_loop(
    model,
    task,
    optimizer,
    scheduler,
    generator,
    steps,
    batch_size,
    eval_every,
    losses,
    curve,
    mixer,
    progress,
):
    bar = tqdm(range(steps), desc=f"{mixer} T={task.seq_len}", disable=not progress, leave=False)
    for step in bar:
        model.train()
        inputs, targets = mqar_batch(task, batch_size, generator=generator)
        loss = recall_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve.append((step + 1, evaluate_recall(model, task, batches=1)))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)


def recall_grid(
    mixers=tuple(RECALL_MIXERS),
    tasks=(MQARTask(64, 4, 32), MQARTask(64, 8, 64)),
    *,
    steps: int = 300,
    progress: bool = True,
    **options,
) -> list[dict]:
    """:func:`train_recall` for every mixer and task; the results without the models (JSON-ready)."""
    for mixer in mixers:
        check_choice(mixer, "mixers", tuple(RECALL_MIXERS))
    jobs = [(m, t) for t in tasks for m in mixers]
    rows = []
    for mixer, task in tqdm(jobs, desc="recall grid", disable=not progress):
        result = train_recall(mixer, task, steps=steps, progress=progress, **options)
        result.pop("model")
        result["final_loss"] = sum(result["losses"][-20:]) / len(result["losses"][-20:])
        result.pop("losses")
        rows.append(result)
    return rows
