"""The chapter 07 mixer layers: forms agree at layer level, causality, batch independence,
gradients to every parameter, one layer against a from-scratch reference, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_lib.recurrent import (
    MIXERS,
    DeltaNetMixer,
    Mamba2Mixer,
    RetNetMixer,
    TTTLinearMixer,
    retnet_gammas,
)

F64 = torch.float64
NAMES = sorted(MIXERS)


def make(name, d_model=24, num_heads=3, chunk_size=16, dtype=F64, seed=0, **options):
    torch.manual_seed(seed)
    return MIXERS[name](d_model, num_heads, chunk_size=chunk_size, **options).to(dtype)


def inputs(B=2, T=37, d_model=24, dtype=F64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d_model, generator=generator, dtype=dtype)


def test_the_registry_names_every_method():
    assert {"retnet", "gla", "mamba2", "mlstm", "deltanet", "gated_deltanet", "ttt_linear"} <= set(MIXERS)
    for cls in MIXERS.values():
        assert issubclass(cls, torch.nn.Module)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 16, 37])
def test_chunk_forward_equals_the_token_by_token_recurrence(name, T):
    layer = make(name)
    x = inputs(T=T)
    chunked = layer(x)
    assert chunked.shape == x.shape
    torch.testing.assert_close(chunked, layer(x, form="recurrent"), rtol=1e-9, atol=1e-10)
    # The form chosen at construction is the default of forward.
    layer.form = "recurrent"
    torch.testing.assert_close(layer(x), chunked, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_float32_forms_agree_closely(name):
    layer = make(name, dtype=torch.float32)
    x = inputs(T=50, dtype=torch.float32)
    torch.testing.assert_close(layer(x), layer(x, form="recurrent"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [0, 15, 30])
def test_causal_later_tokens_do_not_change_earlier_outputs(name, t):
    layer = make(name)
    x = inputs(T=37)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(
        changed[:, t + 1 :].shape, dtype=F64, generator=torch.Generator().manual_seed(9)
    )
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


@pytest.mark.parametrize("name", NAMES)
def test_sequences_of_a_batch_do_not_mix(name):
    layer = make(name)
    x = inputs(B=3, T=20)
    together = layer(x)
    for b in range(3):
        torch.testing.assert_close(layer(x[b : b + 1]), together[b : b + 1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_gradients_reach_every_parameter(name, form):
    layer = make(name)
    x = inputs(T=21).requires_grad_()
    layer(x, form=form).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_of_the_two_forms_agree(name):
    layer = make(name)
    x = inputs(T=19)
    grads = []
    for form in ("chunk", "recurrent"):
        layer.zero_grad()
        layer(x, form=form).sin().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for chunked, recurrent in zip(*grads):
        torch.testing.assert_close(chunked, recurrent, rtol=1e-8, atol=1e-10)


def test_deltanet_layer_matches_a_reference_written_from_its_description():
    """Short causal conv + SiLU on q, k, v; L2-normalised q, k; beta = sigmoid; the delta rule
    as a plain loop; per-head RMSNorm; output projection."""
    layer = make("deltanet", d_model=12, num_heads=2, chunk_size=4)
    x = inputs(B=1, T=9, d_model=12)
    H, D, K = 2, 6, layer.conv_size
    qkv = torch.cat([x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T, x @ layer.v_proj.weight.T], -1)
    weight, bias = layer.conv.conv.weight[:, 0], layer.conv.conv.bias  # (C, K), (C,)
    T = x.shape[1]
    conv = torch.stack(
        [bias + sum(weight[:, K - 1 - j] * qkv[0, t - j] for j in range(K) if t - j >= 0) for t in range(T)]
    )
    conv = F.silu(conv)
    q, k, v = (conv[:, i * H * D : (i + 1) * H * D].view(T, H, D) for i in range(3))
    beta = torch.sigmoid(x[0] @ layer.beta_proj.weight.T + layer.beta_proj.bias)  # (T, H)
    out = torch.zeros(T, H, D, dtype=F64)
    for h in range(H):
        S = torch.zeros(D, D, dtype=F64)
        for t in range(T):
            kt, qt = k[t, h] / k[t, h].norm(), q[t, h] / q[t, h].norm()
            S = S + beta[t, h] * torch.outer(kt, v[t, h] - S.T @ kt)
            o = S.T @ qt * D**-0.5
            out[t, h] = o / torch.sqrt(o.pow(2).mean() + 1e-6) * layer.norm.weight
    expected = out.reshape(T, H * D) @ layer.o_proj.weight.T
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-9, atol=1e-10)


def test_retnet_layer_uses_the_papers_fixed_decays():
    layer = RetNetMixer(16, 4)
    torch.testing.assert_close(layer.log_decay.double().exp(), retnet_gammas(4), rtol=1e-6, atol=0)
    assert "log_decay" not in dict(layer.named_parameters())


def test_ttt_with_mini_batch_one_is_deltanet_with_lr_as_beta():
    """Same weights, lr projection copied into DeltaNet's beta projection: equal outputs (the
    layers differ only in TTT's swish output gate, removed here)."""
    ttt = make("ttt_linear", d_model=12, num_heads=2, chunk_size=4, mini_batch_size=1)
    delta = make("deltanet", d_model=12, num_heads=2, chunk_size=4)
    delta.load_state_dict(
        {k.replace("lr_proj", "beta_proj"): v for k, v in ttt.state_dict().items()}, strict=False
    )
    ttt.gate_proj = None
    x = inputs(B=1, T=11, d_model=12)
    torch.testing.assert_close(ttt(x), delta(x), rtol=1e-9, atol=1e-10)


def test_mamba2_sizes():
    layer = Mamba2Mixer(16, 4, expand=2, state_size=8)
    assert layer.head_dim == 8 and layer.d_inner == 32
    assert layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_bad_input_is_rejected_with_the_argument_named():
    layer = make("gla")
    with pytest.raises(ValueError, match="x must have 3 dims"):
        layer(torch.randn(24, dtype=F64))
    with pytest.raises(ValueError, match="d_model=24"):
        layer(torch.randn(1, 4, 10, dtype=F64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0]])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(1, 4, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="form='parallel'"):
        layer(inputs(d_model=24), form="parallel")
    with pytest.raises(ValueError, match="num_heads=5 must divide d_model=24"):
        MIXERS["deltanet"](24, 5)
    with pytest.raises(ValueError, match="chunk_size=0"):
        MIXERS["retnet"](24, 4, chunk_size=0)
    with pytest.raises(ValueError, match="mini_batch_size=16 must divide chunk_size=24"):
        TTTLinearMixer(24, 4, chunk_size=24)
    with pytest.raises(ValueError, match="form='parallel'"):
        MIXERS["mlstm"](24, 4, form="parallel")
    with pytest.raises(ValueError, match="num_heads=5 must divide expand \\* d_model=48"):
        Mamba2Mixer(24, 5)
    with pytest.raises(TypeError, match="conv_size must be an int"):
        DeltaNetMixer(24, 4, conv_size=2.5)
