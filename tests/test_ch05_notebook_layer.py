"""Chapter 05's notebook layer: widgets driven headlessly, figure, bench suite."""

import itertools
import math

import ipywidgets
import pytest
import torch
import torch.nn.functional as F

from course_lib import models
from course_lib.bench import suites
from course_lib.benchmarks.ch05 import sparse_suite
from course_lib.benchmarks.ch05_trainable import trainable_sparse_report, trainable_sparse_suite
from course_lib.figures import FIGURES
from course_lib.measure import Measurement
from course_lib.models import corpus_split, decode
from course_lib.sparse import BlockWork, nsa_masks
from course_lib.standard import attention
from course_lib.studies.sparse_kernels import routing_methods, routing_work
from course_lib.widgets import ch05


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- (a) mask explorer --------------------------------------------------------------------------


def brute_force_mask(pattern, T, window, dilation, stride, causal):
    """Independent definitions of the position-only patterns, pair by pair."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            d = i - j
            if pattern == "window":
                ok = 0 <= d < window if causal else abs(d) < window
            elif pattern == "dilated":
                ok = d % dilation == 0 and abs(d) <= (window - 1) * dilation and (d >= 0 or not causal)
            elif pattern == "strided":
                ok = (abs(d) < stride or d % stride == 0) and (d >= 0 or not causal)
            else:  # fixed: same block, or j is the last position of its block
                ok = (i // stride == j // stride or j % stride == stride - 1) and (d >= 0 or not causal)
            allowed[i, j] = ok
    return allowed


@pytest.mark.parametrize("pattern", ["window", "dilated", "strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_position_patterns_match_their_definition(pattern, causal):
    mask = ch05.pattern_mask(pattern, 13, window=3, dilation=2, stride=4, causal=causal)
    assert torch.equal(mask, brute_force_mask(pattern, 13, 3, 2, 4, causal))


def test_global_local_and_block_patterns():
    mask = ch05.pattern_mask("global+local", 12, window=2, num_globals=2, causal=False)
    assert mask[:2].all() and mask[:, :2].all()
    assert not mask[5, 9] and mask[5, 6]
    block = ch05.pattern_mask("block", 12, block_size=4, random_blocks=0, causal=False)
    assert torch.equal(block, torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3))
    causal_block = ch05.pattern_mask("block", 12, block_size=4, random_blocks=2, causal=True)
    assert not causal_block.triu(1).any()
    bigbird = ch05.pattern_mask("bigbird", 32, block_size=4, num_globals=1, random_blocks=1, seed=3)
    assert torch.equal(
        bigbird, ch05.pattern_mask("bigbird", 32, block_size=4, num_globals=1, random_blocks=1, seed=3)
    )


def test_pattern_cost_counts_pairs():
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    cost = ch05.pattern_cost(mask, heads=2, head_dim=8, bytes_per_score=4)
    assert cost["density"] == pytest.approx(55 / 100)
    assert cost["dense_flops"] == 2 * (8 + 8) * 100 * 2
    assert cost["sparse_flops"] == 2 * (8 + 8) * 55 * 2
    assert cost["dense_score_bytes"] == 100 * 2 * 4
    assert cost["sparse_score_bytes"] == 55 * 2 * 4
    assert cost["mask_bytes"] == 100


def test_reach_curve_of_a_causal_window():
    # Causal window 3 over 7 tokens: each layer reaches 2 positions further back; 3 layers connect all.
    curve = ch05.reach_curve(ch05.pattern_mask("window", 7, window=3))
    pairs = 7 * 8 / 2
    covered = [sum(min(i, 2 * layers) + 1 for i in range(7)) for layers in (1, 2, 3)]
    assert curve == pytest.approx([c / pairs for c in covered])
    assert curve[-1] == 1.0


def test_mask_explorer_reacts_to_every_control():
    box = ch05.mask_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {
        "pattern",
        "window",
        "dilation",
        "stride",
        "globals",
        "random blocks",
        "block size",
        "causal",
        "T shown",
        "T costed",
    }
    c["T costed"].value = c["T costed"].options[0]
    c["T shown"].value = 32
    for pattern in c["pattern"].options:
        c["pattern"].value = pattern
        assert w.result["mask"].shape == (32, 32)
        assert box.children[1].value == w.result["html"]
        assert w.result["stats"].density == pytest.approx(float(w.result["mask"].float().mean()))
    for T in c["T shown"].options:
        c["T shown"].value = T
        assert w.result["mask"].shape == (T, T)
    for T in c["T costed"].options:
        c["T costed"].value = T
        assert w.result["cost"]["T"] == T
        assert w.result["cost"]["dense_flops"] == 2 * 128 * T * T * 8
    c["T costed"].value = 256
    c["T shown"].value = 32
    c["pattern"].value = "window"
    for value in (c["window"].min, 8, c["window"].max):
        c["window"].value = value
        assert int(w.result["mask"].sum(-1).max()) == min(2 * value - 1, 32)
    c["causal"].value = True
    assert not w.result["mask"].triu(1).any()
    c["causal"].value = False
    c["pattern"].value = "dilated"
    for value in range(c["dilation"].min, c["dilation"].max + 1):
        c["dilation"].value = value
        row = w.result["mask"][16].nonzero().flatten() - 16
        assert (row % value == 0).all()
    c["pattern"].value = "strided"
    for value in (c["stride"].min, 5, c["stride"].max):
        c["stride"].value = value
        assert w.result["mask"].any(-1).all()
    c["pattern"].value = "global+local"
    for value in range(c["globals"].min, c["globals"].max + 1):
        c["globals"].value = value
        assert int(w.result["mask"].all(-1).sum()) >= value
    c["pattern"].value = "block"
    for value in (c["block size"].min, 4, c["block size"].max):
        c["block size"].value = value
        assert w.result["mask"].diagonal().all()
    c["block size"].value = 4  # 8 blocks of 4: the diagonal tiles plus `blocks` random tiles per block row
    for blocks in range(c["random blocks"].min, c["random blocks"].max + 1):
        c["random blocks"].value = blocks
        assert int(w.result["mask"].sum()) == 8 * 16 * (1 + blocks)
    c["random blocks"].value, c["block size"].value = 0, 8
    assert w.result["stats"].layers_to_connect is None  # disjoint blocks never connect


# --- (b) eviction explorer ------------------------------------------------------------------------


def test_synthetic_decoder_has_sinks_heavy_hitters_and_recency():
    data = ch05.synthetic_decoding_attention(cache_len=256, new_tokens=16, seed=1)
    assert data.q.shape == (1, 4, 272, 64) and data.cache_len == 256
    per_key = data.received
    assert per_key.shape == (256,)
    typical = per_key.mean()  # the new tokens take part of the attention, so compare within the cache
    assert per_key[data.sinks].min() > 5 * typical
    assert per_key[data.heavy].mean() > 5 * typical and per_key[data.heavy].min() > typical
    assert per_key[-8:].mean() > per_key[64:128].mean()  # recency
    again = ch05.synthetic_decoding_attention(cache_len=256, new_tokens=16, seed=1)
    assert torch.equal(data.q, again.q) and torch.equal(data.heavy, again.heavy)


def test_eviction_policies_keep_the_budget_and_structure_helps():
    data = ch05.synthetic_decoding_attention()
    for policy in ch05.POLICIES:
        keep = ch05.policy_keep(policy, data, 32)
        assert keep.shape[-1] == 32
        assert (keep.diff(dim=-1) > 0).all()
    assert ch05.policy_keep("streaming", data, 32)[:4].tolist() == [0, 1, 2, 3]
    assert ch05.policy_keep("recent", data, 32).tolist() == list(range(480, 512))
    curves = ch05.eviction_curves(data, [32, 128])
    for policy in ("streaming", "h2o"):
        assert curves[policy][1] < curves["random"][1]
    assert curves["h2o"][0] < curves["recent"][0]


@pytest.fixture(scope="module")
def small_decoding():
    return ch05.trained_decoding(cache_len=20, new_tokens=6, batch_size=2, seed=3)


def test_trained_decoding_holds_the_models_real_attention(small_decoding):
    d = small_decoding
    assert d.tokens.shape == (2, 27) and len(d.layers) == 2
    for layer in d.layers:
        assert layer.q.shape == (2, 4, 26, 16) and layer.k.shape == layer.v.shape == (2, 2, 26, 16)
        assert layer.group_size == 2
    # The windows are held-out text: each row is a contiguous piece of the corpus's last 10%.
    _, held_out = corpus_split()
    text = decode(held_out)
    assert all(decode(row) in text for row in d.tokens)
    # With the whole cache the loss is the model's own cross-entropy on the new tokens.
    logits = d.model(d.inputs)
    expected = F.cross_entropy(logits[0, 20:], d.tokens[0, 21:]) + F.cross_entropy(
        logits[1, 20:], d.tokens[1, 21:]
    )
    full = [torch.arange(20)] * 2
    assert ch05.evicted_loss(d, full) == pytest.approx(float(expected) / 2, rel=1e-5)


def test_h2o_keeps_per_key_value_head_by_the_summed_attention_of_its_query_heads(small_decoding):
    layer = small_decoding.layers[0]
    keep = ch05.policy_keep("h2o", layer, 8)
    assert keep.shape == (2, 2, 8)
    for b in range(2):
        for kv_head in range(2):
            scores = torch.zeros(20)
            for head in (2 * kv_head, 2 * kv_head + 1):  # the query heads that read this key/value head
                q = layer.q[b, head, :20]
                k = layer.k[b, kv_head, :20]
                logits = (q @ k.T / 4.0).masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), -math.inf)
                scores += logits.softmax(-1).sum(0)
            heavy = scores[:16].topk(4).indices.sort().values.tolist()
            assert keep[b, kv_head].tolist() == heavy + [16, 17, 18, 19]


def test_evicted_loss_matches_attention_with_an_explicit_mask(small_decoding):
    d = small_decoding
    keeps = [ch05.policy_keep("h2o", layer, 5) for layer in d.layers]
    # Reference: which key each (window, query head, query, key) may see, spelled out pair by pair.
    masks = []
    for keep in keeps:
        mask = torch.zeros(2, 4, 26, 26, dtype=torch.bool)
        for b, h, i, j in itertools.product(range(2), range(4), range(26), range(26)):
            kept = j >= 20 or i < 20 or j in keep[b, h // 2].tolist()
            mask[b, h, i, j] = j <= i and kept
        masks.append(mask)

    def attend(index, q, k, v):
        return attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), masks[index])

    logits = models.forward_with_attention(d.model, d.inputs, attend)
    expected = F.cross_entropy(logits[:, 20:].flatten(0, 1), d.tokens[:, 21:].flatten())
    assert ch05.evicted_loss(d, keeps) == pytest.approx(float(expected), rel=1e-5)
    assert ch05.evicted_loss(d, keeps) != pytest.approx(ch05.evicted_loss(d, [torch.arange(20)] * 2))


def test_trained_study_keeps_budgets_and_the_whole_cache_changes_nothing(small_decoding):
    d = small_decoding
    for layer in d.layers:
        for policy in ch05.POLICIES:
            for budget in (1, 4, 19):
                keep = ch05.policy_keep(policy, layer, budget, num_sinks=min(4, budget))
                assert keep.shape[-1] == budget and (keep.diff(dim=-1) > 0).all()
                if policy == "streaming":
                    assert keep[: min(4, budget)].tolist() == list(range(min(4, budget)))
            keep = ch05.policy_keep(policy, layer, 20)
            assert layer.error(keep) == pytest.approx(0.0, abs=1e-6)
    study = ch05.eviction_study(d, [2, 20, 30])
    for policy in ch05.POLICIES:
        for layer_errors in study.errors[policy]:
            assert layer_errors[1] == pytest.approx(0.0, abs=1e-6) and layer_errors[2] == pytest.approx(
                0.0, abs=1e-6
            )
            assert layer_errors[0] > 0.0
        assert study.losses[policy][1] == pytest.approx(study.full_loss, abs=1e-6)
        assert study.losses[policy][2] == pytest.approx(study.full_loss, abs=1e-6)
    assert "streaming" in study.table() and f"{study.full_loss:.3f}" in study.table()


def test_eviction_explorer_reacts_to_every_control():
    w = ch05.eviction_explorer()
    c = controls(w)
    assert set(c) >= {"policy", "budget", "sinks", "attention"}
    assert c["attention"].value.startswith("trained")  # the trained model by default
    for source in c["attention"].options:
        c["attention"].value = source
        trained = source != "synthetic"
        H_kv = 2 if trained else 4
        for policy in c["policy"].options:
            c["policy"].value = policy
            assert w.result["kept"].shape[0] == H_kv
            assert (w.result["kept"].sum(-1) == c["budget"].value).all()
            assert math.isfinite(w.result["error"])
            assert (w.result["loss"] is not None) == trained
        assert w.result["curves"].keys() == set(ch05.POLICIES)
    c["attention"].value = ch05.SOURCES[1]
    c["policy"].value = "h2o"
    for budget in (c["budget"].options[0], 256):  # each trained-model step runs the model: two suffice
        c["budget"].value = budget
        assert (w.result["kept"].sum(-1) == budget).all()
        assert math.isfinite(w.result["error"]) and math.isfinite(w.result["loss"])
    assert c["budget"].value == 256  # the whole cache kept: nothing changes
    assert w.result["error"] < 1e-5 and w.result["loss"] == pytest.approx(w.result["full_loss"], abs=1e-6)
    assert w.result["losses"] == ch05.trained_eviction_study(4).losses
    c["policy"].value, c["budget"].value = "streaming", 32
    c["attention"].value = "synthetic"  # cheap: every sink count
    for sinks in range(c["sinks"].min, c["sinks"].max + 1):
        c["sinks"].value = sinks
        assert w.result["keep"][:sinks].tolist() == list(range(sinks))


# --- (c) measured timing --------------------------------------------------------------------------


def test_sparse_timing_view_and_widget(monkeypatch):
    view = ch05.sparse_timing_view(512, window=64, min_run_time=0.001, draw=False)
    assert view["lengths"] == [256, 512]
    assert {r.method for r in view["results"]} == {
        "dense_masked",
        "sliding_window",
        "block_band",
        "sdpa_masked",
    }
    assert "sdpa_masked" in view["table"]
    calls = []

    def fake_view(max_T, **kwargs):
        calls.append(max_T)
        return {"table": f"max_T={max_T}", "results": [], "lengths": []}

    monkeypatch.setattr(ch05, "sparse_timing_view", fake_view)
    box = ch05.sparse_timing()
    for value in box.max_T.options:
        box.max_T.value = value
        box.button.click()
        assert box.result["table"] == f"max_T={value}"
    assert calls == list(box.max_T.options)


def test_sparse_suite_methods_agree():
    methods, reference, lengths = sparse_suite("cpu", window=16)
    assert reference == "sdpa_masked" and lengths[-1] == 16384  # the acceptance length
    outputs = {name: build(40)() for name, build in methods.items()}
    torch.testing.assert_close(outputs["dense_masked"], outputs["sliding_window"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["dense_masked"], outputs["sdpa_masked"], atol=1e-5, rtol=1e-4)
    assert outputs["block_band"].shape == outputs["dense_masked"].shape
    assert "sparse" in suites()


# --- figure and bad input ------------------------------------------------------------------------


def test_gallery_figure_is_registered():
    assert "05_sparse_gallery" in FIGURES
    figure = FIGURES["05_sparse_gallery"]()
    assert len(figure.axes) == 8  # six fixed patterns, NSA and MoBA


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch05.pattern_mask("diagonal", 8), ValueError, "pattern"),
        (lambda: ch05.pattern_mask("window", 8, window=0), ValueError, "window"),
        (lambda: ch05.mask_explorer_view(T_view=1, draw=False), ValueError, "T_view"),
        (lambda: ch05.pattern_cost(torch.ones(3, 3)), TypeError, "mask"),
        (
            lambda: ch05.policy_keep("lru", ch05.synthetic_decoding_attention(cache_len=16), 4),
            ValueError,
            "policy",
        ),
        (lambda: ch05.eviction_explorer_view(budget=0, draw=False), ValueError, "budget"),
        (lambda: ch05.synthetic_decoding_attention(cache_len=1), ValueError, "cache_len"),
        (lambda: ch05.eviction_explorer_view(budget=257, draw=False), ValueError, "budget"),
        (lambda: ch05.eviction_explorer_view(source="gpt", draw=False), ValueError, "source"),
        (lambda: ch05.trained_decoding(cache_len=10**6), ValueError, "cache_len"),
        (lambda: ch05.trained_decoding(model=torch.nn.Linear(2, 2)), TypeError, "model"),
        (
            lambda: ch05.evicted_loss(ch05.trained_decoding(8, 2, batch_size=1), [torch.arange(8)]),
            ValueError,
            "keeps",
        ),
        (lambda: ch05.eviction_study("data", [8]), TypeError, "decoding"),
        (lambda: ch05.sparse_timing_view(100, draw=False), ValueError, "max_T"),
        (lambda: ch05.sparse_timing_view(512, methods=("nope",), draw=False), ValueError, "methods"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_decoding_error_equals_attention_with_an_explicit_eviction_mask(small_decoding):
    """DecodingAttention.error (the library's eviction_error on gathered keys) vs dense attention
    with the eviction spelled out as a mask over the whole cache."""
    sources = [*small_decoding.layers, ch05.synthetic_decoding_attention(cache_len=40, new_tokens=6)]
    for data in sources:
        B, H, T, _ = data.q.shape
        c, group = data.cache_len, data.group_size
        q, k, v = data.q[:, :, c:], data.k.repeat_interleave(group, 1), data.v.repeat_interleave(group, 1)
        for policy in ch05.POLICIES:
            keep = ch05.policy_keep(policy, data, 7, num_sinks=2).expand(B, data.k.shape[1], 7)
            mask = torch.zeros(B, H, T - c, T, dtype=torch.bool)
            for b, h, i in itertools.product(range(B), range(H), range(T - c)):
                kept = set(keep[b, h // group].tolist()) | set(range(c, T))  # new tokens are never evicted
                mask[b, h, i] = torch.tensor([j <= c + i and j in kept for j in range(T)])
            full = attention(q, k, v, causal=True)
            expected = float((attention(q, k, v, mask) - full).norm() / full.norm())
            assert data.error(keep) == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert expected > 0.01  # a real eviction, not the trivial zero


# --- NSA and MoBA in the gallery, their figure and their benchmark suite ------------------------------------


def moba_by_hand(q, k, block_size, top_k):
    """MoBA's choice for one head, query by query: mean key per block (the last one over the keys it
    has), gate = q . mean, own block first, then the best eligible blocks, ties to the earlier one."""
    T, S = q.shape[0], k.shape[0]
    blocks = -(-S // block_size)
    means = [k[b * block_size : min((b + 1) * block_size, S)].mean(0) for b in range(blocks)]
    mask = torch.zeros(T, S, dtype=torch.bool)
    for t in range(T):
        position = S - T + t
        own = position // block_size
        eligible = [b for b in range(blocks) if b * block_size <= position]
        ranked = sorted((b for b in eligible if b != own), key=lambda b: (-float(q[t] @ means[b]), b))
        for b in ([own] + ranked)[:top_k]:
            for j in range(b * block_size, min((b + 1) * block_size, S)):
                mask[t, j] = j <= position
    return mask


@pytest.mark.parametrize("T,block_size,top_k", [(32, 4, 2), (29, 5, 3), (16, 8, 1), (12, 4, 9)])
def test_moba_pattern_is_the_routing_by_hand_on_the_seeded_input(T, block_size, top_k):
    mask = ch05.pattern_mask("moba", T, block_size=block_size, top_k=top_k, seed=3)
    q, k = ch05.routing_inputs(T, seed=3)
    assert torch.equal(mask, moba_by_hand(q[0, 0].double(), k[0, 0].double(), block_size, top_k))
    if top_k >= -(-T // block_size):  # every block chosen: plain causal attention
        assert torch.equal(mask, torch.ones(T, T, dtype=torch.bool).tril())


def test_nsa_pattern_keeps_the_window_and_at_most_top_k_blocks_per_query():
    T, block_size, top_k, window = 40, 4, 3, 5
    mask = ch05.pattern_mask("nsa", T, block_size=block_size, top_k=top_k, window=window, seed=1)
    assert not mask.triu(1).any()
    window_mask = torch.tensor([[0 <= i - j < window for j in range(T)] for i in range(T)])
    assert (mask | ~window_mask).all()  # the window is always read
    outside = mask & ~window_mask
    for i in range(T):
        blocks = {j // block_size for j in outside[i].nonzero().flatten().tolist()}
        assert len(blocks) <= top_k
        if i >= block_size:
            assert mask[i, 0]  # the first block is forced once top_k >= 2
    assert torch.equal(
        mask, ch05.pattern_mask("nsa", T, block_size=block_size, top_k=top_k, window=window, seed=1)
    )
    assert not torch.equal(
        mask, ch05.pattern_mask("nsa", T, block_size=block_size, top_k=top_k, window=window)
    )


def test_nsa_branch_map_agrees_with_the_masks_and_the_compression_blocks():
    T, l, s = 30, 6, 3
    options = dict(block_size=5, num_selected=3, window=4, compress_block=l, compress_stride=s)
    branches = ch05.nsa_branch_map(T, **options, seed=2)
    q, k = ch05.routing_inputs(T, seed=2)
    masks = nsa_masks(q, k, **options, num_initial_blocks=1, num_local_blocks=1)
    selected, window = masks["selected"][0, 0], masks["window"]
    for i in range(T):
        for j in range(T):
            # compression block c covers keys c*s .. c*s + l - 1 and is seen once it ends at or before i
            coarse = any(c * s <= j < c * s + l and c * s + l - 1 <= i for c in range(T))
            expected = (
                4
                if selected[i, j] and window[i, j]
                else 3
                if window[i, j]
                else 2
                if selected[i, j]
                else int(coarse)
            )
            assert int(branches[i, j]) == expected, (i, j)
    assert len(ch05.NSA_BRANCHES) == int(branches.max()) + 1


def test_mask_explorer_blocks_chosen_control_moves_nsa_and_moba():
    box = ch05.mask_explorer()
    w = box.interactive
    c = controls(w)
    c["T costed"].value, c["T shown"].value, c["block size"].value = 256, 32, 4
    for pattern in ("nsa", "moba"):
        c["pattern"].value = pattern
        densities = []
        for value in range(c["blocks chosen"].min, c["blocks chosen"].max + 1):
            c["blocks chosen"].value = value
            assert not w.result["mask"].triu(1).any()
            densities.append(w.result["stats"].density)
        assert densities == sorted(densities) and densities[-1] > densities[0]
    assert "compressed keys" in w.result["html"] or c["pattern"].value == "moba"


def test_routing_methods_agree_and_carry_the_work_the_kernels_count():
    small = dict(nsa_options={"block_size": 8, "num_selected": 3, "window": 8, "compress_block": 8,
                              "compress_stride": 4, "num_initial_blocks": 1, "num_local_blocks": 1},
                 moba_options={"block_size": 8, "top_k": 2})  # fmt: skip
    methods = routing_methods(**small)
    assert set(methods) == {
        "sdpa_causal",
        "dense_causal",
        "window",
        "nsa",
        "nsa_masked",
        "moba",
        "moba_masked",
    }
    calls = {name: build(45) for name, build in methods.items()}
    out = {name: call() for name, call in calls.items()}
    torch.testing.assert_close(out["dense_causal"], out["sdpa_causal"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["nsa"], out["nsa_masked"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["moba"], out["moba_masked"], atol=1e-5, rtol=1e-4)
    assert out["window"].shape == out["sdpa_causal"].shape
    work = routing_work([45], **small)
    for kernel in ("nsa", "moba"):
        assert BlockWork(**calls[kernel].extra) == work[kernel][0]
        assert 0 < work[kernel][0].blocks_computed <= work[kernel][0].blocks_causal
    # 45 queries, causal blocks of 8: query t has t // 8 + 1 blocks before it; 2 heads share 1 KV head
    assert work["nsa"][0].blocks_causal == sum(t // 8 + 1 for t in range(45))
    assert work["moba"][0].blocks_causal == 2 * sum(t // 8 + 1 for t in range(45))


def test_routing_work_falls_with_length_at_the_suites_settings():
    work = routing_work([512, 1024])
    for kernel in ("nsa", "moba"):
        assert work[kernel][1].block_fraction < work[kernel][0].block_fraction <= 1.0


def test_trainable_sparse_suite_and_report():
    assert "trainable_sparse" in suites()
    methods, reference, lengths = trainable_sparse_suite()
    assert reference == "sdpa_causal" and reference in methods and lengths[-1] == 8192
    extra = {"blocks_computed": 3, "blocks_causal": 12, "scores_computed": 30, "scores_dense": 120}
    results = [
        Measurement("nsa", 512, 0.1, 100, dict(extra)),
        Measurement("nsa_masked", 512, 0.2, 400, {}),
        Measurement("moba", 512, 0.1, None, dict(extra)),
    ]
    report = trainable_sparse_report(results)
    assert "nsa   T=512" in report and "(25.0%)" in report and "scores 25.0% of T x S" in report
    assert "(25%)" in report  # peak 100 B against 400 B for its own dense mask
    assert report.count("; peak") == 1  # no memory comparison where nothing was measured


def test_routing_figures_are_registered():
    assert len(FIGURES["05_block_routing"]().axes) == 3
    figure = FIGURES["05_vision_costs"]()
    assert len(figure.axes) == 2
    assert {line.get_label() for line in figure.axes[1].lines} == {
        "full", "spatial reduction", "neighborhood", "divided space-time"
    }  # fmt: skip


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch05.pattern_mask("moba", 8, top_k=0), ValueError, "top_k"),
        (lambda: ch05.routing_inputs(-1), ValueError, "T"),
        (lambda: ch05.routing_inputs(4, head_dim=0), ValueError, "head_dim"),
        (lambda: ch05.nsa_branch_map(0), ValueError, "T"),
        (lambda: routing_methods(kv_heads=3), ValueError, "kv_heads"),
        (lambda: routing_work([0]), ValueError, "lengths"),
    ],
)
def test_routing_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
