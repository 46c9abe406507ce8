"""Decoding strategies: turning next-token logits into text.

A language model gives logits over the vocabulary for the next token. How we pick from them:
- greedy: always the most likely token (deterministic, can miss a better whole sequence);
- beam search: keep the ``num_beams`` best partial sequences by total log-probability;
- sampling: draw from the softmax, reshaped first by
  - temperature (divide logits by T: T < 1 sharpens, T > 1 flattens, T -> 0 is greedy),
  - top-k (keep the k most likely tokens),
  - top-p / nucleus (keep the smallest set of most likely tokens whose probability reaches p).

Filters return logits with the removed tokens set to ``-inf``, so they compose. Models enter as a
*step function*: ``step_fn(tokens (N, L) long) -> logits (N, V)`` for the token after each row
(a model with a KV cache can hide its cache inside that function). Randomness comes only from
an explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .checks import check_float, check_int, check_tensor

__all__ = [
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "filter_logits",
    "sample_next_token",
    "greedy_decode",
    "sample_decode",
    "beam_search",
]

StepFunction = Callable[[torch.Tensor], torch.Tensor]


def _check_logits(logits: object, name: str = "logits") -> torch.Tensor:
    """A floating ``(..., V)`` tensor of logits: finite or ``-inf`` (a token that cannot occur).

    NaN and ``+inf`` have no probability to give (softmax of them is NaN), so they are refused.
    """
    check_tensor(logits, name, floating=True)
    assert isinstance(logits, torch.Tensor)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"{name} must have a vocabulary as last dim (..., V), got shape {tuple(logits.shape)}"
        )
    if bool(torch.isnan(logits).any()):
        raise ValueError(f"{name} must not contain NaN")
    if bool(torch.isposinf(logits).any()):
        raise ValueError(f"{name} must not contain +inf (use a large finite logit to force a token)")
    return logits


def _check_some_token_possible(logits: torch.Tensor, name: str = "logits") -> None:
    """Every row must leave at least one token with nonzero probability, or nothing can be drawn."""
    impossible = torch.isneginf(logits).all(dim=-1).flatten()
    if bool(impossible.any()):
        row = int(impossible.nonzero()[0])
        raise ValueError(
            f"{name} row {row} is -inf for every token: no token has nonzero probability "
            f"({int(impossible.sum())} such rows)"
        )


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (temperature > 0); softmax of the result is sharper for T < 1."""
    _check_logits(logits)
    temperature = check_float(temperature, "temperature", min=0.0, min_open=True)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of the last dim; the rest become ``-inf``.

    Ties at the k-th value are broken by ``torch.topk`` (one of the tied tokens is kept), so
    exactly k tokens always survive.
    """
    _check_logits(logits)
    k = check_int(k, "k", min=1, max=logits.shape[-1])
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~kept, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sum reaches ``p``.

    Tokens are sorted by probability; a token is kept when the probability of the tokens before
    it is still below ``p``, so the most likely token is always kept and ``p = 1`` keeps every
    token whose logit is not ``-inf``. The masses are summed in float64, so a tail token is not
    dropped because the running sum rounded up to ``p``. Removed tokens become ``-inf``.
    """
    _check_logits(logits)
    p = check_float(p, "p", min=0.0, max=1.0, min_open=True)
    if p == 1.0:
        # Every token that can occur: the cumulative sum would round the tail's mass up to 1.
        return logits.clone()
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probabilities = torch.softmax(sorted_logits.to(torch.float64), dim=-1)
    mass_before = probabilities.cumsum(dim=-1) - probabilities
    kept_sorted = mass_before < p
    kept_sorted[..., 0] = True
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return logits.masked_fill(~kept, float("-inf"))


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order common libraries use)."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next_token(
    logits: torch.Tensor,
    *,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits (B, V)`` -> ``(B,)`` long, using ``generator``.

    ``temperature=0`` means greedy (argmax, no randomness used). Every row needs a token whose
    logit is not ``-inf``; NaN and ``+inf`` logits are refused (``ValueError`` naming ``logits``).
    """
    _check_logits(logits)
    check_tensor(logits, "logits", ndim=2)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    temperature = check_float(temperature, "temperature", min=0.0)
    _check_some_token_possible(logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if generator.device.type != logits.device.type:
        raise ValueError(
            f"generator must be on the device of logits ({logits.device}), got {generator.device}"
        )
    # Filter in float64: a small temperature cannot overflow a finite logit to +inf there.
    filtered = filter_logits(logits.to(torch.float64), temperature=temperature, top_k=top_k, top_p=top_p)
    probabilities = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def _check_prompt(prompt: object) -> tuple[torch.Tensor, bool]:
    check_tensor(prompt, "prompt", ndim=(1, 2), dtype=torch.long)
    assert isinstance(prompt, torch.Tensor)
    if prompt.shape[-1] < 1:
        raise ValueError(f"prompt must hold at least one token, got shape {tuple(prompt.shape)}")
    return (prompt.unsqueeze(0), True) if prompt.dim() == 1 else (prompt, False)


def _call_step(step_fn: StepFunction, tokens: torch.Tensor, eos_token_id: int | None = None) -> torch.Tensor:
    logits = step_fn(tokens)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != tokens.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"step_fn must return logits of shape (N={tokens.shape[0]}, V), got {shape}")
    _check_logits(logits, "step_fn logits")
    if eos_token_id is not None and eos_token_id >= logits.shape[-1]:
        raise ValueError(f"eos_token_id={eos_token_id} must be < the vocabulary size V={logits.shape[-1]}")
    return logits


def _decode(step_fn, prompt, max_new_tokens, eos_token_id, choose) -> torch.Tensor:
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    tokens, was_1d = _check_prompt(prompt)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", min=0)
    if eos_token_id is not None:
        eos_token_id = check_int(eos_token_id, "eos_token_id", min=0)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = _call_step(step_fn, tokens, eos_token_id)
        # A row with no possible token has nothing to choose (argmax would pick token 0 silently).
        _check_some_token_possible(logits, "step_fn logits")
        next_token = choose(logits)
        if eos_token_id is not None:
            # A finished row keeps emitting eos, so all rows keep one length.
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token.unsqueeze(-1)], dim=-1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens.squeeze(0) if was_1d else tokens


def greedy_decode(
    step_fn: StepFunction, prompt: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None
) -> torch.Tensor:
    """Append the argmax token ``max_new_tokens`` times (or until every row emitted ``eos_token_id``).

    ``prompt`` is ``(B, L)`` or ``(L,)`` long; returns the prompt followed by the new tokens.
    """
    return _decode(step_fn, prompt, max_new_tokens, eos_token_id, lambda logits: logits.argmax(dim=-1))


def sample_decode(
    step_fn: StepFunction,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens with temperature / top-k / top-p, reproducibly.

    Pass either a ``generator`` or a ``seed`` (a fresh generator is seeded with it).
    """
    if generator is None:
        if seed is None:
            raise ValueError("seed or generator must be given (sampling uses no global random state)")
        generator = torch.Generator(device=prompt.device if isinstance(prompt, torch.Tensor) else "cpu")
        generator.manual_seed(check_int(seed, "seed"))

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(
            logits, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p
        )

    return _decode(step_fn, prompt, max_new_tokens, eos_token_id, choose)


def beam_search(
    step_fn: StepFunction,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Beam search for one prompt ``(L,)``; returns ``(tokens (L + n,), score)`` of the best hypothesis.

    Each step extends every live beam by every token, scores candidates by the sum of their
    log-probabilities, and keeps the ``num_beams`` best. Length handling: a candidate ending in
    ``eos_token_id`` is moved to the finished list (eos counted as a generated token); beams
    still alive after ``max_new_tokens`` steps are finished there too. Finished hypotheses are
    compared by ``sum log p / n ** length_penalty`` with ``n`` generated tokens: 0 compares raw
    sums (which favour short outputs), 1 compares the mean log-probability per token.
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    check_tensor(prompt, "prompt", ndim=1, dtype=torch.long)
    if prompt.shape[0] < 1:
        raise ValueError("prompt must hold at least one token")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", min=1)
    num_beams = check_int(num_beams, "num_beams", min=1)
    length_penalty = check_float(length_penalty, "length_penalty")
    if eos_token_id is not None:
        eos_token_id = check_int(eos_token_id, "eos_token_id", min=0)

    def normalised(score: float, generated: int) -> float:
        return score / generated**length_penalty

    beams = prompt.unsqueeze(0)  # (N, L): live beams share one length
    beam_scores = torch.zeros(1, dtype=torch.float64, device=prompt.device)
    finished: list[tuple[float, torch.Tensor]] = []
    for step in range(1, max_new_tokens + 1):
        logits = _call_step(step_fn, beams, eos_token_id).to(torch.float64)
        # A beam whose every continuation is -inf is dead: -inf everywhere, not log_softmax's NaN.
        dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
        log_probs = torch.log_softmax(logits, dim=-1).masked_fill(dead, float("-inf"))  # (N, V)
        vocabulary = log_probs.shape[-1]
        candidates = (beam_scores[:, None] + log_probs).flatten()
        # Twice the beams, so num_beams live candidates remain even if some end in eos.
        top_scores, top_indices = candidates.topk(min(2 * num_beams, candidates.numel()))
        next_beams, next_scores = [], []
        for score, index in zip(top_scores.tolist(), top_indices.tolist(), strict=True):
            if score == float("-inf"):
                break
            parent, token = divmod(index, vocabulary)
            extended = torch.cat([beams[parent], beams.new_tensor([token])])
            if eos_token_id is not None and token == eos_token_id:
                finished.append((normalised(score, step), extended))
            else:
                next_beams.append(extended)
                next_scores.append(score)
            if len(next_beams) == num_beams:
                break
        if not next_beams:
            break
        beams = torch.stack(next_beams)
        beam_scores = torch.tensor(next_scores, dtype=torch.float64, device=prompt.device)
    else:
        finished.extend(
            (normalised(s, max_new_tokens), b) for s, b in zip(beam_scores.tolist(), beams, strict=True)
        )
    if not finished:
        raise ValueError("step_fn gave every continuation probability 0 (all logits -inf)")
    best_score, best_tokens = max(finished, key=lambda item: item[0])
    return best_tokens, best_score
