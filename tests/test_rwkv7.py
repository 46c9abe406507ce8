"""Tests for course_lib.recurrent.rwkv7: the chunk (WY) form against the sequential reference, the
layout derivation against RWKV-7's own (D_v, D_k) recurrence, exact reductions to DeltaNet, Gated
DeltaNet and GLA, strong decay, gradients, half precision, bad input and the RWKV7Mixer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_lib.recurrent import RWKV7Mixer, delta_rule, gated_delta_rule, gla, rwkv7, rwkv7_delta_rule_inputs

F64 = torch.float64
TIGHT = {"rtol": 0, "atol": 1e-10}
CHUNKS = [(1, 4), (13, 1), (13, 4), (13, 5), (13, 13), (13, 64), (16, 4)]


def draw(B=2, H=3, T=13, D_k=4, D_v=5, dtype=F64, seed=0):
    """RWKV-7-like inputs: a = -kappa, b = kappa * alpha with kappa unit-norm and alpha in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    kappa = F.normalize(randn(B, H, T, D_k), dim=-1)
    alpha = torch.rand(B, H, T, D_k, generator=gen, dtype=F64)
    inputs = {
        "r": randn(B, H, T, D_k),
        "k": randn(B, H, T, D_k),
        "v": randn(B, H, T, D_v),
        "w": F.logsigmoid(randn(B, H, T, D_k) + 1.5),
        "a": -kappa,
        "b": kappa * alpha,
    }
    state = randn(B, H, D_k, D_v)
    return {n: x.to(dtype) for n, x in inputs.items()}, state.to(dtype)


def assert_pair_close(actual, expected, **tolerance):
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y, **tolerance)


# --- the chunk form against the sequential reference --------------------------------------------


@pytest.mark.parametrize("T, chunk_size", CHUNKS, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_the_sequential_reference(T, chunk_size, with_state):
    inputs, state = draw(T=T)
    state = state if with_state else None
    expected = rwkv7(**inputs, form="recurrent", initial_state=state, output_final_state=True)
    actual = rwkv7(**inputs, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    assert_pair_close(actual, expected, **TIGHT)


def test_generic_low_rank_vectors_and_odd_sizes():
    """a and b need not be RWKV-7's (any finite vectors), and D_k != D_v, D_k = 1 work."""
    for D_k, D_v in ((1, 3), (5, 2)):
        inputs, state = draw(T=11, D_k=D_k, D_v=D_v, seed=D_k)
        gen = torch.Generator().manual_seed(9)
        inputs["a"] = 0.5 * torch.randn(inputs["a"].shape, generator=gen, dtype=F64)
        inputs["b"] = 0.5 * torch.randn(inputs["b"].shape, generator=gen, dtype=F64)
        expected = rwkv7(**inputs, form="recurrent", initial_state=state, output_final_state=True)
        actual = rwkv7(**inputs, chunk_size=4, initial_state=state, output_final_state=True)
        assert_pair_close(actual, expected, **TIGHT)


def rwkv7_paper_layout(r, k, v, w, a, b, wkv):
    """RWKV-7 as the paper writes it: wkv (D_v, D_k), wkv <- wkv (diag(w) + a b^T) + v k^T, o = wkv r."""
    outputs = []
    for t in range(r.shape[2]):
        transition = torch.diag_embed(w[:, :, t].exp()) + a[:, :, t, :, None] * b[:, :, t, None, :]
        wkv = wkv @ transition + v[:, :, t, :, None] * k[:, :, t, None, :]
        outputs.append((wkv @ r[:, :, t, :, None])[..., 0])
    return torch.stack(outputs, dim=2), wkv


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_course_layout_is_the_transpose_of_rwkv7s(form):
    inputs, state = draw(T=10)
    o_paper, wkv = rwkv7_paper_layout(**inputs, wkv=state.transpose(-1, -2))
    o, S = rwkv7(**inputs, form=form, chunk_size=4, scale=1.0, initial_state=state, output_final_state=True)
    torch.testing.assert_close(o, o_paper, **TIGHT)
    torch.testing.assert_close(S, wkv.transpose(-1, -2), **TIGHT)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_split_sequence_continuation(form):
    inputs, state = draw(T=14)
    options = {"form": form, "chunk_size": 4, "output_final_state": True}
    whole = rwkv7(**inputs, initial_state=state, **options)
    o1, middle = rwkv7(**{n: x[:, :, :5] for n, x in inputs.items()}, initial_state=state, **options)
    o2, final = rwkv7(**{n: x[:, :, 5:] for n, x in inputs.items()}, initial_state=middle, **options)
    assert_pair_close((torch.cat([o1, o2], dim=2), final), whole, **TIGHT)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_batch_invariance(form):
    inputs, _ = draw(B=3, T=9)
    together = rwkv7(**inputs, form=form, chunk_size=4)
    for b in range(3):
        alone = rwkv7(**{n: x[b : b + 1] for n, x in inputs.items()}, form=form, chunk_size=4)
        torch.testing.assert_close(alone, together[b : b + 1], **TIGHT)


def test_zero_state_and_empty_sequences():
    inputs, state = draw(T=7)
    torch.testing.assert_close(
        rwkv7(**inputs), rwkv7(**inputs, initial_state=torch.zeros_like(state)), **TIGHT
    )
    empty = {n: x[:, :, :0] for n, x in inputs.items()}
    for form in ("recurrent", "chunk"):
        o, final = rwkv7(**empty, form=form, initial_state=state, output_final_state=True)
        assert o.shape == (2, 3, 0, 5)
        torch.testing.assert_close(final, state)


# --- special cases --------------------------------------------------------------------------------


def delta_inputs(T=13, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, T, 4, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(2, 3, T, 5, generator=gen, dtype=F64)
    beta = torch.rand(2, 3, T, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(2, 3, T, generator=gen, dtype=F64) + 1.0)
    state = torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)
    return q, F.normalize(k, dim=-1), v, beta, g, state


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_delta_rule_is_a_special_case(form):
    q, k, v, beta, _, state = delta_inputs()
    expected = delta_rule(q, k, v, beta, form="recurrent", initial_state=state, output_final_state=True)
    chosen = rwkv7_delta_rule_inputs(k, beta)
    assert (chosen["w"] == 0).all()  # no decay: w = 1 on every key dimension
    actual = rwkv7(q, v=v, **chosen, form=form, chunk_size=4, initial_state=state, output_final_state=True)
    assert_pair_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_gated_delta_rule_is_a_special_case(form):
    q, k, v, beta, g, state = delta_inputs()
    expected = gated_delta_rule(
        q, k, v, g, beta, form="recurrent", initial_state=state, output_final_state=True
    )
    chosen = rwkv7_delta_rule_inputs(k, beta, g)
    actual = rwkv7(q, v=v, **chosen, form=form, chunk_size=5, initial_state=state, output_final_state=True)
    assert_pair_close(actual, expected, **TIGHT)


def test_without_the_rank_one_part_it_is_gla():
    inputs, state = draw(T=12)
    zero = torch.zeros_like(inputs["a"])
    expected = gla(
        inputs["r"], inputs["k"], inputs["v"], inputs["w"], initial_state=state, output_final_state=True
    )
    actual = rwkv7(**dict(inputs, a=zero, b=zero), chunk_size=4, initial_state=state, output_final_state=True)
    assert_pair_close(actual, expected, **TIGHT)


def test_full_learning_rate_overwrites_the_value_stored_under_kappa():
    """w = 1, alpha = 1 and the written key kappa: the transition I - kappa kappa^T erases what is
    stored along kappa, so afterwards S_t^T kappa_t = v_t exactly, whatever was there before."""
    inputs, state = draw(T=6)
    kappa = -inputs["a"]
    o, _ = rwkv7(
        kappa,
        kappa,
        inputs["v"],
        torch.zeros_like(kappa),
        -kappa,
        kappa,
        scale=1.0,
        chunk_size=4,
        initial_state=state,
        output_final_state=True,
    )
    torch.testing.assert_close(o, inputs["v"], **TIGHT)


def test_strong_decay_stays_finite_and_exact():
    """Two key dimensions forget at -60 per step: -3840 over the sequence, -780 inside a chunk of 13."""
    inputs, state = draw(T=64)
    w = inputs["w"].clone()
    w[..., :2] = -60.0
    inputs["w"] = w
    expected = rwkv7(**inputs, form="recurrent", initial_state=state, output_final_state=True)
    for chunk_size in (13, 64):
        actual = rwkv7(**inputs, chunk_size=chunk_size, initial_state=state, output_final_state=True)
        assert all(torch.isfinite(x).all() for x in actual)
        assert_pair_close(actual, expected, **TIGHT)


# --- gradients ----------------------------------------------------------------------------------


def test_gradcheck_chunk_form():
    inputs, state = draw(B=1, H=1, T=5, D_k=2, D_v=2)
    names = list(inputs)
    leaves = [inputs[n].clone().requires_grad_() for n in names] + [state.clone().requires_grad_()]

    def run(*tensors):
        given = dict(zip(names, tensors[:-1], strict=True))
        return rwkv7(**given, chunk_size=2, initial_state=tensors[-1], output_final_state=True)

    assert torch.autograd.gradcheck(run, leaves)


def test_gradients_agree_between_forms():
    inputs, state = draw(T=10)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    initial = state.clone().requires_grad_()
    gradients = []
    for form in ("recurrent", "chunk"):
        o, final = rwkv7(**leaves, form=form, chunk_size=3, initial_state=initial, output_final_state=True)
        weights = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
        loss = (weights * o).sum() + final.square().sum()
        gradients.append(torch.autograd.grad(loss, [*leaves.values(), initial]))
    for x, y in zip(*gradients, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


# --- half precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_half_precision(form, dtype):
    inputs, _ = draw(T=12)
    expected = rwkv7(**inputs, form="recurrent")
    o, final = rwkv7(
        **{n: x.to(dtype) for n, x in inputs.items()}, form=form, chunk_size=4, output_final_state=True
    )
    assert o.dtype == dtype and final.dtype == torch.float32
    tolerance = 0.05 if dtype == torch.float16 else 0.2
    torch.testing.assert_close(o.double(), expected, rtol=tolerance, atol=tolerance)


# --- bad input ----------------------------------------------------------------------------------


BAD = [
    ({"r": torch.zeros(2, 3, 13)}, ValueError, "r"),
    ({"r": [0.0]}, TypeError, "r"),
    ({"k": torch.zeros(2, 3, 13, 3)}, ValueError, "k"),
    ({"v": torch.zeros(2, 3, 12, 5)}, ValueError, "v"),
    ({"w": torch.zeros(2, 3, 13, 5)}, ValueError, "w"),
    ({"w": torch.full((2, 3, 13, 4), 0.5)}, ValueError, "w"),
    ({"a": torch.zeros(2, 3, 13)}, ValueError, "a"),
    ({"b": torch.full((2, 3, 13, 4), float("inf"))}, ValueError, "b"),
    ({"form": "scan"}, ValueError, "form"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"initial_state": torch.zeros(2, 3, 5, 4)}, ValueError, "initial_state"),
]


@pytest.mark.parametrize("change, error, name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(change, error, name):
    inputs, _ = draw(dtype=torch.float32)
    with pytest.raises(error, match=rf"^{name}\b"):
        rwkv7(**{**inputs, **change})


def test_delta_rule_inputs_bad_input():
    k = torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match="^beta"):
        rwkv7_delta_rule_inputs(k, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="^g"):
        rwkv7_delta_rule_inputs(k, torch.zeros(2, 3, 5), torch.zeros(2, 3, 5, 1))


# --- the mixer ----------------------------------------------------------------------------------


def make_mixer(dtype=F64, seed=0, **options):
    torch.manual_seed(seed)
    return RWKV7Mixer(16, 4, chunk_size=8, **options).to(dtype)


def mixer_input(B=2, T=19, dtype=F64, seed=1):
    return torch.randn(B, T, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("T", [1, 8, 19])
def test_mixer_forms_agree_and_keep_the_shape(T):
    layer = make_mixer()
    x = mixer_input(T=T)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, layer(x, form="recurrent"), **TIGHT)


@pytest.mark.parametrize("t", [0, 7, 12])
def test_mixer_is_causal(t):
    layer = make_mixer()
    x = mixer_input()
    changed = x.clone()
    changed[:, t + 1 :] = mixer_input(T=x.shape[1] - t - 1, seed=9)
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_mixer_backward_reaches_every_parameter_and_float32_forms_agree():
    layer = make_mixer(dtype=torch.float32)
    x = mixer_input(dtype=torch.float32)
    layer(x).square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    torch.testing.assert_close(layer(x), layer(x, form="recurrent"), rtol=1e-4, atol=1e-5)


def test_mixer_bad_input():
    layer = make_mixer(dtype=torch.float32)
    with pytest.raises(ValueError, match="^x"):
        layer(torch.zeros(2, 5, 15))
    with pytest.raises(ValueError, match="^low_rank"):
        RWKV7Mixer(16, 4, low_rank=0)
    with pytest.raises(ValueError, match="^num_heads"):
        RWKV7Mixer(16, 3)
