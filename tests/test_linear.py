"""Tests for course_lib.linear: feature maps, the three forms of linear attention, FAVOR+,
efficient attention and Linformer, each against a reference written here or another form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F_
from hypothesis import given
from hypothesis import strategies as st

from course_lib.linear import (
    FavorPlus,
    LinformerAttention,
    efficient_attention,
    elu_plus_one,
    favor_plus,
    identity_map,
    linear_attention,
    linear_attention_matrix,
    linformer_attention,
    relu_map,
)

FORMS = ["parallel", "recurrent", "chunk"]
FEATURE_MAPS = {
    "elu1": lambda D: elu_plus_one,
    "relu": lambda D: relu_map,
    "favor": lambda D: favor_plus(D, 7, seed=3),
    "identity": lambda D: identity_map,
}
# (feature map, normalize) pairs: the identity map has a signed normaliser, so it is unnormalised only.
MAP_CASES = [
    (name, norm) for name in FEATURE_MAPS for norm in (True, False) if not (name == "identity" and norm)
]
MAP_IDS = [f"{name}-{'norm' if norm else 'raw'}" for name, norm in MAP_CASES]
SHAPES = [(1, 1), (7, 7), (5, 9), (9, 4), (1, 6)]  # (T, S): T=1, S != T both ways


def make_qkv(B=2, H=2, T=7, S=None, D=5, D_v=3, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, H, T, D, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, S, D, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, D_v, generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v


def make_state(B, H, features, D_v, normalize, seed=1):
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn(B, H, features, D_v, generator=generator, dtype=torch.float64)
    if not normalize:
        return state
    return state, torch.rand(B, H, features, generator=generator, dtype=torch.float64) + 0.5


def naive_linear_attention(q, k, v, phi, *, causal, normalize, scale=None, eps=1e-6, state=None):
    """Loop over (query, key) pairs in float64 with the end-aligned causal rule j <= S - T + i."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    phi_q, phi_k = phi(q) * scale, phi(k)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        numerator = torch.zeros(B, H, v.shape[-1], dtype=torch.float64)
        denominator = torch.zeros(B, H, dtype=torch.float64)
        if state is not None:
            S0, z0 = state if normalize else (state, torch.zeros(phi_k.shape[:2] + phi_k.shape[-1:]))
            numerator += torch.einsum("bhf,bhfd->bhd", phi_q[:, :, i], S0.double())
            denominator += torch.einsum("bhf,bhf->bh", phi_q[:, :, i], z0.double())
        for j in range(S):
            if causal and j > S - T + i:
                continue
            weight = (phi_q[:, :, i] * phi_k[:, :, j]).sum(-1)
            numerator += weight[..., None] * v[:, :, j]
            denominator += weight
        out[:, :, i] = numerator / (denominator + eps)[..., None] if normalize else numerator
    return out


def run_all_forms(q, k, v, chunk_sizes=(1, 3, 16), **kwargs):
    runs = {"parallel": linear_attention(q, k, v, form="parallel", output_final_state=True, **kwargs)}
    runs["recurrent"] = linear_attention(q, k, v, form="recurrent", output_final_state=True, **kwargs)
    for c in chunk_sizes:
        runs[f"chunk{c}"] = linear_attention(
            q, k, v, form="chunk", chunk_size=c, output_final_state=True, **kwargs
        )
    return runs


def assert_states_close(a, b, **tol):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b) == 2
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


# --- feature maps -------------------------------------------------------------------------------


def test_simple_feature_maps_match_their_formulas():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    expected_elu = torch.where(x > 0, x + 1, torch.exp(x))
    torch.testing.assert_close(elu_plus_one(x), expected_elu)
    assert bool((elu_plus_one(x) > 0).all())
    torch.testing.assert_close(relu_map(x), torch.tensor([0.0, 0.0, 0.0, 0.5, 3.0], dtype=torch.float64))
    assert identity_map(x) is x


# --- the three forms agree ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("map_name", "normalize"), MAP_CASES, ids=MAP_IDS)
def test_parallel_form_matches_naive_loop(map_name, normalize, causal):
    for T, S in SHAPES:
        q, k, v = make_qkv(T=T, S=S)
        phi = FEATURE_MAPS[map_name](q.shape[-1])
        expected = naive_linear_attention(q, k, v, phi, causal=causal, normalize=normalize)
        got = linear_attention(q, k, v, feature_map=phi, causal=causal, normalize=normalize, form="parallel")
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("map_name", "normalize"), MAP_CASES, ids=MAP_IDS)
def test_three_forms_agree_float64(map_name, normalize, causal):
    for T, S in SHAPES:
        q, k, v = make_qkv(T=T, S=S)
        phi = FEATURE_MAPS[map_name](q.shape[-1])
        runs = run_all_forms(q, k, v, feature_map=phi, causal=causal, normalize=normalize)
        reference_out, reference_state = runs.pop("parallel")
        for name, (out, state) in runs.items():
            torch.testing.assert_close(out, reference_out, rtol=1e-10, atol=1e-12, msg=f"{name} T={T} S={S}")
            assert_states_close(state, reference_state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("map_name", "normalize"), MAP_CASES, ids=MAP_IDS)
def test_three_forms_agree_float32_with_initial_state(map_name, normalize, causal):
    q, k, v = make_qkv(T=11, S=11, dtype=torch.float32)
    phi = FEATURE_MAPS[map_name](q.shape[-1])
    features = phi(q).shape[-1]
    state = make_state(2, 2, features, 3, normalize)
    state = tuple(s.float() for s in state) if normalize else state.float()
    expected = naive_linear_attention(q, k, v, phi, causal=causal, normalize=normalize, state=state)
    options = dict(feature_map=phi, causal=causal, normalize=normalize, initial_state=state)
    runs = run_all_forms(q, k, v, chunk_sizes=(1, 4, 64), **options)
    for name, (out, _) in runs.items():
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


@given(
    T=st.integers(1, 12),
    S=st.integers(1, 12),
    D=st.integers(1, 6),
    chunk_size=st.integers(1, 14),
    causal=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunk_equals_parallel_property(T, S, D, chunk_size, causal, seed):
    q, k, v = make_qkv(B=1, H=2, T=T, S=S, D=D, D_v=2, seed=seed)
    expected = linear_attention(q, k, v, causal=causal, form="parallel")
    got = linear_attention(q, k, v, causal=causal, form="chunk", chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_identity_map_is_masked_q_k_transpose_v():
    q, k, v = make_qkv(T=6, D=4)
    scores = torch.tril(q @ k.transpose(-1, -2)) * 4**-0.5
    got = linear_attention(q, k, v, feature_map=identity_map, normalize=False, form="chunk", chunk_size=4)
    torch.testing.assert_close(got, scores @ v)


# --- states: format and continuation ------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_final_state_format(normalize):
    q, k, v = make_qkv(T=5, D=4, D_v=3)
    phi = favor_plus(4, 6, seed=0)
    _, state = linear_attention(q, k, v, feature_map=phi, normalize=normalize, output_final_state=True)
    phi_k = phi(k)
    expected_S = torch.einsum("bhsf,bhsd->bhfd", phi_k, v)
    if normalize:
        S, z = state
        assert S.shape == (2, 2, 6, 3) and z.shape == (2, 2, 6)
        torch.testing.assert_close(S, expected_S)
        torch.testing.assert_close(z, phi_k.sum(2))
    else:
        assert isinstance(state, torch.Tensor)
        torch.testing.assert_close(state, expected_S)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_two_halves_with_state_equal_one_run(form, normalize):
    q, k, v = make_qkv(T=11)
    phi = elu_plus_one if normalize else identity_map
    kwargs = dict(feature_map=phi, normalize=normalize, form=form, chunk_size=3)
    whole, whole_state = linear_attention(q, k, v, output_final_state=True, **kwargs)
    cut = 5
    first, state = linear_attention(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], output_final_state=True, **kwargs
    )
    second, final = linear_attention(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=state, output_final_state=True, **kwargs
    )
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole)
    assert_states_close(final, whole_state)


def test_token_by_token_decoding_equals_one_run():
    q, k, v = make_qkv(T=6)
    whole = linear_attention(q, k, v, form="parallel")
    state, outputs = None, []
    for t in range(6):
        o, state = linear_attention(
            q[:, :, t : t + 1],
            k[:, :, t : t + 1],
            v[:, :, t : t + 1],
            initial_state=state,
            output_final_state=True,
        )
        outputs.append(o)
    torch.testing.assert_close(torch.cat(outputs, dim=2), whole)


def test_bidirectional_reads_initial_state_plus_all_keys():
    q, k, v = make_qkv(T=4, S=6)
    _, state = linear_attention(q, k[:, :, :3], v[:, :, :3], causal=False, output_final_state=True)
    got = linear_attention(q, k[:, :, 3:], v[:, :, 3:], causal=False, initial_state=state, form="recurrent")
    torch.testing.assert_close(got, linear_attention(q, k, v, causal=False, form="parallel"))


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_chunk_and_recurrent_gradients_agree(causal):
    q, k, v = make_qkv(T=7)
    S0, z0 = make_state(2, 2, 5, 3, normalize=True)
    grads = []
    for form in ("chunk", "recurrent"):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, S0, z0)]
        options = dict(causal=causal, form=form, chunk_size=3, output_final_state=True)
        o, (S, z) = linear_attention(*inputs[:3], initial_state=tuple(inputs[3:]), **options)
        loss = (
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
            + S.sum()
            + z.square().sum()
        )
        grads.append(torch.autograd.grad(loss, inputs))
    for name, a, b in zip(["q", "k", "v", "S0", "z0"], *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_gradcheck(form):
    q, k, v = make_qkv(B=1, H=1, T=4, D=3, D_v=2)
    S0, z0 = make_state(1, 1, 3, 2, normalize=True)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, S0, z0))

    def f(q, k, v, S0, z0):
        return linear_attention(q, k, v, form=form, chunk_size=3, initial_state=(S0, z0))

    assert torch.autograd.gradcheck(f, inputs)


# --- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_queries_that_see_nothing_return_zeros(form):
    q, k, v = make_qkv(T=6, S=2)  # causal, end-aligned: the first 4 queries see no key
    out = linear_attention(q, k, v, form=form, chunk_size=4)
    assert torch.isfinite(out).all()
    assert bool((out[:, :, :4] == 0).all()) and bool((out[:, :, 4:] != 0).any())
    # ReLU features of an all-negative query are all zero: the normaliser is zero, the output too.
    negative_q = -q.abs() - 0.1
    out = linear_attention(negative_q, k, v, feature_map=relu_map, form=form, causal=False)
    assert torch.isfinite(out).all() and bool((out == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_half_precision(dtype, form):
    q, k, v = make_qkv(T=9, D=8, dtype=dtype)
    out, (S, z) = linear_attention(q, k, v, form=form, chunk_size=4, output_final_state=True)
    assert out.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    expected = naive_linear_attention(q, k, v, elu_plus_one, causal=True, normalize=True)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_batch_invariance():
    q, k, v = make_qkv(B=3, T=5)
    whole = linear_attention(q, k, v, chunk_size=2)
    alone = linear_attention(q[1:2], k[1:2], v[1:2], chunk_size=2)
    torch.testing.assert_close(whole[1:2], alone)


# --- the implied attention matrix ---------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("map_name", "normalize"), MAP_CASES, ids=MAP_IDS)
def test_attention_matrix_reproduces_outputs(map_name, normalize, causal):
    for T, S in [(6, 6), (3, 8), (8, 3)]:
        q, k, v = make_qkv(T=T, S=S)
        phi = FEATURE_MAPS[map_name](q.shape[-1])
        matrix = linear_attention_matrix(q, k, feature_map=phi, causal=causal, normalize=normalize)
        assert matrix.shape == (2, 2, T, S)
        for form in ("parallel", "recurrent"):
            out = linear_attention(q, k, v, feature_map=phi, causal=causal, normalize=normalize, form=form)
            torch.testing.assert_close(matrix @ v, out)


def test_attention_matrix_rank_is_at_most_feature_count():
    q, k, _ = make_qkv(B=1, H=1, T=20, S=20, D=3)
    matrix = linear_attention_matrix(q, k, feature_map=relu_map, causal=False, normalize=False)
    assert torch.linalg.matrix_rank(matrix[0, 0]).item() <= 3
    normalized = linear_attention_matrix(q, k, causal=True, eps=1e-12)  # rows sum to den / (den + eps)
    torch.testing.assert_close(normalized.sum(-1), torch.ones(1, 1, 20, dtype=torch.float64))


# --- FAVOR+ -------------------------------------------------------------------------------------


def kernel_estimates(x, y, num_features, seeds, orthogonal):
    estimates = []
    for seed in seeds:
        phi = favor_plus(x.shape[-1], num_features, seed=seed, orthogonal=orthogonal)
        estimates.append((phi(x) * phi(y)).sum(-1))
    return torch.stack(estimates)


def test_favor_features_are_positive_and_seeded():
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    a, b, c = favor_plus(8, 16, seed=1), favor_plus(8, 16, seed=1), favor_plus(8, 16, seed=2)
    assert isinstance(a, FavorPlus) and a(x).shape == (3, 4, 16) and bool((a(x) > 0).all())
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    first = a.projection.clone()
    a.redraw()
    assert not torch.allclose(a.projection, first)
    b.redraw()
    torch.testing.assert_close(a.projection, b.projection)  # redraws follow the map's own seeded stream
    a.redraw(generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.projection, c.projection)


def test_favor_orthogonal_rows_within_a_block():
    phi = favor_plus(6, 15, seed=0)  # blocks of 6, 6 and 3 rows
    directions = phi.projection / phi.projection.norm(dim=1, keepdim=True)
    for start, stop in [(0, 6), (6, 12), (12, 15)]:
        block = directions[start:stop]
        torch.testing.assert_close(block @ block.T, torch.eye(stop - start, dtype=torch.float64))


@pytest.mark.parametrize("orthogonal", [False, True], ids=["iid", "orthogonal"])
def test_favor_is_unbiased(orthogonal):
    generator = torch.Generator().manual_seed(7)
    d, m, N = 4, 8, 600
    x = 0.6 * torch.randn(d, generator=generator, dtype=torch.float64)
    y = 0.6 * torch.randn(d, generator=generator, dtype=torch.float64)
    exact = math.exp(float(x @ y) * d**-0.5)
    estimates = kernel_estimates(x, y, m, range(N), orthogonal)
    # Honest tolerance: 4.5 standard errors. For iid features the variance of one feature's estimate
    # is E[exp(2 w.(x'+y'))] exp(-|x'|^2 - |y'|^2) - exp(2 x'.y') = exp(2 x'.y') (exp(|x'+y'|^2) - 1)
    # with x' = x d^-1/4; orthogonal features have no closed form here, so their standard error is
    # estimated from the sample.
    xs, ys = x * d**-0.25, y * d**-0.25
    iid_variance = math.exp(2 * float(xs @ ys)) * (math.exp(float((xs + ys).square().sum())) - 1) / m
    standard_error = math.sqrt((iid_variance if not orthogonal else estimates.var().item()) / N)
    assert abs(estimates.mean().item() - exact) < 4.5 * standard_error
    assert standard_error < 0.05 * exact  # the test has the power to see a 25% bias


@pytest.mark.parametrize("orthogonal", [False, True], ids=["iid", "orthogonal"])
def test_favor_error_falls_with_more_features(orthogonal):
    generator = torch.Generator().manual_seed(3)
    x = 0.6 * torch.randn(8, generator=generator, dtype=torch.float64)
    y = 0.6 * torch.randn(8, generator=generator, dtype=torch.float64)
    exact = math.exp(float(x @ y) * 8**-0.5)
    mse = {
        m: (kernel_estimates(x, y, m, range(150), orthogonal) - exact).square().mean().item() for m in (4, 64)
    }
    assert mse[64] < mse[4] / 4  # the variance falls like 1/m: 16x in expectation


def test_favor_linear_attention_approaches_softmax_attention():
    q, k, v = make_qkv(B=1, H=2, T=16, D=8, D_v=4, dtype=torch.float32)
    q, k = 0.5 * q, 0.5 * k
    reference = F_.scaled_dot_product_attention(q, k, v)  # non-causal softmax attention, scale D^-0.5
    errors = {}
    for m in (8, 1024):
        outs = [
            linear_attention(q, k, v, feature_map=favor_plus(8, m, seed=s), causal=False) for s in range(5)
        ]
        errors[m] = sum((o - reference).square().mean().item() for o in outs) / 5
    assert errors[1024] < errors[8] / 8


# --- efficient attention ------------------------------------------------------------------------


def test_efficient_attention_matches_formula():
    for T, S, D in [(1, 1, 1), (5, 7, 3), (6, 4, 5)]:
        q, k, v = make_qkv(T=T, S=S, D=D, D_v=2)
        query_weights = torch.exp(q) / torch.exp(q).sum(dim=3, keepdim=True)  # over the D features
        key_weights = torch.exp(k) / torch.exp(k).sum(dim=2, keepdim=True)  # over the S positions
        expected = torch.einsum("bhtd,bhsd,bhse->bhte", query_weights, key_weights, v)
        torch.testing.assert_close(efficient_attention(q, k, v), expected)


def test_efficient_attention_rows_sum_to_one():
    q, k, _ = make_qkv(T=5, S=9, D=4)
    identity_values = torch.eye(9, dtype=torch.float64).expand(2, 2, 9, 9)
    implied = efficient_attention(q, k, identity_values)  # o = A I = A, the implied (T, S) matrix
    assert bool((implied >= 0).all())
    torch.testing.assert_close(implied.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    # The softmax over K's last dimension (the mistake in one source) does not give rows summing to 1.
    wrong = torch.softmax(q, -1) @ torch.softmax(k, -1).transpose(-1, -2)
    assert (wrong.sum(-1) - 1).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_efficient_attention_half_precision(dtype):
    q, k, v = make_qkv(T=6, S=5, D=8)
    out = efficient_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), efficient_attention(q, k, v), rtol=2e-2, atol=2e-2)


# --- Linformer ----------------------------------------------------------------------------------


def reference_linformer(q, k, v, E, F, scale):
    H = q.shape[1]
    E, F = E.expand(H, *E.shape[-2:]), F.expand(H, *F.shape[-2:])  # one (P, S) projection per head
    projected_k = torch.einsum("hps,bhsd->bhpd", E, k)
    projected_v = torch.einsum("hps,bhsd->bhpd", F, v)
    weights = torch.softmax(torch.einsum("bhtd,bhpd->bhtp", q, projected_k) * scale, dim=-1)
    return weights @ projected_v


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_linformer_matches_reference(per_head):
    q, k, v = make_qkv(T=3, S=7, D=5, D_v=2)
    shape = (2, 4, 7) if per_head else (4, 7)
    E, F = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    out = linformer_attention(q, k, v, E, F)
    assert out.shape == (2, 2, 3, 2)
    torch.testing.assert_close(out, reference_linformer(q, k, v, E, F, 5**-0.5))


def test_linformer_with_identity_projection_is_softmax_attention():
    q, k, v = make_qkv(T=4, S=6)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(
        linformer_attention(q, k, v, eye, eye), F_.scaled_dot_product_attention(q, k, v)
    )


def test_linformer_padding_drops_padded_positions():
    q, k, v = make_qkv(B=2, T=3, S=6)
    E, F = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = linformer_attention(q, k, v, E, F, key_padding_mask=mask)
    short = linformer_attention(q[1:], k[1:, :, :4], v[1:, :, :4], E[:, :4], F[:, :4])
    torch.testing.assert_close(out[1:], short)
    torch.testing.assert_close(out[:1], linformer_attention(q[:1], k[:1], v[:1], E, F))
    empty = linformer_attention(q, k, v, E, F, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert bool((empty == 0).all())


def test_linformer_rejects_causal():
    q, k, v = make_qkv(T=4)
    E = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="causal"):
        linformer_attention(q, k, v, E, E, causal=True)


def test_linformer_layer():
    layer = LinformerAttention(embed_dim=8, num_heads=2, max_len=10, proj_len=3)
    x = torch.randn(2, 7, 8)
    out = layer(x)
    assert out.shape == (2, 7, 8)
    out.square().sum().backward()
    assert layer.E.grad is not None and layer.F.grad is not None and layer.E.grad[:, 7:].abs().sum() == 0
    shared = LinformerAttention(8, 2, 10, 3, share_kv=True)
    assert shared.E is shared.F and len(list(shared.parameters())) == 5
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(1, 11, 8))


# --- bad input ----------------------------------------------------------------------------------


Q, K, V = make_qkv(T=4)

LINEAR_BAD = [
    (dict(q=Q[0]), ValueError, "q"),
    (dict(k=K[..., :3]), ValueError, "k"),
    (dict(v=V.float()), TypeError, "q, k and v"),
    (dict(feature_map="elu"), TypeError, "feature_map"),
    (dict(feature_map=lambda x: x[..., :2, :]), ValueError, "feature_map"),
    (dict(feature_map=identity_map), ValueError, "normalize"),
    (dict(form="fast"), ValueError, "form"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(causal=1), TypeError, "causal"),
    (dict(normalize=None), TypeError, "normalize"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(output_final_state="yes"), TypeError, "output_final_state"),
    (dict(initial_state=torch.zeros(2, 2, 5, 3)), TypeError, "initial_state"),
    (dict(initial_state=(torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 5))), ValueError, r"initial_state\[0\]"),
    (dict(initial_state=(torch.zeros(2, 2, 5, 3), torch.zeros(2, 5))), ValueError, r"initial_state\[1\]"),
    (dict(normalize=False, initial_state=torch.zeros(2, 2, 5, 2)), ValueError, "initial_state"),
]


@pytest.mark.parametrize(
    ("override", "error", "name"),
    LINEAR_BAD,
    ids=["-".join(c[0]) + f"-{i}" for i, c in enumerate(LINEAR_BAD)],
)
def test_linear_attention_bad_input(override, error, name):
    args = dict(q=Q, k=K, v=V)
    args.update(override)
    with pytest.raises(error, match=name):
        linear_attention(**args)


def test_feature_maps_and_matrix_bad_input():
    for feature_map in (elu_plus_one, relu_map, identity_map):
        with pytest.raises(TypeError, match="x"):
            feature_map([1.0, 2.0])
    with pytest.raises(ValueError, match="head_dim"):
        favor_plus(0)
    with pytest.raises(ValueError, match="num_features"):
        favor_plus(4, 0)
    with pytest.raises(ValueError, match="seed"):
        favor_plus(4, seed=-1)
    with pytest.raises(ValueError, match="seed and generator"):
        favor_plus(4, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        favor_plus(4, generator=1)
    with pytest.raises(ValueError, match="scale"):
        favor_plus(4, scale=-1.0)  # exp(-q.k) is not a kernel positive features can estimate
    with pytest.raises(ValueError, match="scale"):
        favor_plus(4, scale=float("inf"))
    with pytest.raises(ValueError, match="scale"):
        linear_attention_matrix(Q, K, scale=float("nan"))
    with pytest.raises(TypeError, match="orthogonal"):
        favor_plus(4, orthogonal="yes")
    with pytest.raises(ValueError, match="head_dim=4"):
        favor_plus(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="k"):
        linear_attention_matrix(Q, K[0])
    with pytest.raises(TypeError, match="feature_map"):
        linear_attention_matrix(Q, K, feature_map=None)
    with pytest.raises(TypeError, match="causal"):
        linear_attention_matrix(Q, K, causal="no")


def test_efficient_and_linformer_bad_input():
    with pytest.raises(ValueError, match="q"):
        efficient_attention(Q[0], K, V)
    with pytest.raises(TypeError, match="q, k and v"):
        efficient_attention(Q.float(), K, V)
    E = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="E"):
        linformer_attention(Q, K, V, E[:, :3], E)
    with pytest.raises(ValueError, match="F"):
        linformer_attention(Q, K, V, E, torch.randn(3, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same length P"):
        linformer_attention(Q, K, V, E, E[:2])
    with pytest.raises(TypeError, match="E"):
        linformer_attention(Q, K, V, E.long(), E)
    with pytest.raises(TypeError, match="key_padding_mask"):
        linformer_attention(Q, K, V, E, E, key_padding_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        linformer_attention(Q, K, V, E, E, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            linformer_attention(Q, K, V, E, E, scale=bad)
    with pytest.raises(ValueError, match="num_heads"):
        LinformerAttention(8, 3, 10, 2)
    with pytest.raises(ValueError, match="proj_len"):
        LinformerAttention(8, 2, 10, 0)
    with pytest.raises(ValueError, match="embed_dim"):
        LinformerAttention(8, 2, 10, 2)(torch.randn(1, 4, 6))


# --- the scale rule and empty sequences ---------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.7], ids=["zero", "negative"])
def test_any_finite_scale_is_used_as_given(scale):
    q, k, v = make_qkv(T=5, S=6)
    for form in FORMS:
        got = linear_attention(q, k, v, feature_map=identity_map, normalize=False, form=form, scale=scale)
        expected = naive_linear_attention(q, k, v, identity_map, causal=True, normalize=False, scale=scale)
        torch.testing.assert_close(got, expected)
    matrix = linear_attention_matrix(q, k, feature_map=identity_map, normalize=False, scale=scale)
    torch.testing.assert_close(matrix, torch.tril(q @ k.transpose(-1, -2), diagonal=1) * scale)
    eye = torch.eye(6, dtype=torch.float64)
    got = linformer_attention(q, k, v, eye, eye, scale=scale)
    torch.testing.assert_close(got, F_.scaled_dot_product_attention(q, k, v, scale=scale))


def test_favor_with_scale_zero_is_the_constant_kernel():
    phi = favor_plus(4, 6, scale=0.0, seed=0)
    features = phi(torch.randn(3, 4, dtype=torch.float64))
    torch.testing.assert_close(features @ features.T, torch.ones(3, 3, dtype=torch.float64))  # exp(0 * q.k)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_no_queries_give_an_empty_output_and_the_state_of_every_key(form, causal, normalize):
    phi = elu_plus_one if normalize else identity_map
    initial = make_state(2, 2, 5, 3, normalize)
    for S in (0, 4):
        q, k, v = make_qkv(T=0, S=S)
        out, state = linear_attention(
            q,
            k,
            v,
            feature_map=phi,
            normalize=normalize,
            causal=causal,
            form=form,
            chunk_size=3,
            initial_state=initial,
            output_final_state=True,
        )
        assert out.shape == (2, 2, 0, 3)
        # The final state is the initial one plus every key of the call (none when S = 0).
        _, expected = linear_attention(
            torch.zeros(2, 2, 1, 5, dtype=torch.float64),
            k,
            v,
            feature_map=phi,
            normalize=normalize,
            causal=False,
            form="parallel",
            initial_state=initial,
            output_final_state=True,
        )
        assert_states_close(state, expected)
        if S == 0:
            assert_states_close(state, initial)
