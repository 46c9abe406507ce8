"""Chapter 01's train-short-test-long study: each scheme's attention against a hand-written float64
reference, causality, what runs how long, and the study's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib.studies.positions import SCHEMES, PositionAttention, PositionLM, position_extrapolation

F64 = torch.float64


def reference_attention(layer: PositionAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's equations written out query by query, with every position term built by hand."""
    B, T, width = x.shape
    H, D = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    if layer.scheme == "RoPE":  # rotate pair (2i, 2i+1) of position t by t * 10000^(-2i/D)
        angles = torch.arange(T, dtype=F64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=F64) / D)
        cos, sin = angles.cos(), angles.sin()

        def rotate(t):
            even, odd = t[..., 0::2], t[..., 1::2]
            return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

        q, k = rotate(q), rotate(k)
    out = torch.zeros(B, H, T, D, dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logits = []
                for j in range(i + 1):
                    score = q[b, h, i] @ k[b, h, j]
                    if layer.scheme == "Shaw":
                        k_max = layer.shaw.max_distance
                        row = max(-k_max, min(k_max, j - i)) + k_max
                        score = score + q[b, h, i] @ layer.shaw.key_table[row]
                    score = score / math.sqrt(D)
                    if layer.scheme == "ALiBi":
                        slope = 2.0 ** (-8.0 * (h + 1) / H)
                        score = score - slope * (i - j)
                    if layer.scheme == "T5 buckets":
                        distance, n = i - j, layer.t5.num_buckets
                        exact = n // 2
                        if distance < exact:
                            bucket = distance
                        else:
                            far = math.log(distance / exact) / math.log(layer.t5.max_distance / exact)
                            bucket = min(exact + int(far * (n - exact)), n - 1)
                        score = score + layer.t5.table.weight[bucket, h]
                    logits.append(score)
                weights = torch.softmax(torch.stack(logits), dim=0)
                for j in range(i + 1):
                    value = v[b, h, j]
                    if layer.scheme == "Shaw":
                        k_max = layer.shaw.max_distance
                        value = value + layer.shaw.value_table[max(-k_max, min(k_max, j - i)) + k_max]
                    out[b, h, i] += weights[j] * value
    return layer.out(out.transpose(1, 2).reshape(B, T, width))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_attention_of_every_scheme_matches_the_hand_written_equations(scheme):
    torch.manual_seed(0)
    layer = PositionAttention(8, 2, scheme, max_distance=5, num_buckets=6).double()
    for parameter in layer.parameters():  # away from the 0.02 init, so every term matters
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(2, 11, 8, dtype=F64)  # T = 11 > max_distance: clipping and far buckets are used
    torch.testing.assert_close(layer(x), reference_attention(layer, x))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_model_is_causal_and_runs_past_its_training_length_unless_learned(scheme):
    model = PositionLM(
        scheme, d_model=8, num_heads=2, max_len=6, max_distance=3, num_buckets=4, seed=1
    ).double()
    tokens = torch.randint(0, 49, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 49
    torch.testing.assert_close(model(changed)[:, :4], logits[:, :4])  # the future never leaks back
    assert not torch.allclose(model(changed)[:, 4:], logits[:, 4:])
    longer = torch.randint(0, 49, (1, 13), generator=torch.Generator().manual_seed(1))
    if scheme == "learned absolute":
        with pytest.raises(ValueError, match="max_len"):
            model(longer)
    else:
        assert model(longer).shape == (1, 13, 49)


def test_position_parameters_count_the_tables():
    d, H, layers, k, n, max_len = 16, 2, 3, 5, 8, 10
    counts = {
        scheme: PositionLM(
            scheme, d_model=d, num_heads=H, num_layers=layers, max_len=max_len, max_distance=k, num_buckets=n
        ).position_parameters()
        for scheme in SCHEMES
    }
    assert counts == {
        "sinusoidal": 0,
        "learned absolute": max_len * d,
        "RoPE": 0,
        "ALiBi": 0,
        "T5 buckets": layers * n * H,  # each layer its own table here (T5 itself shares one)
        "Shaw": layers * (2 * k + 1) * 2 * (d // H),
    }


def test_the_study_trains_every_scheme_and_evaluates_the_same_characters():
    options = dict(train_length=8, eval_lengths=(8, 16), steps=4, batch_size=2, d_model=8, eval_tokens=64)
    result = position_extrapolation(**options)
    assert list(result.losses) == list(SCHEMES)
    assert result.losses["learned absolute"][1] is None
    for scheme, losses in result.losses.items():
        assert all(math.isfinite(x) for x in losses if x is not None)
        assert 0 < result.final_train_loss[scheme] < 10
        if scheme != "learned absolute":
            # the reported loss is the mean over the positions of the longest windows
            assert len(result.position_losses[scheme]) == 16
            assert sum(result.position_losses[scheme]) / 16 == pytest.approx(losses[-1])
    again = position_extrapolation(**options)
    assert again.losses == result.losses  # seeded: the same numbers twice
    assert "learned absolute" in result.table() and "T=16" in result.table()


def test_training_lowers_the_loss():
    short = position_extrapolation(["ALiBi"], train_length=16, eval_lengths=(16,), steps=1, d_model=16)
    longer = position_extrapolation(["ALiBi"], train_length=16, eval_lengths=(16,), steps=60, d_model=16)
    assert longer.losses["ALiBi"][0] < short.losses["ALiBi"][0] - 0.3


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: position_extrapolation(["Alibi"]), ValueError, "schemes"),
        (lambda: position_extrapolation([]), ValueError, "schemes"),
        (lambda: position_extrapolation(train_length=1), ValueError, "train_length"),
        (lambda: position_extrapolation(eval_lengths=(0,)), ValueError, "eval_lengths"),
        (lambda: position_extrapolation(steps=0), ValueError, "steps"),
        (lambda: position_extrapolation(lr=0.0), ValueError, "lr"),
        (lambda: position_extrapolation(["RoPE"], steps=1, eval_tokens=10**9), ValueError, "eval_tokens"),
        (lambda: PositionLM("xpos"), ValueError, "scheme"),
        (lambda: PositionAttention(10, 3, "RoPE"), ValueError, "num_heads"),
        (lambda: PositionLM("RoPE")(torch.zeros(2, 3)), TypeError, "tokens"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
