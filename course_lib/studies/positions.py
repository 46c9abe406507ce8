"""Chapter 01's "train short, test long": the six position schemes on the same tiny language model.

Press, Smith and Lewis (2022) trained the same model with different position schemes on short
windows and measured the loss on longer ones. This study does the same at the course's scale:
a character-level model of the course corpus (:mod:`course_lib.models.corpus`), ``num_layers``
pre-norm blocks of causal multi-head attention and an MLP, identical except for how positions
enter:

- ``"sinusoidal"`` and ``"learned absolute"``: a vector added to each token's embedding (a
  learned table has no row past ``max_len``, so the model cannot run longer: its loss there is
  ``None``);
- ``"RoPE"``: queries and keys rotated by their positions (:func:`course_lib.standard.apply_rope`);
- ``"ALiBi"``: ``-slope_h |i - j|`` added to the scores (:func:`course_lib.standard.alibi_bias`);
- ``"T5 buckets"``: a learned scalar per head and causal distance bucket
  (:class:`course_lib.relative_positions.T5RelativeBias`);
- ``"Shaw"``: learned vectors per clipped distance on keys and values
  (:class:`course_lib.relative_positions.ShawRelativePositions`).

:func:`position_extrapolation` trains one model per scheme for the same steps on the same seeded
batches and returns the held-out loss at each evaluation length. Everything is seeded; the
numbers depend only on the machine's float arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_float, check_int, check_tensor
from ..models.corpus import VOCAB, corpus_split, get_batch
from ..relative_positions import ShawRelativePositions, T5RelativeBias
from ..standard import alibi_bias, apply_rope, attention, sinusoidal_positions

__all__ = [
    "SCHEMES",
    "PositionAttention",
    "PositionLM",
    "ExtrapolationResult",
    "position_extrapolation",
]

SCHEMES = ("sinusoidal", "learned absolute", "RoPE", "ALiBi", "T5 buckets", "Shaw")
_ABSOLUTE = ("sinusoidal", "learned absolute")


class PositionAttention(nn.Module):
    """Causal multi-head self-attention whose scores carry one relative scheme (or none).

    ``scheme``: one of :data:`SCHEMES`; the absolute ones add nothing here (the model adds
    them to the input). ``max_distance``: Shaw's clipping distance and T5's ``max_distance``
    (from it on, every distance shares T5's last bucket); ``num_buckets``: T5's buckets (causal,
    so all of them serve keys before the query).
    """

    def __init__(
        self, d_model: int, num_heads: int, scheme: str, *, max_distance: int = 16, num_buckets: int = 16
    ) -> None:
        super().__init__()
        self.scheme = check_choice(scheme, "scheme", SCHEMES)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.t5 = self.shaw = None
        if scheme == "T5 buckets":
            self.t5 = T5RelativeBias(
                num_heads, num_buckets=num_buckets, max_distance=max_distance, bidirectional=False
            )
        elif scheme == "Shaw":
            self.shaw = ShawRelativePositions(self.head_dim, max_distance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, width = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.scheme == "Shaw":
            out = self.shaw(q, k, v, causal=True)
        else:
            bias = None
            if self.scheme == "RoPE":
                q, k = apply_rope(q), apply_rope(k)
            elif self.scheme == "ALiBi":
                bias = alibi_bias(self.num_heads, T).to(x.device, x.dtype)
            elif self.scheme == "T5 buckets":
                bias = self.t5(T)
            out = attention(q, k, v, causal=True, bias=bias)
        return self.out(out.transpose(1, 2).reshape(B, T, width))


class PositionLM(nn.Module):
    """A tiny character model with one position scheme: ``tokens (B, T) -> logits (B, T, vocab)``.

    Token embedding (plus the absolute positions for "sinusoidal" and "learned absolute"),
    ``num_layers`` pre-norm blocks ``x + attention(norm(x))``, ``x + mlp(norm(x))``, a final norm
    and a head tied to the embedding. ``max_len``: rows of the learned table (longer inputs raise
    ``ValueError``); the other schemes run at any length.
    """

    def __init__(
        self,
        scheme: str,
        *,
        vocab_size: int = len(VOCAB),
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        max_len: int = 32,
        max_distance: int = 16,
        num_buckets: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.scheme = check_choice(scheme, "scheme", SCHEMES)
        self.d_model = check_int(d_model, "d_model", min=2)
        self.max_len = check_int(max_len, "max_len", min=1)
        check_int(num_layers, "num_layers", min=1)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(check_int(seed, "seed"))
            self.embedding = nn.Embedding(check_int(vocab_size, "vocab_size", min=1), d_model)
            self.positions = nn.Embedding(max_len, d_model) if scheme == "learned absolute" else None
            self.blocks = nn.ModuleList(
                nn.ModuleDict(
                    {
                        "attention_norm": nn.LayerNorm(d_model),
                        "attention": PositionAttention(
                            d_model, num_heads, scheme, max_distance=max_distance, num_buckets=num_buckets
                        ),
                        "mlp_norm": nn.LayerNorm(d_model),
                        "mlp": nn.Sequential(
                            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
                        ),
                    }
                )
                for _ in range(num_layers)
            )
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            # Token vectors (and a learned table) start at unit scale, like the sinusoids they meet.
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def position_parameters(self) -> int:
        """The learned numbers that encode positions (absolute table, T5 tables, Shaw tables)."""
        modules = [self.positions] + [block["attention"].t5 for block in self.blocks]
        modules += [block["attention"].shaw for block in self.blocks]
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
        T = tokens.shape[1]
        x = self.embedding(tokens)
        if self.scheme == "learned absolute":
            if T > self.max_len:
                raise ValueError(f"tokens has T={T} positions; the learned table has max_len={self.max_len}")
            x = x + self.positions.weight[:T]
        elif self.scheme == "sinusoidal":
            x = x + sinusoidal_positions(T, self.d_model).to(x.device, x.dtype)
        for block in self.blocks:
            x = x + block["attention"](block["attention_norm"](x))
            x = x + block["mlp"](block["mlp_norm"](x))
        return self.head(self.norm(x))


def _loss(model: PositionLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def _held_out_loss(
    model: PositionLM, held_out: torch.Tensor, length: int, eval_tokens: int, batch_size: int
) -> torch.Tensor:
    """Mean loss at each position ``(length,)`` over the first ``eval_tokens`` held-out characters
    cut into windows of ``length``: every length predicts the same characters."""
    windows = max(eval_tokens // length, 1)
    if windows * length + 1 > held_out.shape[0]:
        raise ValueError(f"eval_tokens={eval_tokens} exceeds the held-out text at length {length}")
    inputs = held_out[: windows * length].view(windows, length)
    targets = held_out[1 : windows * length + 1].view(windows, length)
    total = torch.zeros(length)
    for start in range(0, windows, batch_size):
        logits = model(inputs[start : start + batch_size])
        losses = F.cross_entropy(
            logits.transpose(1, 2), targets[start : start + batch_size], reduction="none"
        )
        total += losses.sum(0)
    return total / windows


@dataclass
class ExtrapolationResult:
    """Held-out loss (nats per character) of each scheme at each evaluation length.

    ``losses[scheme][i]``: the mean loss over the same held-out characters cut into windows of
    ``eval_lengths[i]`` (None where the model cannot run). ``position_losses[scheme]``: the loss
    at each position of the longest windows (where a scheme breaks, it breaks past
    ``train_length``). ``position_parameters[scheme]``: learned numbers that encode positions,
    all layers. ``final_train_loss``: the mean of the last 10 training steps.
    """

    train_length: int
    eval_lengths: list[int]
    steps: int
    losses: dict[str, list[float | None]] = field(default_factory=dict)
    position_losses: dict[str, list[float]] = field(default_factory=dict)
    position_parameters: dict[str, int] = field(default_factory=dict)
    final_train_loss: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The losses as a text table, one row per scheme."""
        header = f"{'scheme':<18}{'position params':>16}" + "".join(
            f"{'T=' + str(L):>9}" for L in self.eval_lengths
        )
        rows = [header]
        for scheme, losses in self.losses.items():
            cells = "".join(f"{'-' if x is None else format(x, '.3f'):>9}" for x in losses)
            rows.append(f"{scheme:<18}{self.position_parameters[scheme]:>16}{cells}")
        return "\n".join(rows)


def position_extrapolation(
    schemes: Sequence[str] = SCHEMES,
    *,
    train_length: int = 32,
    eval_lengths: Sequence[int] = (32, 64, 128, 256),
    steps: int = 200,
    batch_size: int = 16,
    d_model: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    max_distance: int = 16,
    num_buckets: int = 16,
    lr: float = 1e-2,
    eval_tokens: int = 4096,
    seed: int = 0,
) -> ExtrapolationResult:
    """Train one :class:`PositionLM` per scheme on windows of ``train_length``, evaluate longer.

    Every model sees the same seeded training batches (AdamW, ``lr`` warmed up over 10 steps and
    decayed with a cosine to a tenth), then predicts the first ``eval_tokens`` held-out
    characters cut into windows of each evaluation length.
    """
    schemes = [check_choice(s, "schemes", SCHEMES) for s in schemes]
    if not schemes:
        raise ValueError("schemes must name at least one scheme")
    train_length = check_int(train_length, "train_length", min=2)
    eval_lengths = [check_int(L, "eval_lengths", min=1) for L in eval_lengths]
    steps = check_int(steps, "steps", min=1)
    check_int(batch_size, "batch_size", min=1)
    lr = check_float(lr, "lr", min=0.0, min_open=True)
    eval_tokens = check_int(eval_tokens, "eval_tokens", min=1)
    train_tokens, held_out = corpus_split()
    result = ExtrapolationResult(train_length, eval_lengths, steps)
    warmup = min(10, steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    for scheme in schemes:
        model = PositionLM(
            scheme, d_model=d_model, num_layers=num_layers, num_heads=num_heads, max_len=train_length,
            max_distance=max_distance, num_buckets=num_buckets, seed=seed,
        )  # fmt: skip
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        model.train()
        for _ in range(steps):
            inputs, targets = get_batch(train_tokens, batch_size, train_length, generator=generator)
            loss = _loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        model.eval()
        evaluated: list[float | None] = []
        for length in eval_lengths:
            if scheme == "learned absolute" and length > train_length:
                evaluated.append(None)
                continue
            per_position = _held_out_loss(model, held_out, length, eval_tokens, batch_size)
            evaluated.append(float(per_position.mean()))
            if length == max(eval_lengths):
                result.position_losses[scheme] = per_position.tolist()
        result.losses[scheme] = evaluated
        result.position_parameters[scheme] = model.position_parameters()
        result.final_train_loss[scheme] = sum(losses[-10:]) / len(losses[-10:])
    return result
