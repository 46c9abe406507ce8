"""The catalogue of mechanisms: one declaration per mechanism, and the contract every entry keeps.

The tests below iterate the catalogue, so a new declaration is checked without editing this
file: its inputs run, its causal mechanisms do not look ahead, its forms agree, its decoding
step equals the last row of a full pass, and its declared state size equals the state it keeps.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from course_lib import catalogue
from course_lib.catalogue import Geometry, Mechanism, compact, specialised
from course_lib.studies.phases import decode_last  # one decoding step, as chapter 08's decode phase runs it

F64 = torch.float64
SMALL = Geometry(batch=2, heads=2, head_dim=8, kv_heads=1)
RUNNABLE = catalogue.mechanisms(has="run")
CAUSAL = [m for m in RUNNABLE if m.causal]
IDS = lambda m: m.name  # noqa: E731


def output(result):
    return result[0] if isinstance(result, tuple) else result


def numel(state) -> int:
    return sum(part.numel() for part in state) if isinstance(state, tuple) else state.numel()


# --- the registry -------------------------------------------------------------------------------


def test_names_are_unique_and_lookup_is_by_name():
    names = catalogue.names()
    assert len(names) == len(set(names)) >= 20
    for name in names:
        assert catalogue.get(name).name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="name='softmax'.*gla"):
        catalogue.get("softmax")
    with pytest.raises(TypeError, match="name"):
        catalogue.get(3)


def test_declaring_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="declared twice"):
        catalogue.register(catalogue.get("gla"))
    with pytest.raises(TypeError, match="mechanism"):
        catalogue.register("gla")


def test_filters():
    assert set(catalogue.names(family="linear")) >= {"linear_attention", "gla", "deltanet"}
    assert all(m.chapter == 7 for m in catalogue.mechanisms(chapter=7))
    assert all(m.has("mixer") and m.has("decode") for m in catalogue.mechanisms(has=("mixer", "decode")))
    chapters = [m.chapter for m in catalogue.mechanisms()]
    assert chapters == sorted(chapters)
    with pytest.raises(ValueError, match="family"):
        catalogue.mechanisms(family="fast")
    with pytest.raises(ValueError, match="capability"):
        catalogue.mechanisms(has="speed")


def test_a_declaration_checks_itself():
    with pytest.raises(ValueError, match="family"):
        Mechanism("x", "x", "fast", 1, "", "", function=len)
    with pytest.raises(ValueError, match="inputs and call"):
        Mechanism("x", "x", "exact", 1, "", "", function=len, inputs=lambda T, g, gen: {})
    with pytest.raises(ValueError, match="decode"):
        Mechanism("x", "x", "exact", 1, "", "", function=len, decode="both")


def test_lookup_never_depends_on_import_order():
    # A fresh interpreter that imports nothing else first.
    code = "from course_lib.catalogue import get; print(get('gla').title, get('mamba2').chapter)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["GLA", "7"]


# --- every runnable mechanism -------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", RUNNABLE, ids=IDS)
@pytest.mark.parametrize("T", [1, 19])
def test_runs_on_its_inputs(mechanism, T):
    x = mechanism.make_inputs(T, SMALL, dtype=F64, seed=3)
    o = output(mechanism.run(x))
    # (B, H, T, D_v); Mamba-1 has no heads and returns all H * D_v channels as one
    assert o.shape[0] == SMALL.batch and o.shape[2] == T and o.shape[1] * o.shape[3] == SMALL.heads * SMALL.dv
    assert o.dtype == F64 and torch.isfinite(o).all()


@pytest.mark.parametrize("mechanism", RUNNABLE, ids=IDS)
def test_inputs_are_seeded(mechanism):
    a, b, c = (mechanism.make_inputs(11, SMALL, seed=s) for s in (1, 1, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a if key not in mechanism.static_inputs)
    assert set(mechanism.trainable) <= set(a)


@pytest.mark.parametrize("mechanism", CAUSAL, ids=IDS)
def test_causal_mechanisms_do_not_look_ahead(mechanism):
    T = 23
    x, other = (mechanism.make_inputs(T, SMALL, dtype=F64, seed=s) for s in (4, 40))
    changed = {  # the last token's inputs replaced by another draw from the same distribution
        key: value
        if key in mechanism.static_inputs
        else torch.cat([value[:, :, :-1], other[key][:, :, -1:]], 2)
        for key, value in x.items()
    }
    before, after = output(mechanism.run(x)), output(mechanism.run(changed))
    torch.testing.assert_close(before[:, :, :-1], after[:, :, :-1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before[:, :, -1], after[:, :, -1])


@pytest.mark.parametrize("mechanism", [m for m in RUNNABLE if m.forms], ids=IDS)
def test_every_form_gives_the_same_numbers(mechanism):
    x = mechanism.make_inputs(21, SMALL, dtype=F64, seed=5)
    reference = output(mechanism.run(x, form=mechanism.forms[0]))
    for form in mechanism.forms[1:]:
        options = {"chunk_size": 16} if "chunk_size" in mechanism.options else {}
        torch.testing.assert_close(output(mechanism.run(x, form=form, **options)), reference)


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has="decode"), ids=IDS)
def test_decoding_one_token_equals_the_last_row_of_a_full_pass(mechanism):
    T = 17
    x = mechanism.make_inputs(T, SMALL, dtype=F64, seed=6)
    full = output(mechanism.run(x))
    step, _ = decode_last(mechanism, x, T)
    torch.testing.assert_close(output(step)[:, :, 0], full[:, :, -1])


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has=("decode", "state")), ids=IDS)
def test_declared_state_size_is_the_state_it_keeps(mechanism):
    one = Geometry(batch=1, heads=2, head_dim=8, kv_heads=1)
    T = 13
    x = mechanism.make_inputs(T, one, dtype=F64, seed=7)
    if mechanism.decode == "state":
        _, state = mechanism.run(x, output_final_state=True)
        kept = numel(state)
    elif mechanism.decoder is None:  # the keys and values a decoding step reads: what is not a query
        window = T if mechanism.cache_window is None else min(T, mechanism.cache_window)
        cached = set(x) - set(mechanism.query_inputs) - set(mechanism.static_inputs)
        assert cached, mechanism.name
        kept = sum(x[key][:, :, -window:].numel() for key in cached)
    else:  # a layer's own cache (MLA's latent and RoPE key): what it holds after token T
        cache = decode_last(mechanism, x, T)[1]
        assert all(part.shape[-2] == T for part in cache)  # (B, T, d) or (B, H, T, d): T tokens
        kept = numel(cache)
    # and the state the decode phase's step returns is that size too
    assert numel(decode_last(mechanism, x, T)[1]) == kept
    assert mechanism.state_numbers(T, one, **mechanism.options) == kept
    assert mechanism.state_bytes(T, one, dtype=torch.float16) == 2 * kept


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has="cost"), ids=IDS)
def test_cost_model(mechanism):
    g = Geometry()
    for phase in catalogue.PHASES:
        cost = mechanism.cost(phase, 1024, g)
        assert cost["flops"] > 0 and cost["bytes"] > 0
    train, prefill = mechanism.cost("train", 1024, g), mechanism.cost("prefill", 1024, g)
    assert train["flops"] == 3 * prefill["flops"]
    if not mechanism.has("decode"):
        return
    short, long = mechanism.cost("decode", 256, g), mechanism.cost("decode", 4096, g)
    if mechanism.decode == "state" or mechanism.cache_window:
        assert long == short  # a fixed-size state (or window): decoding cost does not grow with T
    else:  # a decoding step reads at least the cache it keeps
        grown = mechanism.state_bytes(4096, g) - mechanism.state_bytes(256, g)
        assert long["bytes"] - short["bytes"] >= grown > 0
        assert long["flops"] > short["flops"]


# --- mixers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has="mixer"), ids=IDS)
def test_mixers_are_causal_token_mixers(mechanism):
    torch.manual_seed(0)
    layer = mechanism.build_mixer(32, 4).double()
    x = torch.randn(2, 13, 32, dtype=F64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    changed = torch.cat([x[:, :-1], x[:, -1:] + 1.0], dim=1)
    torch.testing.assert_close(layer(changed)[:, :-1], y[:, :-1], rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_mechanism_without_a_mixer_says_which_have_one():
    with pytest.raises(ValueError, match="no token-mixer layer.*gla"):
        catalogue.get("sdpa").build_mixer(32, 4)


def test_gates_describe_the_recurrences():
    for mechanism in catalogue.mechanisms(has="gates"):
        assert mechanism.family == "linear" and "recurrent" in mechanism.forms
    assert catalogue.get("gla").gates.forget == "vector"
    assert catalogue.get("deltanet").gates.write == "delta"
    assert catalogue.get("retnet").gates.forget == "fixed"


def test_mixer_factories_name_their_options():
    # Studies pass each layer only the options it takes (e.g. the recall study's short convolution),
    # which they read off the factory's signature: a catch-all **options would hide a typo.
    import inspect

    for mechanism in catalogue.mechanisms(has="mixer"):
        parameters = inspect.signature(mechanism.mixer).parameters.values()
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters), mechanism.name


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has="run"), ids=IDS)
def test_every_mechanism_runs_on_an_empty_sequence(mechanism):
    """T = 0 gives an empty output (and a state, where there is one), never an error from torch."""
    result = mechanism.run(mechanism.make_inputs(0, Geometry(batch=2, heads=2, head_dim=8, kv_heads=1)))
    out = result[0] if isinstance(result, tuple) else result
    assert out.shape[0] == 2 and out.shape[2] == 0


# --- layers as functions (catalogue.layers): MLA and SwitchHead -----------------------------------


def test_a_declaration_checks_its_decoder_and_its_reason_not_to_run():
    run = {"inputs": lambda T, g, gen: {}, "call": lambda x: x}
    with pytest.raises(ValueError, match="decoder"):
        Mechanism("x", "x", "exact", 1, "", "", function=len, decoder=lambda x, T: None, **run)
    with pytest.raises(ValueError, match="not_run"):
        Mechanism("x", "x", "exact", 1, "", "", function=len, decode="cache", not_run="why", **run)


def test_every_entry_runs_or_says_why_not():
    for mechanism in catalogue.mechanisms():
        assert mechanism.has("run") != (mechanism.not_run is not None), mechanism.name
    assert {m.name for m in catalogue.mechanisms() if not m.has("run")} == {"ring", "hybrid"}
    layers = {m.name for m in RUNNABLE if m.layer}
    assert layers == {"mla", "switchhead"}


LAYER_FORMS = {"mla": compact.MLA_FORM, "switchhead": specialised.SWITCHHEAD_FORM}


def layer_output(name, layer, x, **options):
    """The real layer (not the functional call) on tokens (B, 1, T, C): what the entry must equal."""
    tokens = x["x"][:, 0]
    out = layer(tokens, mode=options.get("form", "naive")) if name == "mla" else layer(tokens, causal=True)
    return out.unsqueeze(1)


@pytest.mark.parametrize("name", LAYER_FORMS)
def test_a_layers_functional_form_is_the_layer_with_those_weights(name):
    mechanism, form = catalogue.get(name), LAYER_FORMS[name]
    x = mechanism.make_inputs(9, SMALL, dtype=F64, seed=1)
    assert set(x) == {"x", *form.weight_names} and x["x"].shape == (2, 1, 9, SMALL.heads * SMALL.head_dim)
    layer = form.module(x)
    assert all(p.data_ptr() == x[n].data_ptr() for n, p in layer.named_parameters())  # no copies
    for options in ({}, {"form": "absorbed"}) if name == "mla" else ({},):
        torch.testing.assert_close(mechanism.run(x, **options), layer_output(name, layer, x, **options))
    # the weights are the layer's own initialisation, seeded: same seed, same weights, any T
    again = mechanism.make_inputs(4, SMALL, dtype=F64, seed=1)
    assert all(torch.equal(x[n], again[n]) for n in form.weight_names)
    other = mechanism.make_inputs(9, SMALL, dtype=F64, seed=2)
    assert all(not torch.equal(x[n], other[n]) for n in form.weight_names)
    # float32 on request, like every input
    assert all(v.dtype == torch.float32 for v in mechanism.make_inputs(3, SMALL).values())


@pytest.mark.parametrize("name", LAYER_FORMS)
def test_the_train_step_differentiates_the_weights_like_the_layer(name):
    from course_lib.studies.phases import train_step

    mechanism, form = catalogue.get(name), LAYER_FORMS[name]
    x = mechanism.make_inputs(11, SMALL, dtype=F64, seed=3)
    grads = dict(zip(mechanism.trainable, train_step(mechanism, x)(), strict=True))
    assert set(grads) == {"x", *form.weight_names}
    # independent route: the real layer with leaf parameters, and ordinary backward
    layer = form.module({k: v.clone() for k, v in x.items()}).requires_grad_(True)
    tokens = x["x"].clone().requires_grad_(True)
    out = layer_output(name, layer, {"x": tokens})
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(grad_output)
    torch.testing.assert_close(grads["x"], tokens.grad)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_mla_decodes_from_its_latent_cache():
    from course_lib.standard import apply_rope
    from course_lib.studies.phases import decode_step

    mla = catalogue.get("mla")
    x = mla.make_inputs(12, SMALL, dtype=F64, seed=4)
    step = decode_step(mla, x, 10)
    first, (latent, rope_key) = step()
    again, _ = step()  # the cache was rolled back: the same token decodes again, to the same numbers
    torch.testing.assert_close(first, again)
    # what the cache keeps: the latent W_DKV x and the RoPE key RoPE(W_KR x) of the first 10 tokens
    tokens = x["x"][:, 0, :10]
    torch.testing.assert_close(latent, tokens @ x["kv_down.weight"].T)
    torch.testing.assert_close(rope_key, apply_rope(tokens @ x["key_rope.weight"].T, torch.arange(10)))
    latent_dim, rope_dim = compact._mla_dims(SMALL)
    assert latent.shape == (2, 10, latent_dim) and rope_key.shape == (2, 10, rope_dim)
    # d_c + d_R per token whatever the number of heads: with 2 heads of 8 it is more than multi-head
    # attention's 2 H d_h = 32, with 4 heads less (36 < 64); DeepSeek-V2 has 128 heads
    wider = Geometry(heads=4, head_dim=8)
    assert mla.state_numbers(10, SMALL) == mla.state_numbers(10, wider) == 10 * (latent_dim + rope_dim) == 360
    assert 360 > 10 * 2 * SMALL.heads * SMALL.head_dim and 360 < 10 * 2 * wider.heads * wider.head_dim
    # and the step is the last row of the full pass (rebuilt keys and values)
    full = mla.run(mla.tokens(x, 0, 10), form="naive")
    torch.testing.assert_close(first[:, :, 0], full[:, :, -1])


def test_switchhead_decodes_from_its_layers_kv_cache():
    from course_lib.studies.phases import decode_step

    switchhead = catalogue.get("switchhead")
    x = switchhead.make_inputs(8, SMALL, dtype=F64, seed=5)
    out, (keys, values) = decode_step(switchhead, x, 8)()
    H, D = SMALL.heads, SMALL.head_dim
    assert keys.shape == values.shape == (2, H, 8, D)
    torch.testing.assert_close(keys, (x["x"][:, 0] @ x["W_k.weight"].T).view(2, 8, H, D).transpose(1, 2))
    # values: each token's gated sum of its top-2 value experts, written densely here
    tokens = x["x"][:, 0]
    scores = torch.sigmoid(torch.einsum("btc,hce->bthe", tokens, x["value_router"]))
    chosen = scores >= scores.topk(specialised.SWITCH_TOP_K, dim=-1).values[..., -1:]
    every = torch.einsum("btc,hecd->bthed", tokens, x["value_experts"])
    expected = ((scores * chosen).unsqueeze(-1) * every).sum(3).transpose(1, 2)
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(out[:, :, 0], switchhead.run(x)[:, :, -1])


def test_differential_entry_is_the_difference_of_two_causal_softmax_maps():
    differential = catalogue.get("differential")
    x = differential.make_inputs(7, SMALL, dtype=F64, seed=6)
    assert x["q1"].shape[-1] == SMALL.head_dim // 2 and x["v"].shape[-1] == SMALL.dv
    assert ((x["lambda"] > 0.2) & (x["lambda"] < 0.8)).all()
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    scale = (SMALL.head_dim // 2) ** -0.5

    def weights(q, k):
        return torch.softmax((q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf")), -1)

    maps = weights(x["q1"], x["k1"]) - x["lambda"].view(1, -1, 1, 1) * weights(x["q2"], x["k2"])
    torch.testing.assert_close(differential.run(x), maps @ x["v"])


@pytest.mark.parametrize("name", LAYER_FORMS)
def test_a_layer_decoder_fills_its_cache_chunk_by_chunk(name, monkeypatch):
    from course_lib.catalogue import layers
    from course_lib.studies.phases import decode_step

    monkeypatch.setattr(layers, "PREFILL_CHUNK", 4)  # 10 cached tokens in chunks of 4, 4 and 2
    mechanism = catalogue.get(name)
    x = mechanism.make_inputs(11, SMALL, dtype=F64, seed=8)
    out, cache = decode_step(mechanism, x, 11)()
    torch.testing.assert_close(out[:, :, 0], mechanism.run(x)[:, :, -1])
    assert all(part.shape[-2] == 11 for part in cache)
