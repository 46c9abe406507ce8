"""Tests for course_lib.recurrent.hgrn: HGRN and HGRN-2 against their sequential references, closed
forms and the GLA mapping, the forget-gate lower bounds, gradients, half precision, bad input and
the two mixers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_lib.recurrent import (
    HGRN2Mixer,
    HGRNMixer,
    chunked_scan,
    gla,
    hgrn,
    hgrn2,
    hgrn_forget_gate,
    hgrn_lower_bounds,
)

F64 = torch.float64
TIGHT = {"rtol": 0, "atol": 1e-10}
CHUNKS = [(1, 4), (13, 1), (13, 4), (13, 5), (13, 13), (13, 64), (16, 4)]


def randn(*shape, gen, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def log_forget(*shape, gen, dtype=F64):
    """Log forget gates in (-inf, 0), mostly remembering."""
    return F.logsigmoid(torch.randn(*shape, generator=gen, dtype=F64) + 1.5).to(dtype)


def draw_hgrn(B=2, H=3, T=13, D=4, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": randn(B, H, T, D, gen=gen, dtype=dtype),
        "g": log_forget(B, H, T, D, gen=gen, dtype=dtype),
    }, randn(B, H, D, gen=gen, dtype=dtype)


def draw_hgrn2(B=2, H=3, T=13, D_k=4, D_v=5, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "q": randn(B, H, T, D_k, gen=gen, dtype=dtype),
        "v": randn(B, H, T, D_v, gen=gen, dtype=dtype),
        "g": log_forget(B, H, T, D_k, gen=gen, dtype=dtype),
    }
    return inputs, randn(B, H, D_k, D_v, gen=gen, dtype=dtype)


METHODS = {
    "hgrn": (hgrn, draw_hgrn, ["scan", "chunk"]),
    "hgrn2": (hgrn2, draw_hgrn2, ["chunk"]),
}
FAST = [(name, form) for name, (_, _, forms) in METHODS.items() for form in forms]


def assert_pair_close(actual, expected, **tolerance):
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


# --- forms against the sequential reference -----------------------------------------------------


@pytest.mark.parametrize("name, form", FAST)
@pytest.mark.parametrize("T, chunk_size", CHUNKS, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_match_the_sequential_reference(name, form, T, chunk_size, with_state):
    function, draw, _ = METHODS[name]
    inputs, state = draw(T=T)
    state = state if with_state else None
    expected = function(**inputs, form="recurrent", initial_state=state, output_final_state=True)
    actual = function(
        **inputs, form=form, chunk_size=chunk_size, initial_state=state, output_final_state=True
    )
    assert_pair_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("name, form", [(n, "recurrent") for n in METHODS] + FAST)
def test_split_sequence_continuation(name, form):
    function, draw, _ = METHODS[name]
    inputs, state = draw(T=14)
    options = {"form": form, "chunk_size": 4, "output_final_state": True}
    whole = function(**inputs, initial_state=state, **options)
    o1, middle = function(**{n: x[:, :, :5] for n, x in inputs.items()}, initial_state=state, **options)
    o2, final = function(**{n: x[:, :, 5:] for n, x in inputs.items()}, initial_state=middle, **options)
    assert_pair_close((torch.cat([o1, o2], dim=2), final), whole, **TIGHT)


@pytest.mark.parametrize("name, form", [(n, "recurrent") for n in METHODS] + FAST)
def test_batch_invariance(name, form):
    function, draw, _ = METHODS[name]
    inputs, _ = draw(B=3, T=9)
    together = function(**inputs, form=form, chunk_size=4)
    for b in range(3):
        alone = function(**{n: x[b : b + 1] for n, x in inputs.items()}, form=form, chunk_size=4)
        torch.testing.assert_close(alone, together[b : b + 1], **TIGHT)


@pytest.mark.parametrize("name", METHODS)
def test_zero_state_and_empty_sequences(name):
    function, draw, forms = METHODS[name]
    inputs, state = draw(T=7)
    zero = torch.zeros_like(state)
    torch.testing.assert_close(function(**inputs), function(**inputs, initial_state=zero), **TIGHT)
    empty = {n: x[:, :, :0] for n, x in inputs.items()}
    for form in ["recurrent", *forms]:
        o, final = function(**empty, form=form, initial_state=state, output_final_state=True)
        assert o.shape[2] == 0
        torch.testing.assert_close(final, state)


# --- independent references ---------------------------------------------------------------------


def test_hgrn_with_a_constant_gate_is_an_exponential_moving_average():
    """f constant: h_t = f^t h_0 + (1 - f) sum_{s<=t} f^(t-s) x_s, written out here."""
    gen = torch.Generator().manual_seed(3)
    T, f = 11, 0.8
    x = randn(1, 1, T, 2, gen=gen)
    h0 = randn(1, 1, 2, gen=gen)
    expected = torch.stack(
        [
            f ** (t + 1) * h0 + (1 - f) * sum(f ** (t - s) * x[:, :, s] for s in range(t + 1))
            for t in range(T)
        ],
        dim=2,
    )
    g = torch.full_like(x, torch.log(torch.tensor(f, dtype=F64)).item())
    for form in ("recurrent", "scan", "chunk"):
        o = hgrn(x, g, form=form, chunk_size=4, initial_state=h0)
        torch.testing.assert_close(o, expected, **TIGHT)


def test_hgrn2_is_gla_with_one_minus_f_as_the_key():
    inputs, state = draw_hgrn2(T=10)
    q, v, g = inputs["q"], inputs["v"], inputs["g"]
    expected = gla(q, 1 - g.exp(), v, g, form="recurrent", initial_state=state, output_final_state=True)
    for form in ("recurrent", "chunk"):
        actual = hgrn2(q, v, g, form=form, chunk_size=4, initial_state=state, output_final_state=True)
        assert_pair_close(actual, expected, **TIGHT)


def test_hgrn_is_hgrn2_with_one_by_one_heads():
    """Each HGRN channel is an HGRN-2 head with D_k = D_v = 1, query 1 and scale 1: the state
    expansion is the only difference between the two."""
    inputs, state = draw_hgrn(B=2, H=3, T=12, D=4)
    x, g = inputs["x"], inputs["g"]
    expected = hgrn(x, g, form="scan", initial_state=state, output_final_state=True)
    B, H, T, D = x.shape
    as_heads = lambda t: t.permute(0, 1, 3, 2).reshape(B, H * D, T, 1)  # noqa: E731
    o, final = hgrn2(
        torch.ones(B, H * D, T, 1, dtype=F64),
        as_heads(x),
        as_heads(g),
        scale=1.0,
        chunk_size=5,
        initial_state=state.reshape(B, H * D, 1, 1),
        output_final_state=True,
    )
    torch.testing.assert_close(o.reshape(B, H, D, T).permute(0, 1, 3, 2), expected[0], **TIGHT)
    torch.testing.assert_close(final.reshape(B, H, D), expected[1], **TIGHT)


def test_chunked_scan_with_any_chunk_size_is_one_scan():
    gen = torch.Generator().manual_seed(4)
    g, x = -torch.rand(2, 17, 3, generator=gen, dtype=F64), randn(2, 17, 3, gen=gen)
    h_one, last_one = chunked_scan(g, x, 17)
    for size in (1, 3, 16):
        h, last = chunked_scan(g, x, size)
        torch.testing.assert_close(h, h_one, **TIGHT)
        torch.testing.assert_close(last, last_one, **TIGHT)


@pytest.mark.parametrize("form", ["recurrent", "scan", "chunk"])
def test_hgrn_under_strong_decay(form):
    """log f = -30 per step (a cumulative -900): the output is the current input, nothing overflows."""
    inputs, state = draw_hgrn(T=30)
    g = torch.full_like(inputs["g"], -30.0)
    o = hgrn(inputs["x"], g, form=form, chunk_size=4, initial_state=state)
    torch.testing.assert_close(o, inputs["x"], rtol=1e-12, atol=1e-12)


# --- the forget-gate lower bounds ---------------------------------------------------------------


def test_lower_bounds_start_at_zero_and_grow_with_depth():
    torch.testing.assert_close(hgrn_lower_bounds(torch.zeros(4)), torch.tensor([0.0, 0.25, 0.5, 0.75]))
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    bounds = hgrn_lower_bounds(logits)
    assert (bounds[0] == 0).all() and (bounds[1:] > bounds[:-1]).all() and (bounds < 1).all()


@pytest.mark.parametrize("bound", [0.0, 0.3, 0.9])
def test_forget_gate_respects_its_bound(bound):
    logits = torch.linspace(-40, 40, 101, dtype=F64)
    log_f = hgrn_forget_gate(logits, bound)
    torch.testing.assert_close(log_f.exp(), bound + (1 - bound) * torch.sigmoid(logits), rtol=1e-12, atol=0)
    assert torch.isfinite(log_f).all() and (log_f <= 0).all()
    if bound > 0:
        assert (log_f >= torch.log(torch.tensor(bound, dtype=F64)) - 1e-12).all()
    per_channel = hgrn_forget_gate(logits[:, None].expand(101, 2), torch.tensor([0.0, bound], dtype=F64))
    torch.testing.assert_close(per_channel[:, 1], log_f)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, form", FAST)
def test_gradcheck(name, form):
    function, draw, _ = METHODS[name]
    inputs, state = draw(B=1, H=1, T=5, **({"D": 2} if name == "hgrn" else {"D_k": 2, "D_v": 2}))
    names = list(inputs)
    leaves = [inputs[n].clone().requires_grad_() for n in names] + [state.clone().requires_grad_()]

    def run(*tensors):
        given = dict(zip(names, tensors[:-1], strict=True))
        return function(**given, form=form, chunk_size=2, initial_state=tensors[-1], output_final_state=True)

    assert torch.autograd.gradcheck(run, leaves)


@pytest.mark.parametrize("name, form", FAST)
def test_gradients_agree_with_the_reference(name, form):
    function, draw, _ = METHODS[name]
    inputs, state = draw(T=10)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    initial = state.clone().requires_grad_()
    gradients = []
    for f in ("recurrent", form):
        o, final = function(**leaves, form=f, chunk_size=3, initial_state=initial, output_final_state=True)
        weights = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
        gradients.append(
            torch.autograd.grad((weights * o).sum() + final.square().sum(), [*leaves.values(), initial])
        )
    for a, b in zip(*gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --- half precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name, form", [(n, "recurrent") for n in METHODS] + FAST)
def test_half_precision(name, form, dtype):
    function, draw, _ = METHODS[name]
    inputs, _ = draw(T=12)
    expected = function(**inputs, form="recurrent")
    half = {n: x.to(dtype) for n, x in inputs.items()}
    o, final = function(**half, form=form, chunk_size=4, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    tolerance = 0.05 if dtype == torch.float16 else 0.2
    torch.testing.assert_close(o.double(), expected, rtol=tolerance, atol=tolerance)


# --- bad input ----------------------------------------------------------------------------------


BAD = [
    ("hgrn", {"x": torch.zeros(2, 3, 13, 4, dtype=torch.long)}, TypeError, "x"),
    ("hgrn", {"x": torch.zeros(2, 3, 13)}, ValueError, "x"),
    ("hgrn", {"g": torch.zeros(2, 3, 12, 4)}, ValueError, "g"),
    ("hgrn", {"g": torch.full((2, 3, 13, 4), 0.1)}, ValueError, "g"),
    ("hgrn", {"g": torch.full((2, 3, 13, 4), float("nan"))}, ValueError, "g"),
    ("hgrn", {"initial_state": torch.zeros(2, 3, 5)}, ValueError, "initial_state"),
    ("hgrn", {"form": "parallel"}, ValueError, "form"),
    ("hgrn", {"chunk_size": 0}, ValueError, "chunk_size"),
    ("hgrn2", {"v": torch.zeros(2, 3, 12, 5)}, ValueError, "v"),
    ("hgrn2", {"g": torch.zeros(2, 3, 13, 5)}, ValueError, "g"),
    ("hgrn2", {"g": torch.full((2, 3, 13, 4), 0.5)}, ValueError, "g"),
    ("hgrn2", {"scale": float("inf")}, ValueError, "scale"),
    ("hgrn2", {"form": "scan"}, ValueError, "form"),
    ("hgrn2", {"initial_state": torch.zeros(2, 3, 5, 4)}, ValueError, "initial_state"),
    ("hgrn2", {"output_final_state": None}, TypeError, "output_final_state"),
]


@pytest.mark.parametrize(
    "name, change, error, argument", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(name, change, error, argument):
    function, draw, _ = METHODS[name]
    inputs, _ = draw(dtype=torch.float32)
    with pytest.raises(error, match=rf"^{argument}\b"):
        function(**{**inputs, **change})


def test_bad_bounds_name_the_argument():
    with pytest.raises(ValueError, match="^lower_bound"):
        hgrn_forget_gate(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="^lower_bound"):
        hgrn_forget_gate(torch.zeros(3), torch.tensor([0.1, -0.1, 0.2]))
    with pytest.raises(TypeError, match="^logits"):
        hgrn_lower_bounds([0.0, 1.0])
    with pytest.raises(ValueError, match="^lower_bound"):
        HGRNMixer(8, 2, lower_bound=-0.5)


# --- the mixers ---------------------------------------------------------------------------------


MIXERS = {"hgrn": HGRNMixer, "hgrn2": HGRN2Mixer}


def make_mixer(name, dtype=F64, seed=0, **options):
    torch.manual_seed(seed)
    return MIXERS[name](16, 4, chunk_size=8, **options).to(dtype)


def mixer_input(B=2, T=19, dtype=F64, seed=1):
    return torch.randn(B, T, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


MIXER_CASES = [("hgrn", {}), ("hgrn", {"conv_size": 4, "lower_bound": 0.5, "expand_ratio": 2})]
MIXER_CASES += [("hgrn2", {}), ("hgrn2", {"conv_size": 4, "lower_bound": 0.25, "key_dim": 3})]
MIXER_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(MIXER_CASES)]


@pytest.mark.parametrize("name, options", MIXER_CASES, ids=MIXER_IDS)
@pytest.mark.parametrize("T", [1, 8, 19])
def test_mixer_forms_agree_and_keep_the_shape(name, options, T):
    layer = make_mixer(name, **options)
    x = mixer_input(T=T)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, layer(x, form="recurrent"), **TIGHT)


@pytest.mark.parametrize("name, options", MIXER_CASES, ids=MIXER_IDS)
@pytest.mark.parametrize("t", [0, 7, 12])
def test_mixer_is_causal(name, options, t):
    layer = make_mixer(name, **options)
    x = mixer_input()
    changed = x.clone()
    changed[:, t + 1 :] = mixer_input(T=x.shape[1] - t - 1, seed=9)
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


@pytest.mark.parametrize("name, options", MIXER_CASES, ids=MIXER_IDS)
def test_mixer_backward_reaches_every_parameter(name, options):
    layer = make_mixer(name, dtype=torch.float32, **options)
    layer(mixer_input(dtype=torch.float32)).square().mean().backward()
    for parameter_name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_lower_bound_is_used_and_can_be_passed_at_forward(name):
    layer = make_mixer(name)
    x = mixer_input()
    bounded = make_mixer(name, lower_bound=0.6)
    torch.testing.assert_close(layer(x, lower_bound=0.6), bounded(x), **TIGHT)
    assert not torch.allclose(layer(x), bounded(x))
    # A learnable per-channel bound (e.g. one row of hgrn_lower_bounds) passed at forward gets a gradient.
    width = layer.f_proj.out_features
    bound = torch.full((width,), 0.3, dtype=F64, requires_grad=True)
    layer(x, lower_bound=bound).sum().backward()
    assert bound.grad is not None and bound.grad.abs().sum() > 0


def test_mixer_bad_input():
    layer = make_mixer("hgrn", dtype=torch.float32)
    with pytest.raises(ValueError, match="^x"):
        layer(torch.zeros(2, 5, 15))
    with pytest.raises(ValueError, match="^form"):
        layer(torch.zeros(2, 5, 16), form="scan")
    with pytest.raises(ValueError, match="^num_heads"):
        HGRNMixer(16, 3)
    with pytest.raises(ValueError, match="^key_dim"):
        HGRN2Mixer(16, 4, key_dim=0)


def test_forget_gate_with_a_tensor_bound_stays_finite_for_very_negative_logits():
    # A learned bound of 0 (layer 0 of hgrn_lower_bounds) once gave log(0) = -inf for logits below
    # about -104 in float32, which hgrn then refused; the bound's gradient must stay finite too.
    logits = torch.tensor([-800.0, -104.0, 0.0, 50.0], dtype=torch.float64, requires_grad=True)
    bound_logits = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    bounds = hgrn_lower_bounds(bound_logits)
    for layer in range(3):
        got = hgrn_forget_gate(logits, bounds[layer])
        gamma = bounds[layer].detach().tolist()
        expected = torch.tensor(  # log(gamma + (1 - gamma) sigma(x)), term by term in exact arithmetic
            [
                F.logsigmoid(torch.tensor(x, dtype=torch.float64)).item()
                if g == 0
                else float(
                    torch.logaddexp(
                        torch.tensor(g).log(), torch.tensor(1 - g).log() + F.logsigmoid(torch.tensor(x))
                    )
                )
                for x, g in zip(logits.detach().tolist(), gamma)
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(got, expected)
        got.sum().backward(retain_graph=True)
    assert torch.isfinite(logits.grad).all() and torch.isfinite(bound_logits.grad).all()
    assert torch.isfinite(hgrn_forget_gate(logits.detach().float(), torch.zeros(4))).all()
