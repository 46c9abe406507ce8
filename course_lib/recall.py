"""Multi-query associative recall (MQAR): the synthetic task that separates the token mixers.

MQAR comes from the Zoology study (Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra, Ré,
2023). A sequence first lists ``num_pairs`` key-value pairs, then asks for some of the keys again;
at each query the model must output the value that followed that key earlier::

    k1 v1 k2 v2 k3 v3 k4 v4 | _ k3 _ _ k1 _ k4 k2 _ ...
                              answers:  v3     v1    v4 v2

The loss and the accuracy count only the answer positions (the other targets are ``IGNORE``).
Softmax attention solves it with an induction-style lookup whatever the distance; a fixed-size
state must hold all pairs at once, so recall falls as pairs grow beyond what the state holds.

Models are :class:`course_lib.models.TinyTransformer` s at matched width, one per token mixer of
the catalogue of mechanisms (:data:`RECALL_MIXERS`: softmax, sliding-window and linear attention,
and every recurrence of chapter 07, each built by its catalogue name). As in Zoology, every mixer
reads its inputs through a short causal convolution (width
:data:`CONV_SIZE`), so a value token can carry its key: without it the attention baseline needs
far more steps to form an induction head than a notebook can afford. The models carry no
position embedding and each mixer keeps its own initialisation (:func:`recall_model` says why).
:func:`state_bytes` gives the decoding memory per sequence:
the KV cache for softmax and sliding-window attention, the recurrent state for the others.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import catalogue
from .checks import check_choice, check_float, check_int, check_tensor
from .models import ModelConfig, TinyTransformer, build_mixer

__all__ = [
    "IGNORE",
    "MQARTask",
    "mqar_batch",
    "recall_loss",
    "answer_accuracy",
    "answer_distances",
    "accuracy_by_distance",
    "PLACEMENTS",
    "RECALL_MIXERS",
    "RECALL_OPTIONS",
    "recall_options",
    "WINDOW",
    "CONV_SIZE",
    "recall_model",
    "state_bytes",
    "train_recall",
    "evaluate_recall",
    "recall_grid",
]

IGNORE = -100  # target of the positions that are not answers (cross_entropy's ignore_index)
PLACEMENTS = ("uniform", "power_law")  # where the queries go in the query part (see MQARTask)
CONV_SIZE = 4  # every mixer reads q, k, v through a causal depthwise convolution of this width
WINDOW = 16  # sliding-window size of the "sliding_window" mixer (tokens, the query included)


# --- the task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQARTask:
    """Shape of an MQAR sequence.

    Token 0 is the filler; keys are tokens ``1 .. K`` and values ``K + 1 .. vocab_size - 1`` with
    ``K = (vocab_size - 1) // 2``. Every pair's key is queried once, in a random order, at distinct
    positions of the query part (the ``seq_len - 2 num_pairs`` tokens after the pairs):

    - ``placement="uniform"``: every position of the query part equally likely;
    - ``placement="power_law"``: Zoology's placement, position ``g = 1, 2, ...`` of the query part
      drawn with probability proportional to ``power_a * g ** (power_a - 1)`` (``power_a = 0.01``:
      queries crowd right after the pairs, as a repeated bigram in text most often recurs soon),
      without replacement.
    """

    vocab_size: int = 64
    num_pairs: int = 4
    seq_len: int = 32
    placement: str = "uniform"
    power_a: float = 0.01

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
        check_choice(self.placement, "placement", PLACEMENTS)
        check_float(self.power_a, "power_a", min=0.0, max=1.0, min_open=True)

    def query_weights(self) -> torch.Tensor:
        """Unnormalised probability of each position of the query part to hold a query (float64)."""
        positions = torch.arange(1, self.seq_len - 2 * self.num_pairs + 1, dtype=torch.float64)
        if self.placement == "uniform":
            return torch.ones_like(positions)
        return self.power_a * positions ** (self.power_a - 1)


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
    # Queries: each pair once, in random order, at n distinct sorted positions after the pairs,
    # drawn without replacement with the task's weights (Gumbel top-n: the n largest of
    # log w + Gumbel noise are a weighted sample without replacement).
    order = torch.rand(B, n, generator=generator).argsort(-1)
    noise = torch.rand(B, T - 2 * n, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    scores = task.query_weights().log() - (-noise.log()).log()
    slots = scores.topk(n, dim=-1).indices.sort(-1).values + 2 * n
    rows = torch.arange(B)[:, None]
    inputs[rows, slots] = keys.gather(1, order)
    targets[rows, slots] = values.gather(1, order)
    return inputs, targets


def answer_distances(inputs: torch.Tensor, targets: torch.Tensor, task: MQARTask) -> torch.Tensor:
    """For every answer position (row-major, as ``targets != IGNORE`` selects them), how many tokens
    lie between the queried key's first occurrence among the pairs and the query: ``(answers,)`` long.
    """
    check_tensor(inputs, "inputs", ndim=2, dtype=torch.long)
    check_tensor(targets, "targets", ndim=2, dtype=torch.long)
    if inputs.shape != targets.shape:
        raise ValueError(
            f"targets must have the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}"
        )
    rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
    pair_keys = inputs[:, 0 : 2 * task.num_pairs : 2]  # (B, n): key i sits at position 2 i
    key_index = (pair_keys[rows] == inputs[rows, positions][:, None]).int().argmax(-1)
    return positions - 2 * key_index


def accuracy_by_distance(
    logits: torch.Tensor, targets: torch.Tensor, distances: torch.Tensor, edges: list[int]
) -> list[tuple[int, int, float | None]]:
    """Answer accuracy per distance bin ``[edges[i], edges[i + 1])``: ``(low, high, accuracy or None)``."""
    answers = targets != IGNORE
    correct = (logits.argmax(-1)[answers] == targets[answers]).float()
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (distances >= low) & (distances < high)
        bins.append((low, high, float(correct[inside].mean()) if inside.any() else None))
    return bins


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

# Every token mixer of the catalogue, but the compact forms of attention (MQA, GQA and MLA change
# only the size of the KV cache, so they recall exactly what attention recalls).
RECALL_MIXERS = tuple(m.name for m in catalogue.mechanisms(has="mixer") if m.family != "compact")
# What every recall model's mixer gets, where its layer takes the option: the short convolution,
# the chunk length of the chunk forms, and the window of sliding-window attention. (RWKV has no
# convolution: its token shift plays that part.)
RECALL_OPTIONS = {"conv_size": CONV_SIZE, "chunk_size": 32, "window": WINDOW}


def recall_options(mixer: str) -> dict:
    """The options of :data:`RECALL_OPTIONS` that the layer of ``mixer`` takes."""
    check_choice(mixer, "mixer", RECALL_MIXERS)
    parameters = inspect.signature(catalogue.get(mixer).mixer).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {key: value for key, value in RECALL_OPTIONS.items() if takes_any or key in parameters}


def recall_model(
    mixer: str, task: MQARTask, *, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> TinyTransformer:
    """A :class:`TinyTransformer` with ``mixer`` in every block and no positions.

    MQAR needs no absolute positions: order comes from the causal mask or the recurrence and the
    short convolution. Learned position embeddings only add noise to the key matching (softmax
    attention at T = 128 stayed near 0.1 accuracy after 600 steps with them and reached 0.99
    without), so the model is built with ``positions="none"``.
    """
    check_choice(mixer, "mixer", RECALL_MIXERS)
    if not isinstance(task, MQARTask):
        raise TypeError(f"task must be an MQARTask, got {type(task).__name__}")
    config = ModelConfig(
        vocab_size=task.vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        attention=mixer,
        positions="none",
        max_len=task.seq_len,
        mixer_options=recall_options(mixer),
    )
    model = TinyTransformer(config, seed=seed)
    # TinyTransformer's initialisation (normal, std 0.02, zero biases) would also zero the gate
    # biases the recurrent layers set on purpose and leave softmax attention's q.k scores on a
    # long plateau (hundreds of extra steps), so each mixer is rebuilt with its own initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in model.blocks:
            block.attention = build_mixer(config)
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

    Read off the catalogue at the geometry of the recall model's layer: the KV cache for softmax
    attention (of the last :data:`WINDOW` tokens for the sliding window), the recurrent state
    for the others (e.g. Mamba-2's ``H P N`` with inner width ``2 d_model`` and ``N = 16``).
    Short-convolution buffers (3 past inputs) are left out: they are small and equal.
    """
    check_choice(mixer, "mixer", RECALL_MIXERS)
    seq_len = check_int(seq_len, "seq_len", min=1)
    mechanism = catalogue.get(mixer)
    geometry = mechanism.layer_geometry(d_model, check_int(num_heads, "num_heads", min=1))
    per_layer = mechanism.state_bytes(seq_len, geometry, dtype=dtype, **recall_options(mixer))
    return per_layer * check_int(num_layers, "num_layers", min=1)


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
    mixers=RECALL_MIXERS,
    tasks=(MQARTask(64, 4, 32), MQARTask(64, 8, 64)),
    *,
    steps: int = 300,
    progress: bool = True,
    **options,
) -> list[dict]:
    """:func:`train_recall` for every mixer and task; the results without the models (JSON-ready)."""
    for mixer in mixers:
        check_choice(mixer, "mixers", RECALL_MIXERS)
    jobs = [(m, t) for t in tasks for m in mixers]
    rows = []
    for mixer, task in tqdm(jobs, desc="recall grid", disable=not progress):
        result = train_recall(mixer, task, steps=steps, progress=progress, **options)
        result.pop("model")
        result["final_loss"] = sum(result["losses"][-20:]) / len(result["losses"][-20:])
        result.pop("losses")
        rows.append(result)
    return rows
