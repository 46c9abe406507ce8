"""Tests for course_lib.decoding: filters vs plain-Python references, samplers, greedy and beam search."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from course_lib.decoding import (
    apply_temperature,
    beam_search,
    filter_logits,
    greedy_decode,
    sample_decode,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

# --- references -----------------------------------------------------------------------------


def kept_top_k(values, k):
    """Indices of the k largest values (distinct values), by sorting a Python list."""
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def kept_top_p(values, p):
    """Walk tokens from most to least likely, adding each while the mass so far is below p."""
    peak = max(values)
    weights = [math.exp(x - peak) for x in values]
    total = sum(weights)
    kept, mass = set(), 0.0
    for index in sorted(range(len(values)), key=lambda i: -values[i]):
        if mass >= p:
            break
        kept.add(index)
        mass += weights[index] / total
    return kept


def kept(filtered):
    return set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())


distinct_logits = st.lists(
    st.floats(-8, 8, allow_nan=False, allow_infinity=False), min_size=1, max_size=12, unique=True
)


# --- filters ---------------------------------------------------------------------------------


@given(values=distinct_logits, data=st.data())
def test_top_k_keeps_exactly_the_k_largest(values, data):
    k = data.draw(st.integers(1, len(values)))
    filtered = top_k_filter(torch.tensor(values, dtype=torch.float64), k)
    assert kept(filtered) == kept_top_k(values, k)
    survivors = list(kept_top_k(values, k))
    assert torch.equal(filtered[survivors], torch.tensor(values, dtype=torch.float64)[survivors])


@given(values=distinct_logits, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_nucleus(values, p):
    filtered = top_p_filter(torch.tensor(values, dtype=torch.float64), p)
    expected = kept_top_p(values, p)
    # Skip draws where the mass lands within rounding of p (the two sums could disagree there).
    probabilities = torch.softmax(torch.tensor(values, dtype=torch.float64), 0)
    boundary = probabilities.sort(descending=True).values.cumsum(0)
    if (boundary - p).abs().min() > 1e-9:
        assert kept(filtered) == expected


def test_top_p_hand_example():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log()
    assert kept(top_p_filter(logits, 0.5)) == {0}  # the top token alone reaches 0.5
    assert kept(top_p_filter(logits, 0.6)) == {0, 1}
    assert kept(top_p_filter(logits, 0.9)) == {0, 1, 2}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 0.01)) == {0}


def test_filters_work_row_wise_on_batches():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 1.0, 5.0]])
    filtered = top_k_filter(logits, 2)
    assert kept(filtered[0]) == {1, 2} and kept(filtered[1]) == {0, 3}
    nucleus = top_p_filter(torch.tensor([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0]]), 0.9)
    assert kept(nucleus[0]) == {2} and kept(nucleus[1]) == {0}


def test_top_k_with_ties_keeps_exactly_k():
    assert len(kept(top_k_filter(torch.zeros(6), 4))) == 4


def test_temperature_matches_manual_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    for temperature in (0.5, 1.0, 3.0):
        weights = [math.exp(x / temperature) for x in logits.tolist()]
        expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
        torch.testing.assert_close(torch.softmax(apply_temperature(logits, temperature), 0), expected)
    assert torch.softmax(apply_temperature(logits, 0.01), 0)[0] > 0.999


def test_filter_logits_applies_temperature_then_top_k_then_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    # Top-k keeps 3 tokens; top-p 0.99 at temperature 0.1 then keeps only the first (it has ~99.995%).
    assert kept(filter_logits(logits, temperature=0.1, top_k=3, top_p=0.99)) == {0}
    assert kept(filter_logits(logits, temperature=10.0, top_k=3, top_p=0.99)) == {0, 1, 2}


def test_half_precision_logits():
    logits = torch.tensor([1.0, 3.0, 2.0]).half()
    assert top_k_filter(logits, 1).dtype == torch.float16 and kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_p_filter(logits, 0.5)) == {1}


# --- sampling ------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(5, 10)
    first = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    again = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and first.shape == (5,) and first.dtype == torch.long


def test_sampling_frequencies_match_probabilities():
    probabilities = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probabilities.log().expand(40_000, 4)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).double() / 40_000
    torch.testing.assert_close(frequencies, probabilities.double(), atol=0.01, rtol=0)


def test_sampling_only_draws_kept_tokens():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6]).expand(2000, 5)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(1), top_k=2)
    assert set(draws.tolist()) == {0, 1}
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(1), top_p=0.5)
    assert set(draws.tolist()) <= {0, 1, 2}


def test_temperature_zero_is_greedy():
    logits = torch.randn(3, 8)
    assert torch.equal(
        sample_next_token(logits, generator=torch.Generator(), temperature=0), logits.argmax(-1)
    )


# --- step functions and decoding loops ------------------------------------------------------------


def bigram_step(table):
    """A model whose next-token logits depend only on the last token: logits = table[last]."""
    return lambda tokens: table[tokens[:, -1]]


def test_greedy_decode_follows_the_argmax_chain():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([[0], [3]])
    out = greedy_decode(bigram_step(table), prompt, 5)
    assert out.shape == (2, 6)
    for row in range(2):
        token = prompt[row, 0].item()
        for position in range(1, 6):
            token = table[token].argmax().item()
            assert out[row, position].item() == token


def test_greedy_decode_with_eos_pads_finished_rows_and_stops():
    # Token 0 is eos; from 1 go to 2, from 2 to eos, from 3 to 3 forever.
    table = torch.full((4, 4), -10.0)
    table[1, 2] = table[2, 0] = table[3, 3] = table[0, 0] = 10.0
    out = greedy_decode(bigram_step(table), torch.tensor([[1], [2]]), 6, eos_token_id=0)
    assert out.tolist() == [[1, 2, 0], [2, 0, 0]]  # stops once every row has emitted eos
    out = greedy_decode(bigram_step(table), torch.tensor([1, 3]), 3, eos_token_id=0)
    assert out.tolist() == [1, 3, 3, 3, 3]  # a 1-D prompt gives a 1-D result


def test_sample_decode_reproducible_and_greedy_at_temperature_zero():
    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(4))
    prompt = torch.tensor([[1], [2], [3]])
    first = sample_decode(bigram_step(table), prompt, 8, seed=11)
    assert torch.equal(first, sample_decode(bigram_step(table), prompt, 8, seed=11))
    assert torch.equal(
        sample_decode(bigram_step(table), prompt, 8, seed=0, temperature=0.0),
        greedy_decode(bigram_step(table), prompt, 8),
    )


def prefix_model(probabilities, vocabulary):
    """A step function from a dict: generated prefix (tuple) -> next-token probabilities."""

    def step(tokens):
        rows = []
        for row in tokens.tolist():
            rows.append(torch.tensor(probabilities.get(tuple(row[1:]), [1 / vocabulary] * vocabulary)).log())
        return torch.stack(rows)

    return step


def brute_force_best(step, prompt, length, vocabulary):
    best, best_score = None, -math.inf
    for continuation in itertools.product(range(vocabulary), repeat=length):
        tokens, score = list(prompt), 0.0
        for token in continuation:
            score += torch.log_softmax(step(torch.tensor([tokens])), -1)[0, token].item()
            tokens.append(token)
        if score > best_score:
            best, best_score = tokens, score
    return best, best_score


def test_beam_search_finds_the_sequence_greedy_misses():
    # Tokens A=0, B=1, C=2. Greedy takes A (0.5) but every continuation of A is weak (max 0.4);
    # B (0.4) is followed by C with 0.9: P(B, C) = 0.36 > P(A, *) <= 0.2.
    model = prefix_model({(): [0.5, 0.4, 0.1], (0,): [0.4, 0.3, 0.3], (1,): [0.05, 0.05, 0.9]}, 3)
    prompt = torch.tensor([2])
    greedy = greedy_decode(model, prompt, 2)
    beam, score = beam_search(model, prompt, 2, num_beams=2, length_penalty=0.0)
    best, best_score = brute_force_best(model, [2], 2, 3)
    assert greedy.tolist() == [2, 0, 0] and greedy.tolist() != best
    assert beam.tolist() == best == [2, 1, 2]
    assert score == pytest.approx(best_score) == pytest.approx(math.log(0.4 * 0.9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_is_exhaustive_on_a_small_model(seed):
    table = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    step = bigram_step(table)
    beam, score = beam_search(step, torch.tensor([0]), 3, num_beams=9, length_penalty=0.0)
    best, best_score = brute_force_best(step, [0], 3, 3)
    assert beam.tolist() == best and score == pytest.approx(best_score)


def test_beam_of_one_is_greedy():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(5))
    prompt = torch.tensor([3, 1])
    beam, _ = beam_search(bigram_step(table), prompt, 6, num_beams=1)
    assert torch.equal(beam, greedy_decode(bigram_step(table), prompt, 6))


def test_beam_length_penalty_decides_between_short_and_long():
    # eos=0. Ending at once has probability 0.5 (1 token); A=1 then B=2 has 0.5 * 0.6 (2 tokens).
    model = prefix_model({(): [0.5, 0.5, 0.0], (1,): [0.0, 0.4, 0.6]}, 3)
    prompt = torch.tensor([2])
    short, short_score = beam_search(model, prompt, 2, num_beams=2, length_penalty=0.0, eos_token_id=0)
    assert short.tolist() == [2, 0] and short_score == pytest.approx(math.log(0.5))
    long, long_score = beam_search(model, prompt, 2, num_beams=2, length_penalty=1.0, eos_token_id=0)
    assert long.tolist() == [2, 1, 2] and long_score == pytest.approx(math.log(0.3) / 2)


# --- bad input ----------------------------------------------------------------------------------

step = bigram_step(torch.randn(4, 4))


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: top_k_filter(torch.randn(5), 0), ValueError, "k"),
        (lambda: top_k_filter(torch.randn(5), 6), ValueError, "k"),
        (lambda: top_k_filter(torch.randn(5), 2.5), TypeError, "k"),
        (lambda: top_p_filter(torch.randn(5), 0.0), ValueError, "p"),
        (lambda: top_p_filter(torch.randn(5), 1.5), ValueError, "p"),
        (lambda: top_p_filter(torch.arange(5), 0.5), TypeError, "logits"),
        (lambda: apply_temperature(torch.randn(5), 0.0), ValueError, "temperature"),
        (lambda: apply_temperature(torch.randn(5), -1.0), ValueError, "temperature"),
        (lambda: sample_next_token(torch.randn(2, 5), generator=None), TypeError, "generator"),
        (lambda: sample_next_token(torch.randn(5), generator=torch.Generator()), ValueError, "logits"),
        (lambda: sample_decode(step, torch.tensor([[1]]), 3), ValueError, "seed"),
        (lambda: greedy_decode(step, torch.tensor([[1.0]]), 3), TypeError, "prompt"),
        (lambda: greedy_decode(step, torch.zeros(1, 0, dtype=torch.long), 3), ValueError, "prompt"),
        (lambda: greedy_decode(step, torch.tensor([[1]]), -1), ValueError, "max_new_tokens"),
        (lambda: greedy_decode(lambda t: torch.randn(5), torch.tensor([[1]]), 2), ValueError, "step_fn"),
        (lambda: greedy_decode("model", torch.tensor([[1]]), 2), TypeError, "step_fn"),
        (lambda: beam_search(step, torch.tensor([1]), 2, num_beams=0), ValueError, "num_beams"),
        (lambda: beam_search(step, torch.tensor([[1]]), 2, num_beams=2), ValueError, "prompt"),
        (lambda: beam_search(step, torch.tensor([1]), 0, num_beams=2), ValueError, "max_new_tokens"),
        (lambda: beam_search(step, torch.tensor([1]), 2, num_beams=2, eos_token_id=-1), ValueError,
         "eos_token_id"),
    ],
    ids=["k-0", "k-too-big", "k-float", "p-0", "p-above-1", "int-logits", "temperature-0", "temperature-neg",
         "no-generator", "logits-1d", "no-seed", "float-prompt", "empty-prompt", "negative-new",
         "bad-step-shape",
         "step-not-callable", "beams-0", "beam-prompt-2d", "beam-no-steps", "eos-negative"],
)  # fmt: skip
def test_decoding_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- awkward input found by probing (issue 14) -------------------------------------------------------


def test_top_p_of_one_keeps_every_token_with_nonzero_probability():
    # exp(-20) / 2 is about 1e-9: in float32 the mass before the last token rounds to 1.0, which
    # used to drop it although p = 1 promises to keep it.
    for dtype in (torch.float32, torch.float16, torch.float64):
        logits = torch.tensor([0.0, 0.0, -20.0, -float("inf")], dtype=dtype)
        assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2}
    # A tail token far below float32's resolution of 1.0 is still kept just below p = 1.
    logits = torch.tensor([0.0, -12.0, -14.0])
    assert kept(top_p_filter(logits, 0.9999999)) == {0, 1, 2}


def test_sampling_with_top_p_one_can_draw_the_unlikely_token():
    logits = torch.tensor([[0.0, -4.0]]).expand(4000, 2)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(0), top_p=1.0)
    assert 0 < int(draws.sum()) < 4000 * 0.05  # about exp(-4) / (1 + exp(-4)) = 1.8 % draw token 1


def impossible_everywhere(tokens):
    return torch.full((tokens.shape[0], 4), -math.inf)


def impossible_after_one(tokens):
    """Token 1 first; after it no continuation is possible."""
    logits = torch.full((tokens.shape[0], 4), -math.inf)
    if tokens.shape[1] == 1:
        logits[:, 1] = 0.0
    return logits


@pytest.mark.parametrize("step_fn", [impossible_everywhere, impossible_after_one], ids=["first", "second"])
def test_beam_search_without_any_possible_continuation_raises_as_documented(step_fn):
    with pytest.raises(ValueError, match="probability 0"):
        beam_search(step_fn, torch.tensor([0]), 3, num_beams=2)


def test_beam_search_with_one_dead_beam_keeps_the_live_one():
    # From token 2 nothing is possible; from 3 only 3. The beam through 2 dies, the other wins.
    table = torch.full((4, 4), -math.inf)
    table[0, 2], table[0, 3], table[3, 3] = 0.0, -1.0, 0.0
    tokens, score = beam_search(bigram_step(table), torch.tensor([0]), 3, num_beams=2, length_penalty=0.0)
    assert tokens.tolist() == [0, 3, 3, 3]
    assert score == pytest.approx(math.log(math.exp(-1.0) / (1 + math.exp(-1.0))))


@pytest.mark.parametrize(
    "logits, message",
    [
        (torch.full((2, 4), -math.inf), "^logits .*-inf"),
        (torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), r"^logits .*row 1"),
        (torch.tensor([[0.0, math.nan]]), "^logits .*NaN"),
        (torch.tensor([[0.0, math.inf]]), r"^logits .*\+inf"),
        (torch.zeros(2, 4, device="meta"), "^logits .*meta"),
    ],
    ids=["all -inf", "one row -inf", "nan", "+inf", "meta"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sample", "greedy"])
def test_sampling_from_logits_without_a_distribution_names_logits(logits, message, temperature):
    with pytest.raises(ValueError, match=message):
        sample_next_token(logits, generator=torch.Generator(), temperature=temperature)


@pytest.mark.parametrize("filter_", [lambda x: top_p_filter(x, 0.5), lambda x: top_k_filter(x, 1)])
def test_filters_refuse_nan_logits(filter_):
    with pytest.raises(ValueError, match="^logits .*NaN"):
        filter_(torch.tensor([0.0, math.nan, 1.0]))


@pytest.mark.parametrize(
    "decode",
    [
        lambda step_fn: greedy_decode(step_fn, torch.tensor([[0]]), 2),
        lambda step_fn: sample_decode(step_fn, torch.tensor([[0]]), 2, seed=0),
        lambda step_fn: beam_search(step_fn, torch.tensor([0]), 2, num_beams=2),
    ],
    ids=["greedy", "sample", "beam"],
)
def test_decoders_refuse_a_step_fn_that_returns_nan(decode):
    with pytest.raises(ValueError, match="^step_fn .*NaN"):
        decode(lambda tokens: torch.full((tokens.shape[0], 3), math.nan))


@pytest.mark.parametrize(
    "decode",
    [
        lambda step_fn: greedy_decode(step_fn, torch.tensor([[0]]), 2),
        lambda step_fn: sample_decode(step_fn, torch.tensor([[0]]), 2, seed=0),
    ],
    ids=["greedy", "sample"],
)
def test_greedy_and_sampling_refuse_a_step_fn_without_any_possible_token(decode):
    # greedy used to return token 0 (the argmax of an all -inf row) as if it were likely.
    with pytest.raises(ValueError, match="^step_fn .*-inf"):
        decode(impossible_everywhere)


@pytest.mark.parametrize(
    "decode",
    [
        lambda: greedy_decode(step, torch.tensor([[0]]), 2, eos_token_id=4),
        lambda: beam_search(step, torch.tensor([0]), 2, num_beams=2, eos_token_id=7),
    ],
    ids=["greedy", "beam"],
)
def test_an_eos_outside_the_vocabulary_is_refused(decode):
    # It could never be emitted, so decoding would silently ignore it.
    with pytest.raises(ValueError, match="^eos_token_id"):
        decode()


def test_a_meta_prompt_is_refused_by_name():
    with pytest.raises(ValueError, match="^prompt .*meta"):
        greedy_decode(step, torch.zeros(1, 2, dtype=torch.long, device="meta"), 2)
