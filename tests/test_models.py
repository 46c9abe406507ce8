"""The tiny transformer: cached decoding equals the full forward, every mixer trains, the corpus is fixed."""

import math

import pytest
import torch
from torch import nn

from course_lib import decoding
from course_lib import models as m
from course_lib.kv_cache import gqa_attention
from course_lib.standard import apply_rope, attention

VARIANTS = [
    dict(attention="mha"),
    dict(attention="mqa"),
    dict(attention="gqa", num_kv_heads=2),
    dict(attention="mla", mla_mode="naive"),
    dict(attention="mla", mla_mode="absorbed"),
    dict(attention="mha", positions="rope"),
    dict(attention="gqa", positions="rope"),
    dict(attention="mla", positions="rope"),
]


def tiny(**overrides):
    config = dict(vocab_size=11, d_model=32, num_layers=2, num_heads=4, max_len=40) | overrides
    return m.TinyTransformer(m.ModelConfig(**config), seed=3).eval()


def random_tokens(B, T, V=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_prefill_then_decode_equals_the_full_forward(variant):
    model = tiny(**variant)
    tokens = random_tokens(2, 13)
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2)
        pieces = [model(tokens[:, :5], cache=cache)]  # prefill 5 tokens
        pieces += [model(tokens[:, t : t + 1], cache=cache) for t in range(5, 10)]  # 5 decode steps
        pieces.append(model(tokens[:, 10:], cache=cache))  # a chunk of 3
    assert cache.length(0) == cache.length(1) == 13
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS[:5], ids=lambda v: "-".join(map(str, v.values())))
def test_cached_generation_equals_uncached(variant):
    model = tiny(**variant)
    prompt = random_tokens(1, 4)[0]
    for strategy in ("greedy", "sample", "beam"):
        results = []
        for use_cache in (False, True):
            step = m.step_function(model, use_cache=use_cache)
            if strategy == "greedy":
                results.append(decoding.greedy_decode(step, prompt, 12))
            elif strategy == "sample":
                results.append(decoding.sample_decode(step, prompt, 12, seed=5, top_k=5))
            else:
                results.append(decoding.beam_search(step, prompt, 8, num_beams=3)[0])
        assert torch.equal(results[0], results[1]), strategy


def test_cached_step_logits_equal_full_forward_along_a_beam_search():
    model = tiny(attention="gqa")
    cached, plain = m.step_function(model), m.step_function(model, use_cache=False)
    seen = []

    def both(tokens):
        a, b = cached(tokens), plain(tokens)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        seen.append(tokens.shape[0])
        return a

    decoding.beam_search(both, random_tokens(1, 3)[0], 6, num_beams=4)
    assert max(seen) == 4  # beams were duplicated and reordered, and the cache followed


@pytest.mark.parametrize("attention", ["mha", "mqa", "gqa", "mla"])
def test_every_attention_overfits_a_fixed_batch(attention):
    model = tiny(attention=attention)
    data = random_tokens(1, 17, seed=1)[0]  # one window of 16: the same batch every step
    losses = m.train(model, data, 30, batch_size=2, context=16, lr=1e-2, progress=False)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_training_is_reproducible():
    data = random_tokens(1, 200, seed=2)[0]
    runs = [m.train(tiny(), data, 3, batch_size=2, context=8, progress=False) for _ in range(2)]
    assert runs[0] == runs[1]


def test_corpus_is_deterministic_and_in_vocabulary():
    first, second = m.load_corpus(), m.load_corpus()
    assert first == second and 100_000 < len(first) <= 150_000
    assert first.startswith("the zen of python")
    assert set(first) <= set(m.VOCAB)
    assert m.decode(m.encode(first[:500])) == first[:500]
    assert len(m.load_corpus(None)) >= len(first)
    assert len(set(m.VOCAB)) == len(m.VOCAB)


def test_model_counts_and_caches():
    model = tiny(attention="mqa")
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.head.weight is model.token_embedding.weight
    cache = model.make_cache(3, 7)
    assert cache.keys.shape == (2, 3, 1, 7, 8)
    latent = tiny(attention="mla").make_cache(1)
    assert latent.numbers_per_token == 16 + 8


def test_every_mixer_of_the_catalogue_builds_a_model():
    from course_lib import catalogue

    assert set(m.mixer_names()) == set(catalogue.names(has="mixer")) >= {"attention", "gla", "mamba2", "mla"}
    for name in m.mixer_names():
        model = tiny(attention=name, d_model=16, num_heads=2)
        assert type(model.blocks[0].attention) is type(catalogue.get(name).build_mixer(16, 2))
        assert model(random_tokens(2, 5)).shape == (2, 5, 11)


def test_mha_is_chapter_04s_name_for_attention():
    assert m.ModelConfig(vocab_size=10, attention="mha").attention == "attention"
    # the former registry, kept for one release, reads the catalogue
    assert "gla" in m.ATTENTION_LAYERS and len(m.ATTENTION_LAYERS) == len(m.mixer_names())
    layer = m.ATTENTION_LAYERS["mha"](m.ModelConfig(vocab_size=10, d_model=16, num_heads=2))
    assert layer.num_kv_heads == 2


def test_a_model_is_built_by_name_in_a_fresh_interpreter():
    # Looking a mixer up never depends on what was imported before (it once needed course_lib.recall).
    import subprocess
    import sys

    code = (
        "from course_lib.models import ModelConfig; "
        "print(ModelConfig(vocab_size=5, attention='gla').attention)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "gla"


def test_recurrent_models_keep_no_kv_cache():
    model = tiny(attention="deltanet", d_model=16, num_heads=2)
    with pytest.raises(ValueError, match="no KV cache"):
        model.make_cache(1)
    x = model.blocks[0].attention_norm(torch.randn(1, 4, 16))
    torch.testing.assert_close(model.blocks[0](x), model.blocks[0](x))  # no cache: whole sequences


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: m.ModelConfig(vocab_size=10, attention="rnn"), ValueError, "attention='rnn'.*gla"),
        (lambda: m.ModelConfig(vocab_size=10, attention="sdpa"), ValueError, "attention"),
        (lambda: m.ModelConfig(vocab_size=10, attention=3), TypeError, "attention"),
        (lambda: m.ModelConfig(vocab_size=10, mixer_options=[1]), TypeError, "mixer_options"),
        (lambda: m.ModelConfig(vocab_size=10, d_model=30, num_heads=4), ValueError, "num_heads"),
        (lambda: m.ModelConfig(vocab_size=0), ValueError, "vocab_size"),
        (lambda: m.ModelConfig(vocab_size=10, positions="alibi"), ValueError, "positions"),
        (lambda: m.ModelConfig(vocab_size=10, attention="gqa", num_kv_heads=3), ValueError, "num_kv_heads"),
        (lambda: m.TinyTransformer({"vocab_size": 3}), TypeError, "config"),
        (lambda: tiny()(torch.zeros(1, 3)), TypeError, "tokens"),
        (lambda: tiny()(torch.zeros(3, dtype=torch.long)), ValueError, "tokens"),
        (lambda: tiny()(torch.full((1, 3), 11)), ValueError, "tokens"),
        (lambda: tiny()(torch.zeros(1, 41, dtype=torch.long)), ValueError, "max_len"),
        (lambda: m.encode("Capital"), ValueError, "VOCAB"),
        (lambda: m.encode(3), TypeError, "text"),
        (lambda: m.decode([99]), ValueError, "tokens"),
        (lambda: m.train(tiny(), random_tokens(1, 50)[0], 0), ValueError, "steps"),
        (lambda: m.train(nn.Linear(2, 2), random_tokens(1, 50)[0], 1), TypeError, "model"),
        (lambda: m.train(tiny(), random_tokens(1, 50)[0], 1, context=64), ValueError, "context"),
        (
            lambda: m.get_batch(random_tokens(1, 8)[0], 2, 8, generator=torch.Generator()),
            ValueError,
            "data",
        ),
        (lambda: m.step_function(nn.Linear(2, 2)), TypeError, "model"),
        (lambda: m.load_corpus(0), ValueError, "max_chars"),
        (lambda: m.attention_inputs(nn.Linear(2, 2), random_tokens(1, 4)), TypeError, "model"),
        (lambda: m.attention_inputs(tiny(attention="mla"), random_tokens(1, 4)), ValueError, "model"),
        (lambda: m.forward_with_attention(tiny(), random_tokens(1, 4), None), TypeError, "attend"),
        (
            lambda: m.forward_with_attention(tiny(), random_tokens(1, 4), lambda i, q, k, v: q[..., :1, :]),
            ValueError,
            "attend",
        ),
        (lambda: m.corpus_split(1.0), ValueError, "held_out_fraction"),
        (lambda: m.load_eviction_model(3), TypeError, "path"),
        (lambda: m.load_eviction_model("/nonexistent/weights.pt"), FileNotFoundError, "make-eviction-model"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- the attention inside the model, and chapter 05's trained model ----------------------------------

INSPECTED = [
    dict(attention="mha"),
    dict(attention="gqa", num_kv_heads=2),
    dict(attention="mha", positions="rope"),
    dict(attention="gqa", num_kv_heads=2, positions="rope"),
]


@pytest.mark.parametrize("variant", INSPECTED, ids=lambda v: "-".join(map(str, v.values())))
def test_attention_inputs_reproduce_each_layers_output(variant):
    model = tiny(**variant)
    tokens = random_tokens(2, 13)
    seen = []  # (input, output) of every layer's attention, recorded by hooks on the real forward
    hooks = [
        block.attention.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        for block in model.blocks
    ]
    with torch.no_grad():
        inputs = m.attention_inputs(model, tokens)
        for hook in hooks:
            hook.remove()
        # attention_inputs runs one forward, during which the hooks recorded each layer's true output.
        assert len(seen) == len(inputs) == 2
        H, H_kv, D = 4, variant.get("num_kv_heads", 4), 8
        for block, (q, k, v), (x, layer_out) in zip(model.blocks, inputs, seen):
            assert q.shape == (2, H, 13, D) and k.shape == v.shape == (2, H_kv, 13, D)
            # Plain multi-head attention over k, v repeated per query head (not gqa_attention's grouping).
            group = H // H_kv
            out = attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), causal=True)
            merged = out.transpose(1, 2).reshape(2, 13, H * D) @ block.attention.out_proj.weight.T
            assert block.attention.out_proj.bias is None  # the layer is bias-free
            torch.testing.assert_close(merged, layer_out, atol=1e-6, rtol=1e-5)
            keys = block.attention.k_proj(x).view(2, 13, H_kv, D).transpose(1, 2)
            expected = apply_rope(keys) if variant.get("positions") == "rope" else keys
            torch.testing.assert_close(k, expected)


def test_forward_with_attention_swaps_the_attention():
    model = tiny(attention="gqa", num_kv_heads=2, positions="rope")
    tokens = random_tokens(2, 9)
    with torch.no_grad():
        full = model(tokens)
        same = m.forward_with_attention(model, tokens, lambda i, q, k, v: gqa_attention(q, k, v, causal=True))
        torch.testing.assert_close(same, full)
        # Each query sees only itself: the output changes, and the next forward is the model again.
        alone = m.forward_with_attention(model, tokens, lambda i, q, k, v: v.repeat_interleave(2, 1))
        assert not torch.allclose(alone, full, atol=1e-4)
        torch.testing.assert_close(alone[:, 0], full[:, 0])  # the first token sees only itself anyway
        torch.testing.assert_close(model(tokens), full)


def test_eviction_model_is_trained():
    model = m.load_eviction_model()
    assert model is m.load_eviction_model()  # loaded once per process
    assert model.config == m.eviction_model_config() and not model.training
    assert m.EVICTION_MODEL_PATH.stat().st_size < 1_000_000
    _, held_out = m.corpus_split()
    context = m.EVICTION_TRAINING["context"]
    trained = m.evaluate_loss(model, held_out, batches=2, batch_size=4, context=context)
    untrained = m.evaluate_loss(
        m.TinyTransformer(m.eviction_model_config()), held_out, batches=2, batch_size=4, context=context
    )
    uniform = math.log(len(m.VOCAB))
    assert trained < 0.6 * uniform and trained < untrained - 1.0


def test_corpus_split_holds_out_the_end():
    train_tokens, held_out = m.corpus_split(0.25)
    whole = m.encode(m.load_corpus(None))
    assert torch.equal(torch.cat([train_tokens, held_out]), whole)
    assert len(held_out) == len(whole) - int(len(whole) * 0.75)


def test_make_eviction_model_saves_what_load_reads(monkeypatch, tmp_path):
    monkeypatch.setitem(m.EVICTION_TRAINING, "steps", 2)
    path = tmp_path / "weights.pt"
    made = m.make_eviction_model(path, progress=False)
    loaded = m.load_eviction_model(path)
    tokens = random_tokens(1, 20, V=len(m.VOCAB))
    torch.testing.assert_close(loaded(tokens), made(tokens))
    assert torch.load(path, weights_only=True)["training"]["steps"] == 2


def test_the_models_command_and_the_shipped_weights_path():
    import subprocess
    import sys
    from pathlib import Path

    import course_lib

    # The weights are package data of course_lib (pyproject: course_lib = ["data/*.pt"]).
    assert m.EVICTION_MODEL_PATH == Path(course_lib.__file__).resolve().parent / "data" / "eviction_model.pt"
    run = subprocess.run(
        [sys.executable, "-m", "course_lib.models"],
        cwd=Path(course_lib.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--make-eviction-model" in run.stderr


# --- cross-layer KV sharing ---------------------------------------------------------------------------


def reference_forward(model, tokens):
    """The model's forward written out from its weights: every layer's attention by plain ``attention``
    over the keys and values of layer ``i - i % kv_share`` (computed from that layer's own input)."""
    config = model.config
    B, T = tokens.shape
    H, D = config.num_heads, config.head_dim
    x = model.token_embedding(tokens)
    if model.position_embedding is not None:
        x = x + model.position_embedding(torch.arange(T))
    kv = {}
    for index, block in enumerate(model.blocks):
        layer = block.attention
        h = block.attention_norm(x)
        q = layer.q_proj(h).view(B, T, H, D).transpose(1, 2)
        if index % config.kv_share == 0:
            H_kv = layer.num_kv_heads
            k = layer.k_proj(h).view(B, T, H_kv, D).transpose(1, 2)
            v = layer.v_proj(h).view(B, T, H_kv, D).transpose(1, 2)
            if config.positions == "rope":
                k = apply_rope(k)
            kv = {"k": k.repeat_interleave(H // H_kv, 1), "v": v.repeat_interleave(H // H_kv, 1)}
        if config.positions == "rope":
            q = apply_rope(q)
        out = attention(q, kv["k"], kv["v"], causal=True).transpose(1, 2).reshape(B, T, H * D)
        x = x + layer.out_proj(out)
        x = x + block.mlp(block.mlp_norm(x))
    return model.head(model.norm(x))


SHARED = [
    dict(attention="mha", kv_share=2),
    dict(attention="gqa", num_kv_heads=2, kv_share=2, positions="rope"),
    dict(attention="mqa", kv_share=3),
    dict(attention="gqa", num_kv_heads=2, kv_share=2),
    dict(attention="mha", kv_share=4, positions="rope"),
]


@pytest.mark.parametrize("kv_share", [1, 2, 3])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cross_layer_sharing_equals_the_written_out_forward(kv_share, positions):
    model = tiny(
        attention="gqa", num_kv_heads=2, num_layers=4, positions=positions, kv_share=kv_share
    ).double()
    tokens = random_tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_forward(model, tokens))


def test_sharing_factor_one_is_the_unshared_model():
    for variant in (dict(attention="gqa", num_kv_heads=2), dict(attention="mha", positions="rope")):
        plain, one = tiny(**variant), tiny(**variant, kv_share=1)
        state = plain.state_dict()
        assert state.keys() == one.state_dict().keys()
        assert all(torch.equal(state[name], value) for name, value in one.state_dict().items())
        tokens = random_tokens(2, 9)
        with torch.no_grad():
            assert torch.equal(plain(tokens), one(tokens))
        assert all(block.attention.owns_kv for block in one.blocks)


def test_only_the_owning_layers_keep_key_value_projections():
    model = tiny(attention="gqa", num_kv_heads=2, num_layers=5, kv_share=2)
    assert [block.attention.owns_kv for block in model.blocks] == [True, False, True, False, True]
    assert [model.config.kv_source(i) for i in range(5)] == [0, 0, 2, 2, 4]
    assert [model.config.cache_layer(i) for i in range(5)] == [0, 0, 1, 1, 2]
    assert model.config.num_cache_layers == 3
    names = model.state_dict().keys()
    assert "blocks.1.attention.k_proj.weight" not in names and "blocks.2.attention.v_proj.weight" in names
    unshared = tiny(attention="gqa", num_kv_heads=2, num_layers=5)
    # two layers without their k and v projections: 2 x 2 x (32 x 2 heads of 8)
    assert unshared.num_parameters() - model.num_parameters() == 2 * 2 * 32 * 16
    assert [block.attention.kv_numbers_per_token() for block in model.blocks] == [32, 0, 32, 0, 32]
    cache = model.make_cache(2, 9)
    assert cache.keys.shape == (3, 2, 2, 9, 8)


@pytest.mark.parametrize("variant", SHARED, ids=lambda v: "-".join(map(str, v.values())))
def test_shared_prefill_then_decode_equals_the_full_forward(variant):
    model = tiny(num_layers=4, **variant).double()
    tokens = random_tokens(2, 13)
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2)
        assert cache.keys.dtype == torch.float64  # the cache takes the model's dtype
        assert cache.num_layers == model.config.num_cache_layers
        pieces = [model(tokens[:, :5], cache=cache)]
        pieces += [model(tokens[:, t : t + 1], cache=cache) for t in range(5, 10)]
        pieces.append(model(tokens[:, 10:], cache=cache))
    assert all(cache.length(i) == 13 for i in range(cache.num_layers))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_shared_model_generates_the_same_with_and_without_the_cache():
    model = tiny(attention="gqa", num_kv_heads=2, num_layers=4, kv_share=2, positions="rope")
    prompt = random_tokens(1, 4)[0]
    for strategy in ("greedy", "beam"):
        results = []
        for use_cache in (False, True):
            step = m.step_function(model, use_cache=use_cache)
            if strategy == "greedy":
                results.append(decoding.greedy_decode(step, prompt, 12))
            else:
                results.append(decoding.beam_search(step, prompt, 8, num_beams=3)[0])
        assert torch.equal(results[0], results[1]), strategy


def test_shared_keys_get_gradients_from_every_layer_that_reads_them():
    model = tiny(attention="mha", num_layers=2, kv_share=2).double().train()
    tokens = random_tokens(2, 7)
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    with_follower = model.blocks[0].attention.k_proj.weight.grad.clone()
    # The same loss with the follower's attention cut from the owner's keys: a different gradient.
    model.zero_grad()
    original = model.blocks[1].attention.forward

    def detached(x, *, shared_kv=None, **kw):
        return original(x, shared_kv=tuple(t.detach() for t in shared_kv), **kw)

    model.blocks[1].attention.forward = detached
    model(tokens).logsumexp(-1).mean().backward()
    assert not torch.allclose(with_follower, model.blocks[0].attention.k_proj.weight.grad)
    assert model.blocks[1].attention.q_proj.weight.grad.abs().sum() > 0


def test_a_shared_model_trains():
    model = tiny(attention="gqa", num_kv_heads=2, kv_share=2, positions="rope")
    data = random_tokens(1, 17, seed=1)[0]
    losses = m.train(model, data, 30, batch_size=2, context=16, lr=1e-2, progress=False)
    assert losses[-1] < 0.5 * losses[0]


def test_attention_hooks_see_the_shared_keys():
    model = tiny(attention="gqa", num_kv_heads=2, kv_share=2, positions="rope").double()
    tokens = random_tokens(2, 9)
    inputs = m.attention_inputs(model, tokens)
    assert inputs[0][1] is inputs[1][1] and inputs[0][2] is inputs[1][2]
    with torch.no_grad():
        same = m.forward_with_attention(model, tokens, lambda i, q, k, v: gqa_attention(q, k, v, causal=True))
        torch.testing.assert_close(same, model(tokens))


def test_queries_keys_values_at_explicit_positions_equal_a_start_offset():
    layer = tiny(attention="gqa", num_kv_heads=2, positions="rope").blocks[0].attention.double()
    x = torch.randn(1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_start = layer.queries_keys_values(x, start=7)
    by_positions = layer.queries_keys_values(x, positions=torch.arange(7, 12))
    for a, b in zip(by_start, by_positions):
        torch.testing.assert_close(a, b)
    # Positions may jump (tokens of several requests packed in one row).
    packed = layer.queries_keys_values(x, positions=torch.tensor([3, 4, 0, 1, 2]))
    torch.testing.assert_close(packed[1][:, :, :2], layer.queries_keys_values(x[:, :2], start=3)[1])
    torch.testing.assert_close(packed[1][:, :, 2:], layer.queries_keys_values(x[:, 2:])[1])


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: m.ModelConfig(vocab_size=10, kv_share=0), ValueError, "kv_share"),
        (lambda: m.ModelConfig(vocab_size=10, num_layers=2, kv_share=3), ValueError, "kv_share"),
        (lambda: m.ModelConfig(vocab_size=10, kv_share=True), TypeError, "kv_share"),
        (lambda: tiny(attention="mla", kv_share=2), ValueError, "kv_share=2.*mla"),
        (lambda: tiny(attention="gla", d_model=16, num_heads=2, kv_share=2), ValueError, "kv_share"),
        (lambda: tiny(kv_share=2, mixer_options={"conv_size": 3}), ValueError, "kv_share.*conv_size"),
        (lambda: m.ModelConfig(vocab_size=10).kv_source(2), ValueError, "layer_index"),
        (lambda: m.ModelConfig(vocab_size=10).cache_layer(-1), ValueError, "layer_index"),
        (
            lambda: tiny(kv_share=2).blocks[1].attention(torch.zeros(1, 3, 32)),
            ValueError,
            "shared_kv",
        ),
        (
            lambda: (
                tiny(kv_share=2)
                .blocks[1]
                .attention(
                    torch.zeros(1, 3, 32), shared_kv=(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
                )
            ),
            ValueError,
            "shared_kv",
        ),
        (
            lambda: (
                tiny(kv_share=2)
                .blocks[0]
                .attention(
                    torch.zeros(1, 3, 32), shared_kv=(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
                )
            ),
            ValueError,
            "shared_kv",
        ),
        (
            lambda: (
                tiny()
                .blocks[0]
                .attention.queries_keys_values(torch.zeros(1, 3, 32), positions=torch.arange(4))
            ),
            ValueError,
            "positions",
        ),
    ],
)
def test_bad_sharing_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_a_sharing_layer_refuses_a_short_convolution():
    from course_lib.mixers import AttentionMixer

    with pytest.raises(ValueError, match="^conv_size"):
        AttentionMixer(16, 2, owns_kv=False, conv_size=3)
    with pytest.raises(TypeError, match="owns_kv"):
        AttentionMixer(16, 2, owns_kv=1)
