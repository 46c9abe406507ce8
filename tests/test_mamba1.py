"""Tests for course_lib.recurrent.mamba1 (and the associative scan it uses): every form against the
sequential reference, a closed form written here, a port of mamba_ssm's reference loop, the GLA
mapping, strong decay, gradients, half precision, bad input, and the Mamba1Mixer layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.recurrent import Mamba1Mixer, associative_scan, gla, selective_scan

F64 = torch.float64
TIGHT = {"rtol": 0, "atol": 1e-10}
FORMS = ["recurrent", "scan", "chunk"]


def draw(batch=2, D=6, L=13, N=3, groups=None, dtype=F64, seed=0, extras=True):
    """Inputs in mamba_ssm's layout: u, delta (batch, D, L); A (D, N); B, C (batch, [G,] N, L)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)
    inputs = {
        "u": randn(batch, D, L),
        "delta": randn(batch, D, L),  # raw: made positive by delta_bias and softplus
        "A": -torch.exp(randn(D, N) * 0.5),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
    }
    options = {"delta_softplus": True}
    if extras:
        inputs.update(D=randn(D), z=randn(batch, D, L))
        options["delta_bias"] = randn(D) * 0.5
    state = randn(batch, D, N)
    cast = {name: x.to(dtype) for name, x in inputs.items()}
    options = {name: (x.to(dtype) if isinstance(x, torch.Tensor) else x) for name, x in options.items()}
    return cast, options, state.to(dtype)


def run(inputs, options, **kwargs):
    return selective_scan(**inputs, **options, **kwargs)


def assert_pair_close(actual, expected, **tolerance):
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


# --- the associative scan ---------------------------------------------------------------------


def loop_scan(g, x, initial=None):
    h = torch.zeros_like(x[..., 0, :]) if initial is None else initial
    states = []
    for t in range(x.shape[-2]):
        h = g[..., t, :].exp() * h + x[..., t, :]
        states.append(h)
    return torch.stack(states, dim=-2)


@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 16, 33])
@pytest.mark.parametrize("with_initial", [False, True])
def test_associative_scan_matches_the_loop(T, with_initial):
    gen = torch.Generator().manual_seed(T)
    g = -torch.rand(2, 3, T, 4, generator=gen, dtype=F64) * 2
    x = torch.randn(2, 3, T, 4, generator=gen, dtype=F64)
    initial = torch.randn(2, 3, 4, generator=gen, dtype=F64) if with_initial else None
    G, h = associative_scan(g, x, initial)
    torch.testing.assert_close(h, loop_scan(g, x, initial), **TIGHT)
    torch.testing.assert_close(G, g.cumsum(dim=-2), **TIGHT)


def test_associative_scan_of_an_empty_sequence():
    G, h = associative_scan(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))
    assert G.shape == h.shape == (2, 0, 3)


def cumsum_then_divide(g, x):
    """The shortcut h_t = P_t * sum_{s<=t} x_s / P_s with P_t = exp(g_1 + ... + g_t)."""
    P = g.cumsum(dim=-2).exp()
    return P * (x / P).cumsum(dim=-2)


def test_cumsum_then_divide_is_right_for_mild_decay():
    """The shortcut is not wrong in exact arithmetic: with mild decay it agrees with the scan."""
    gen = torch.Generator().manual_seed(1)
    g = -torch.rand(1, 20, 3, generator=gen, dtype=F64) * 0.1
    x = torch.randn(1, 20, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(cumsum_then_divide(g, x), loop_scan(g, x), **TIGHT)


def test_strong_decay_scan_stays_finite_and_exact_where_the_shortcut_overflows():
    """A cumulative log decay of -1280 (20 per step over 64 steps) is past float64's range for 1 / P."""
    gen = torch.Generator().manual_seed(2)
    T = 64
    g = torch.full((2, T, 3), -20.0, dtype=F64)
    g[:, ::7] = -0.01  # some mild steps in between
    x = torch.randn(2, T, 3, generator=gen, dtype=F64)
    assert g.sum(dim=-2).max() <= -800
    shortcut = cumsum_then_divide(g, x)
    assert not torch.isfinite(shortcut).all()  # 1 / P_s = exp(+1280) = inf, then 0 * inf = NaN
    G, h = associative_scan(g, x)
    assert torch.isfinite(h).all() and torch.isfinite(G).all()
    torch.testing.assert_close(h, loop_scan(g, x), **TIGHT)
    # With a forgetting this strong, h_t is x_t plus a tiny remainder of x_{t-1} only.
    torch.testing.assert_close(h[:, 1:], x[:, 1:] + g[:, 1:].exp() * h[:, :-1], **TIGHT)


@pytest.mark.parametrize("form", FORMS)
def test_selective_scan_under_strong_decay(form):
    """delta A summing to <= -800 over the sequence: every form finite and equal to the reference."""
    inputs, options, state = draw(L=40, extras=False)
    inputs["A"] = torch.full_like(inputs["A"], -30.0)
    options = {}
    inputs["delta"] = inputs["delta"].abs() + 1.0  # delta >= 1: a log decay of at least -30 per step
    o, final = run(inputs, options, form=form, chunk_size=8, initial_state=state, output_final_state=True)
    assert (inputs["delta"].sum(-1)[..., None] * inputs["A"][None]).max() <= -800
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    expected = run(inputs, options, form="recurrent", initial_state=state, output_final_state=True)
    assert_pair_close((o, final), expected, **TIGHT)


# --- forms against the sequential reference -----------------------------------------------------


@pytest.mark.parametrize("form", ["scan", "chunk"])
@pytest.mark.parametrize(
    "L, chunk_size", [(1, 4), (13, 1), (13, 4), (13, 5), (13, 13), (13, 64), (16, 4)], ids=str
)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("groups", [None, 2], ids=["shared", "grouped"])
def test_forms_match_the_sequential_reference(form, L, chunk_size, with_state, groups):
    inputs, options, state = draw(L=L, groups=groups)
    state = state if with_state else None
    expected = run(inputs, options, form="recurrent", initial_state=state, output_final_state=True)
    actual = run(
        inputs, options, form=form, chunk_size=chunk_size, initial_state=state, output_final_state=True
    )
    assert_pair_close(actual, expected, **TIGHT)


def mamba_ssm_reference(u, delta, A, B, C, D, z, delta_bias, h):
    """A port of mamba_ssm's ``selective_scan_ref`` (variable B and C of shape (batch, N, L))."""
    delta = F.softplus(delta + delta_bias[..., None])
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    return (y + u * D[:, None]) * F.silu(z), h


@pytest.mark.parametrize("form", FORMS)
def test_matches_a_port_of_the_reference_implementation(form):
    inputs, options, state = draw(L=11)
    expected = mamba_ssm_reference(**inputs, delta_bias=options["delta_bias"], h=state)
    actual = run(inputs, options, form=form, chunk_size=4, initial_state=state, output_final_state=True)
    assert_pair_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("form", FORMS)
def test_one_channel_with_one_state_dim_is_the_closed_form(form):
    """D = N = 1, computed here with Python floats:
    y_t = C_t (sum_s exp(A sum_{s<r<=t} delta_r) delta_s u_s B_s + exp(A sum_{r<=t} delta_r) h_0) + D u_t,
    gated by silu(z_t)."""
    gen = torch.Generator().manual_seed(5)
    L = 9
    u, delta, B, C, z = (torch.randn(L, generator=gen, dtype=F64) for _ in range(5))
    delta = delta.abs() + 0.1
    A, skip, h0 = -0.7, 0.3, 1.5
    expected = []
    for t in range(L):
        total = math.exp(A * sum(delta[: t + 1].tolist())) * h0
        for s in range(t + 1):
            total += (
                math.exp(A * sum(delta[s + 1 : t + 1].tolist())) * delta[s].item() * u[s].item() * B[s].item()
            )
        y = C[t].item() * total + skip * u[t].item()
        expected.append(y * z[t].item() / (1 + math.exp(-z[t].item())))
    o, final = selective_scan(
        u.view(1, 1, L),
        delta.view(1, 1, L),
        torch.tensor([[A]], dtype=F64),
        B.view(1, 1, L),
        C.view(1, 1, L),
        torch.tensor([skip], dtype=F64),
        z.view(1, 1, L),
        form=form,
        chunk_size=4,
        initial_state=torch.tensor([[[h0]]], dtype=F64),
        output_final_state=True,
    )
    torch.testing.assert_close(o.view(L), torch.tensor(expected, dtype=F64), **TIGHT)
    assert final.shape == (1, 1, 1)


def test_is_gla_with_one_value_per_channel():
    """Each channel is a GLA head: q = C, k = B, v = delta u, log gate delta A, no scale."""
    inputs, _, state = draw(L=10, extras=False)
    delta = F.softplus(inputs["delta"])
    o, final = selective_scan(
        **dict(inputs, delta=delta), form="chunk", chunk_size=4, initial_state=state, output_final_state=True
    )
    batch, D, L = inputs["u"].shape
    q = inputs["C"].transpose(1, 2)[:, None].expand(batch, D, L, -1)
    k = inputs["B"].transpose(1, 2)[:, None].expand(batch, D, L, -1)
    v = (delta * inputs["u"])[..., None]
    g = delta[..., None] * inputs["A"][:, None, :]
    o_gla, final_gla = gla(q, k, v, g, scale=1.0, initial_state=state[..., None], output_final_state=True)
    torch.testing.assert_close(o, o_gla[..., 0], **TIGHT)
    torch.testing.assert_close(final, final_gla[..., 0], **TIGHT)


@pytest.mark.parametrize("form", FORMS)
def test_split_sequence_continuation(form):
    """Two calls with the state carried over equal one call over the whole sequence."""
    inputs, options, state = draw(L=14)
    whole = run(inputs, options, form=form, chunk_size=4, initial_state=state, output_final_state=True)
    per_step = ("u", "delta", "B", "C", "z")
    first = {n: (x[..., :5] if n in per_step else x) for n, x in inputs.items()}
    second = {n: (x[..., 5:] if n in per_step else x) for n, x in inputs.items()}
    o1, middle = run(first, options, form=form, chunk_size=4, initial_state=state, output_final_state=True)
    o2, final = run(second, options, form=form, chunk_size=4, initial_state=middle, output_final_state=True)
    assert_pair_close((torch.cat([o1, o2], dim=-1), final), whole, **TIGHT)


@pytest.mark.parametrize("form", FORMS)
def test_batch_invariance(form):
    inputs, options, _ = draw(batch=3, L=9)
    together = run(inputs, options, form=form, chunk_size=4)
    for b in range(3):
        alone = {n: (x[b : b + 1] if x.dim() == 3 else x) for n, x in inputs.items()}
        torch.testing.assert_close(run(alone, options, form=form, chunk_size=4), together[b : b + 1], **TIGHT)


def test_no_initial_state_is_a_zero_state_and_empty_sequences_work():
    inputs, options, state = draw(L=7)
    zero = torch.zeros_like(state)
    for form in FORMS:
        torch.testing.assert_close(run(inputs, options, form=form), run(inputs, options, initial_state=zero))
    empty = {n: (x[..., :0] if n in ("u", "delta", "B", "C", "z") else x) for n, x in inputs.items()}
    for form in FORMS:
        o, final = run(empty, options, form=form, initial_state=state, output_final_state=True)
        assert o.shape == (2, 6, 0)
        torch.testing.assert_close(final, state)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["scan", "chunk"])
def test_gradcheck(form):
    inputs, options, state = draw(batch=1, D=2, L=5, N=2)
    names = list(inputs) + ["delta_bias"]
    leaves = [inputs[n].clone().requires_grad_() for n in inputs] + [
        options["delta_bias"].clone().requires_grad_()
    ]
    leaves.append(state.clone().requires_grad_())

    def function(*tensors):
        given = dict(zip(names, tensors[:-1], strict=True))
        bias = given.pop("delta_bias")
        return selective_scan(
            **given,
            delta_bias=bias,
            delta_softplus=True,
            form=form,
            chunk_size=2,
            initial_state=tensors[-1],
            output_final_state=True,
        )

    assert torch.autograd.gradcheck(function, leaves)


def test_gradients_agree_between_forms():
    inputs, options, state = draw(L=10)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    initial = state.clone().requires_grad_()
    gradients = {}
    for form in FORMS:
        o, final = run(
            leaves, options, form=form, chunk_size=3, initial_state=initial, output_final_state=True
        )
        weights = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
        loss = (weights * o).sum() + final.square().sum()
        gradients[form] = torch.autograd.grad(loss, [*leaves.values(), initial])
    for form in ("scan", "chunk"):
        for a, b in zip(gradients[form], gradients["recurrent"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --- half precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_half_precision(form, dtype):
    inputs, options, state = draw(L=12)
    expected = run(inputs, options, form="recurrent")
    half = {n: x.to(dtype) for n, x in inputs.items()}
    half_options = {n: (x.to(dtype) if isinstance(x, torch.Tensor) else x) for n, x in options.items()}
    o, final = run(half, half_options, form=form, chunk_size=4, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32  # accumulated in float32
    tolerance = 0.05 if dtype == torch.float16 else 0.2
    torch.testing.assert_close(o.double(), expected, rtol=tolerance, atol=tolerance)


# --- bad input ----------------------------------------------------------------------------------


BAD = [
    ({"u": torch.zeros(2, 6, 13, dtype=torch.long)}, TypeError, "u"),
    ({"u": torch.zeros(2, 6)}, ValueError, "u"),
    ({"delta": torch.zeros(2, 6, 12)}, ValueError, "delta"),
    ({"A": torch.zeros(6, 3)}, ValueError, "A"),
    ({"A": -torch.ones(5, 3)}, ValueError, "A"),
    ({"B": torch.zeros(2, 4, 13)}, ValueError, "B"),
    ({"B": torch.zeros(2, 3, 12)}, ValueError, "B"),
    ({"C": torch.zeros(2, 4, 3, 13)}, ValueError, "C"),
    ({"D": torch.zeros(5)}, ValueError, "D"),
    ({"z": torch.zeros(2, 6, 12)}, ValueError, "z"),
]


@pytest.mark.parametrize("change, error, name", BAD, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_tensors_name_the_argument(change, error, name):
    inputs, options, _ = draw(dtype=torch.float32)
    with pytest.raises(error, match=rf"^{name}\b"):
        run({**inputs, **change}, options)


def test_bad_options_name_the_argument():
    inputs, options, _ = draw(dtype=torch.float32)
    cases = [
        ({"form": "parallel"}, ValueError, "form"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size"),
        ({"output_final_state": 1}, TypeError, "output_final_state"),
        ({"delta_softplus": "yes"}, TypeError, "delta_softplus"),
        ({"delta_bias": torch.zeros(4)}, ValueError, "delta_bias"),
        ({"initial_state": torch.zeros(2, 6, 4)}, ValueError, "initial_state"),
        ({"delta_softplus": False}, ValueError, "delta"),  # raw delta has negative entries
    ]
    for change, error, name in cases:
        with pytest.raises(error, match=rf"^{name}\b"):
            run(inputs, {**options, **change})


# --- the mixer ----------------------------------------------------------------------------------


def make_mixer(d_model=16, dtype=F64, seed=0, **options):
    torch.manual_seed(seed)
    return Mamba1Mixer(d_model, 4, chunk_size=8, state_size=4, **options).to(dtype)


def mixer_input(B=2, T=19, d_model=16, dtype=F64, seed=1):
    return torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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


def test_mixer_initialisation_follows_mamba():
    layer = make_mixer(d_model=16, expand=2)
    A = -layer.A_log.exp()
    torch.testing.assert_close(A, -torch.arange(1.0, 5.0, dtype=F64).repeat(32, 1))
    delta = F.softplus(layer.dt_proj.bias)  # the bias was computed in float32
    assert delta.min() >= 1e-3 * (1 - 1e-5) and delta.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: the logs of the sorted steps are evenly spaced from log 1e-3 to log 0.1
    torch.testing.assert_close(
        delta.sort().values.log(),
        torch.linspace(math.log(1e-3), math.log(0.1), 32, dtype=F64),
        rtol=1e-5,
        atol=1e-5,
    )
    assert layer.dt_rank == 1 and layer.x_proj.out_features == 1 + 2 * 4


def test_mixer_backward_reaches_every_parameter():
    layer = make_mixer(dtype=torch.float32)
    layer(mixer_input(dtype=torch.float32)).square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_mixer_float32_and_bad_input():
    layer = make_mixer(dtype=torch.float32)
    x = mixer_input(dtype=torch.float32)
    torch.testing.assert_close(layer(x), layer(x, form="recurrent"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="^x"):
        layer(torch.zeros(2, 5, 15))
    with pytest.raises(ValueError, match="^form"):
        layer(x, form="scan-ish")
    with pytest.raises(ValueError, match="^state_size"):
        Mamba1Mixer(16, 4, state_size=0)
    with pytest.raises(ValueError, match="^dt_max"):
        Mamba1Mixer(16, 4, dt_min=0.1, dt_max=0.01)
