"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small model drafts, the big one checks.

Decoding is memory-bound: one step reads every weight and the whole KV cache to produce a single
token, so feeding the target model ``k + 1`` tokens costs about as much as feeding it one
(chapter 02's roofline: more tokens per read raise the arithmetic intensity of the step). A cheap
**draft** model of the same vocabulary proposes ``k`` tokens one by one; the **target** scores all
of them in one forward through its KV cache and keeps a prefix:

- drafted token ``x`` (drawn from the draft's ``q``) is accepted with probability
  ``min(1, p(x) / q(x))``, where ``p`` is the target's distribution at that position;
- at the first rejection, the next token is drawn from the *residual* ``max(0, p - q)``,
  normalised, and the rest of the draft is dropped;
- if all ``k`` are accepted, one bonus token is drawn from the target's next distribution.

Every emitted token then follows the target's distribution exactly (the residual is what ``p``
puts where ``q`` falls short); resampling from ``p`` instead is the classic bug, and the tests
show that a statistical test catches it. Greedy decoding is the limit of one-hot distributions:
accept while the draft equals the target's argmax, then emit the target's argmax, so the output
is the target's own greedy output. Rejected tokens' keys and values are rolled back from both
caches with :meth:`PagedModelCache.truncate`.

The draft here is a one-layer model trained briefly on the course corpus
(:func:`load_draft_model`, stored in ``course_lib/data``), or the target's first layers
(:func:`truncated_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checks import check_float, check_generator, check_int
from ..models import VOCAB, ModelConfig, TinyTransformer, corpus_split, evaluate_loss, train
from .paged_cache import PagedModelCache, _attention_of, _token_list
from .runner import paged_forward

__all__ = [
    "residual_distribution",
    "verify_draft",
    "verify_draft_greedy",
    "speculative_decode",
    "truncated_model",
    "draft_model_config",
    "DRAFT_TRAINING",
    "DRAFT_MODEL_PATH",
    "make_draft_model",
    "load_draft_model",
]


# --- the acceptance rule --------------------------------------------------------------------------


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised over the last dim: where to draw from after a rejection.

    A rejection has probability ``sum(max(0, q - p)) = sum(max(0, p - q))``, so the residual is
    never empty when a rejection can happen; if ``p == q`` it is (numerically) empty and ``p`` is
    returned.
    """
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(p.dtype).tiny), p)


def verify_draft(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator,
    num_drafted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule for B drafts at once: how many drafted tokens to keep, and the next token.

    Args:
        draft_tokens: ``(B, k)`` long, the drafted tokens.
        draft_probs: ``(B, k, V)``, the draft's distribution each token was drawn from.
        target_probs: ``(B, k + 1, V)``, the target's distribution at each drafted position and one
            more (for the bonus token).
        generator: the source of the acceptance draws and of the emitted token.
        num_drafted: ``(B,)`` long, how many of the ``k`` drafts are real in each row (default all);
            positions past it are ignored, and a row that keeps all its drafts gets the bonus token.

    Returns ``(accepted (B,), next_token (B,))``: the row keeps ``draft_tokens[:accepted]`` and
    then emits ``next_token`` (from the residual after a rejection, from ``p`` otherwise).
    """
    B, k = draft_tokens.shape
    rows = torch.arange(B, device=draft_tokens.device)
    if num_drafted is None:
        num_drafted = torch.full((B,), k, dtype=torch.long, device=draft_tokens.device)
    if k == 0:
        accepted = torch.zeros(B, dtype=torch.long, device=draft_tokens.device)
        return accepted, torch.multinomial(target_probs[:, 0], 1, generator=generator)[:, 0]
    p = target_probs[:, :k].gather(-1, draft_tokens[..., None])[..., 0]  # (B, k): p(x_i)
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]  # (B, k): q(x_i) > 0, x_i was drawn from q
    u = torch.rand(B, k, generator=generator, dtype=p.dtype, device=p.device)
    real = torch.arange(k, device=p.device) < num_drafted[:, None]
    accept = (u * q < p) & real  # u < p / q, without dividing
    accepted = accept.long().cumprod(-1).sum(-1)  # the leading run of acceptances
    p_next = target_probs[rows, accepted]
    q_next = draft_probs[rows, accepted.clamp(max=k - 1)]
    rejected = (accepted < num_drafted)[:, None]
    distribution = torch.where(rejected, residual_distribution(p_next, q_next), p_next)
    return accepted, torch.multinomial(distribution, 1, generator=generator)[:, 0]


def verify_draft_greedy(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, *, num_drafted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule with one-hot distributions: keep drafts while they equal the target's argmax.

    ``draft_tokens (B, k)``, ``target_logits (B, k + 1, V)``; returns ``(accepted, next_token)``
    with ``next_token`` the target's argmax after the kept drafts.
    """
    B, k = draft_tokens.shape
    best = target_logits.argmax(-1)  # (B, k + 1)
    if num_drafted is None:
        num_drafted = torch.full((B,), k, dtype=torch.long, device=draft_tokens.device)
    real = torch.arange(k, device=best.device) < num_drafted[:, None]
    accepted = ((draft_tokens == best[:, :k]) & real).long().cumprod(-1).sum(-1)
    return accepted, best[torch.arange(B, device=best.device), accepted]


# --- decoding -------------------------------------------------------------------------------------


def speculative_decode(
    target: TinyTransformer,
    draft: TinyTransformer,
    prompts: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    k: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    block_size: int = 16,
) -> tuple[list[list[int]], dict]:
    """Generate ``max_new_tokens`` tokens for each prompt with ``draft`` proposing ``k`` at a time.

    ``prompts`` is one prompt (a 1-D long tensor or a list of ints) or several (a list of them, or
    a 2-D tensor); all are decoded together, each at its own pace, through two paged caches.
    ``temperature=0`` is greedy (the output is ``target``'s own greedy output); otherwise both
    models sample at ``temperature`` (pass ``generator`` or ``seed``). ``k=0`` is plain decoding
    with the target alone (one target forward per token). Near the end a row drafts fewer tokens
    so that it never overshoots ``max_new_tokens``.

    Returns ``(outputs, stats)``: the new tokens of each prompt, and ``drafted``, ``accepted``,
    ``acceptance_rate`` (accepted / drafted), ``resampled`` (rounds that ended with a rejection),
    ``bonus`` (rounds whose drafts were all accepted), ``target_forwards`` and ``draft_forwards``
    (batched calls), ``rounds`` (summed over rows) and ``tokens_per_round`` (tokens emitted per
    target forward of a row: 1 for plain decoding, up to ``k + 1``).
    """
    _attention_of(target, "target")
    _attention_of(draft, "draft")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft has vocab_size={draft.config.vocab_size}, the target {target.config.vocab_size}: "
            "the draft must propose tokens of the target's vocabulary"
        )
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts] if prompts.dim() == 1 else list(prompts)
    elif isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], (Sequence, torch.Tensor)):
        prompts = [prompts]
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be one prompt or a non-empty sequence of prompts")
    prompts = [_token_list(p, "prompts") for p in prompts]
    vocab_size = target.config.vocab_size
    if any(not p or max(p) >= vocab_size for p in prompts):
        raise ValueError(f"prompts must each hold at least one token in 0 .. vocab_size-1 = {vocab_size - 1}")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", min=1)
    k = check_int(k, "k", min=0)
    temperature = check_float(temperature, "temperature", min=0.0)
    block_size = check_int(block_size, "block_size", min=1)
    for name, model in (("target", target), ("draft", draft)):
        longest = max(len(p) for p in prompts) + max_new_tokens - 1
        if model.config.positions == "learned" and longest > model.config.max_len:
            raise ValueError(f"{name} has max_len={model.config.max_len}, the longest row needs {longest}")
    greedy = temperature == 0
    if not greedy:
        generator = check_generator(generator, seed)

    # Each row stores at most its prompt plus max_new_tokens - 1 tokens in either cache: this always fits.
    num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    caches = {
        "target": PagedModelCache.for_model(target, num_blocks=num_blocks, block_size=block_size),
        "draft": PagedModelCache.for_model(draft, num_blocks=num_blocks, block_size=block_size),
    }
    tokens = [list(p) for p in prompts]
    remaining = [max_new_tokens] * len(prompts)
    for row in range(len(prompts)):
        caches["target"].add_sequence(row)
        caches["draft"].add_sequence(row)
    stats = dict.fromkeys(("drafted", "accepted", "resampled", "bonus", "rounds"), 0)
    stats |= {"target_forwards": 0, "draft_forwards": 0}

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.to(torch.float64) / temperature, dim=-1)

    active = list(range(len(prompts)))
    while active:
        # Draft: each row proposes up to k tokens, one batched draft forward per position.
        k_row = {row: min(k, remaining[row] - 1) for row in active}
        drafts = {row: [] for row in active}
        draft_dists = {row: [] for row in active}
        for j in range(max(k_row.values())):
            group = [row for row in active if k_row[row] > j]
            cache = caches["draft"]
            batch = [(row, (tokens[row] + drafts[row])[cache.length(row) :]) for row in group]
            # The rule runs on the CPU (with the CPU generator), whatever device the models use.
            last = torch.stack([logits[-1] for logits in paged_forward(draft, cache, batch)]).cpu()
            stats["draft_forwards"] += 1
            if greedy:
                proposed = last.argmax(-1)
            else:
                q = probabilities(last)
                proposed = torch.multinomial(q, 1, generator=generator)[:, 0]
            for i, row in enumerate(group):
                drafts[row].append(int(proposed[i]))
                if not greedy:
                    draft_dists[row].append(q[i])
        # Verify: one target forward over each row's unseen tokens and its drafts.
        cache = caches["target"]
        batch = [(row, (tokens[row] + drafts[row])[cache.length(row) :]) for row in active]
        outputs = [logits.cpu() for logits in paged_forward(target, cache, batch)]
        stats["target_forwards"] += 1
        width = max(k_row.values())
        drafted = torch.tensor([k_row[row] for row in active], dtype=torch.long)
        padded_drafts = torch.tensor(
            [drafts[row] + [0] * (width - k_row[row]) for row in active], dtype=torch.long
        )
        # The last k_row + 1 rows of each output score the drafts and the position after them.
        scores = torch.stack(
            [
                torch.cat([logits[-(k_row[row] + 1) :], logits[-1:].expand(width - k_row[row], -1)])
                for row, logits in zip(active, outputs)
            ]
        )
        if greedy:
            accepted, following = verify_draft_greedy(padded_drafts, scores, num_drafted=drafted)
        else:
            uniform = torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64)
            if width:  # rows that drafted fewer than width tokens are padded (those positions are ignored)
                q = torch.stack(
                    [torch.stack(draft_dists[row] + [uniform] * (width - k_row[row])) for row in active]
                )
            else:
                q = torch.zeros(len(active), 0, vocab_size, dtype=torch.float64)
            accepted, following = verify_draft(
                padded_drafts, q, probabilities(scores), generator=generator, num_drafted=drafted
            )
        # Keep the accepted drafts and the next token; roll both caches back past the kept tokens.
        still_active = []
        for i, row in enumerate(active):
            kept = int(accepted[i])
            tokens[row] += drafts[row][:kept] + [int(following[i])]
            remaining[row] -= kept + 1
            stats["drafted"] += k_row[row]
            stats["accepted"] += kept
            stats["resampled"] += kept < k_row[row]
            stats["bonus"] += 0 < k_row[row] == kept
            stats["rounds"] += 1
            for cache in caches.values():  # the newest token is emitted, not yet fed
                cache.truncate(row, min(cache.length(row), len(tokens[row]) - 1))
            if remaining[row]:
                still_active.append(row)
            else:
                caches["target"].free(row)
                caches["draft"].free(row)
        active = still_active
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else float("nan")
    stats["tokens_per_round"] = len(prompts) * max_new_tokens / stats["rounds"]
    return [t[len(p) :] for t, p in zip(tokens, prompts)], stats


# --- draft models ---------------------------------------------------------------------------------


def truncated_model(model: TinyTransformer, num_layers: int) -> TinyTransformer:
    """A copy of ``model`` keeping only its first ``num_layers`` blocks (same embedding, norm and head).

    A free draft (no training): the first layers already carry much of the prediction.
    """
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    num_layers = check_int(num_layers, "num_layers", min=1, max=model.config.num_layers)
    kv_share = min(model.config.kv_share, num_layers)  # a group cut short keeps its owner
    config = ModelConfig(**{**vars(model.config), "num_layers": num_layers, "kv_share": kv_share})
    parameter = next(model.parameters())
    small = TinyTransformer(config).to(dtype=parameter.dtype, device=parameter.device)
    state = {
        name: value
        for name, value in model.state_dict().items()
        if not name.startswith("blocks.") or int(name.split(".")[1]) < num_layers
    }
    small.load_state_dict(state)
    return small.eval().requires_grad_(False)


DRAFT_MODEL_PATH = Path(__file__).resolve().parent.parent / "data" / "draft_model.pt"
# How the shipped draft was trained: `python -m course_lib.serving.speculative --make-draft-model`.
DRAFT_TRAINING = {"steps": 600, "batch_size": 16, "context": 64, "lr": 3e-3, "seed": 0}


def draft_model_config() -> ModelConfig:
    """The draft's shape: one layer, d_model 32, 2 heads, RoPE, the course's 49-character vocabulary."""
    return ModelConfig(
        vocab_size=len(VOCAB),
        d_model=32,
        num_layers=1,
        num_heads=2,
        attention="mha",
        positions="rope",
        max_len=320,
    )


def make_draft_model(path: str | Path | None = DRAFT_MODEL_PATH, *, progress: bool = True) -> TinyTransformer:
    """Train the draft with :data:`DRAFT_TRAINING` on the corpus and save it to ``path`` (None: don't).

    Deterministic for a given machine and PyTorch version; about ten seconds on one CPU core.
    """
    train_tokens, held_out = corpus_split()
    model = TinyTransformer(draft_model_config(), seed=DRAFT_TRAINING["seed"])
    train(model, train_tokens, progress=progress, **DRAFT_TRAINING)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "training": dict(DRAFT_TRAINING),
                "held_out_loss": evaluate_loss(model, held_out),
                "torch_version": str(torch.__version__),
            },
            path,
        )
    return model


@functools.cache
def _load_draft_model(path: str) -> TinyTransformer:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no weights at {path}: run `python -m course_lib.serving.speculative --make-draft-model`"
        )
    saved = torch.load(path, weights_only=True)
    model = TinyTransformer(draft_model_config())
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False)


def load_draft_model(path: str | Path = DRAFT_MODEL_PATH) -> TinyTransformer:
    """The shipped draft model, loaded once per process (shared: ``copy.deepcopy`` it before changing it)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return _load_draft_model(str(Path(path).resolve()))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the draft model shipped with course_lib.")
    parser.add_argument("--make-draft-model", action="store_true", help="train the speculative draft")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    arguments = parser.parse_args()
    if not arguments.make_draft_model:
        parser.error("nothing to do: pass --make-draft-model")
    torch.set_num_threads(arguments.threads)
    # The package's own module (not this __main__ copy), so the saved model is the library's class.
    from course_lib.serving.speculative import DRAFT_MODEL_PATH as target_path
    from course_lib.serving.speculative import make_draft_model as make

    make(target_path)
    print(f"saved {target_path} ({target_path.stat().st_size / 1024:.0f} KiB)")
