"""Tests of course_lib.kernels (chapter 09's Triton kernels) against float64 references, SDPA and course_lib.

Every kernel test runs twice: on the CPU under Triton's interpreter (the default without a GPU) and,
marked ``cuda``, on a GPU (``pytest -m cuda tests/test_kernels.py``), with the same shapes and the
same tolerances:

- float32 kernels against a float64 reference: ``atol = rtol = 1e-5`` for outputs, ``5e-5`` for
  gradients. TF32 is *off*: the kernels' ``tl.dot`` use ``input_precision="ieee"`` for float32 by
  default, so the GPU meets the same tolerance. ``test_tf32_is_an_option`` checks the TF32 path at
  the wider ``2e-2`` that its 10-bit mantissa needs.
- float16 and bfloat16 against a float64 reference on the same rounded inputs: ``atol = rtol = 1e-2``
  (fp16) and ``3e-2`` (bf16): one rounding of the output and of the attention weights, which the
  kernels feed to ``tl.dot`` in the input dtype as FlashAttention does. One gap: Triton 3.7.1's
  interpreter multiplies bfloat16 ``tl.dot`` operands as raw integers, so under the interpreter the
  FlashAttention kernels compute bfloat16 inputs in float32 (``common.compute_dtype_for_dot``); the
  decode kernel (no ``tl.dot``) runs in bfloat16 there, and the ``cuda`` variants run every kernel's
  bfloat16 path for real.

Block sizes are >= 16 and head dims padded to >= 16 everywhere, so ``tl.dot``'s minimum size on
NVIDIA GPUs (an inner dimension of 16) is met in both runs. Shapes are small: under the interpreter
every program runs one after another in NumPy.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from devices import elsewhere
from hypothesis import given, settings
from hypothesis import strategies as st

# Not importorskip("triton"): course_lib.kernels must be what imports Triton (it switches the
# interpreter on first).
if importlib.util.find_spec("triton") is None:
    pytest.skip(
        "Triton is not installed: pip install -c constraints.txt -e '.[kernels]'", allow_module_level=True
    )

from course_lib import kernels  # noqa: E402
from course_lib.kernels import common, compile_check  # noqa: E402
from course_lib.kv_cache import PagedKVCache  # noqa: E402
from course_lib.recurrent import gla  # noqa: E402
from course_lib.tiling import flash_attention as torch_flash_attention  # noqa: E402
from course_lib.tiling import flash_decoding  # noqa: E402

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not kernels.INTERPRET,
            reason="CPU tensors need Triton's interpreter, which is off when CUDA is present "
            "(run with TRITON_INTERPRET=1 to force it)",
        ),
        id="interpreter",
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
        ],
        id="cuda",
    ),
]
if not kernels.INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no GPU: nothing here can run a kernel", allow_module_level=True)
# Where the device-independent tests (bad input) put their tensors: where the kernels can run.
RUN_DEVICE = "cpu" if kernels.INTERPRET else "cuda"
ATOL32, GRAD_ATOL32 = 1e-5, 5e-5
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def close(got, expected, tolerance):
    torch.testing.assert_close(got.double().cpu(), expected.double().cpu(), atol=tolerance, rtol=tolerance)


def randn(*shape, seed, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


# --- FlashAttention-2 ---------------------------------------------------------------------------


def reference_scores(q, k, causal, scale=None):
    """float64 scores with -inf where causal (aligned to the end) forbids a key."""
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scores = (q.double().cpu() @ k.double().cpu().transpose(-2, -1)) * (D**-0.5 if scale is None else scale)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def reference_attention(q, k, v, causal, scale=None):
    """softmax(q k^T scale) v in float64, zeros for a query that sees no key; and the logsumexp."""
    scores = reference_scores(q, k, causal, scale)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v.double().cpu(), torch.logsumexp(scores, dim=-1)


# (B, H, T, S, D, D_v, causal, block_m, block_n): T not a multiple of the block, T != S both ways,
# padded head dims with D_k != D_v, a query row of one, the largest head dim.
FLASH_CASES = [
    (2, 2, 37, 37, 16, 16, False, 16, 16),
    (2, 2, 37, 37, 16, 16, True, 16, 16),
    (1, 3, 20, 45, 24, 40, True, 16, 32),
    (1, 2, 45, 20, 32, 8, True, 32, 16),
    (1, 2, 1, 70, 64, 64, True, 16, 32),
    (1, 1, 33, 50, 128, 128, False, 32, 32),
]
CASE_IDS = [
    f"B{c[0]}-H{c[1]}-T{c[2]}-S{c[3]}-D{c[4]}-Dv{c[5]}-{'causal' if c[6] else 'full'}" for c in FLASH_CASES
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FLASH_CASES, ids=CASE_IDS)
def test_flash_forward_matches_float64_sdpa_and_the_pytorch_loop(case, device):
    B, H, T, S, D, DV, causal, block_m, block_n = case
    q, k, v = randn(B, H, T, D, seed=1), randn(B, H, S, D, seed=2), randn(B, H, S, DV, seed=3)
    out, lse = kernels.flash_attention(
        q.to(device),
        k.to(device),
        v.to(device),
        causal=causal,
        block_m=block_m,
        block_n=block_n,
        return_lse=True,
    )
    assert out.shape == (B, H, T, DV) and out.dtype == torch.float32 and lse.shape == (B, H, T)
    expected, expected_lse = reference_attention(q, k, v, causal)
    close(out, expected, ATOL32)
    assert torch.equal(lse.cpu().isneginf(), expected_lse.isneginf())  # rows that see no key
    finite = expected_lse.isfinite()
    close(lse.cpu()[finite], expected_lse[finite], ATOL32)
    # The course's PyTorch loop, and SDPA with the end-aligned mask (rows with a key only: SDPA
    # gives NaN for a row with none).
    close(out, torch_flash_attention(q, k, v, causal=causal), ATOL32)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T) if causal else None
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    close(out.cpu()[finite], sdpa[finite], ATOL32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [FLASH_CASES[i] for i in (1, 2, 3)], ids=[CASE_IDS[i] for i in (1, 2, 3)])
def test_flash_gradients_match_float64_autograd(case, device):
    B, H, T, S, D, DV, causal, block_m, block_n = case
    q, k, v = randn(B, H, T, D, seed=4), randn(B, H, S, D, seed=5), randn(B, H, S, DV, seed=6)
    grad_out, grad_lse = randn(B, H, T, DV, seed=7), randn(B, H, T, seed=8)
    leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
    out, lse = kernels.flash_attention(
        *leaves, causal=causal, block_m=block_m, block_n=block_n, return_lse=True
    )
    # A gradient on the logsumexp too (where it is finite): it enters the backward as dP - D + dL.
    finite = lse.isfinite()
    loss = (out * grad_out.to(device)).sum() + (torch.where(finite, lse, 0.0) * grad_lse.to(device)).sum()
    grads = torch.autograd.grad(loss, leaves)

    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    expected, expected_lse = reference_attention(*leaves64, causal)
    finite64 = expected_lse.isfinite()
    loss64 = (expected * grad_out.double()).sum() + (
        torch.where(finite64, expected_lse, 0.0) * grad_lse.double()
    ).sum()
    for got, want in zip(grads, torch.autograd.grad(loss64, leaves64)):
        assert got.dtype == torch.float32
        close(got, want, GRAD_ATOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_rows_that_see_no_key_give_zeros_and_zero_gradients(device):
    # Causal with T > S: queries 0 .. T - S - 1 see no key (the diagonal is aligned to the end).
    q, k, v = (randn(1, 1, n, 16, seed=s).to(device).requires_grad_() for n, s in ((40, 1), (9, 2), (9, 3)))
    out, lse = kernels.flash_attention(q, k, v, causal=True, block_m=16, block_n=16, return_lse=True)
    assert (out[0, 0, :31] == 0).all() and lse[0, 0, :31].isneginf().all() and lse[0, 0, 31:].isfinite().all()
    grad_q, grad_k = torch.autograd.grad(out.sum(), (q, k))
    assert torch.isfinite(grad_q).all() and (grad_q[0, 0, :31] == 0).all() and torch.isfinite(grad_k).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_half_precision_forward_and_gradients(dtype, device):
    B, H, T, S, D, DV, causal = 1, 2, 37, 50, 32, 24, True
    q, k, v = (randn(B, H, n, d, seed=s, dtype=dtype) for n, d, s in ((T, D, 1), (S, D, 2), (S, DV, 3)))
    grad_out = randn(B, H, T, DV, seed=4, dtype=dtype)
    leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
    out = kernels.flash_attention(*leaves, causal=causal, block_m=16, block_n=32)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, grad_out.to(device))
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]  # the same rounded inputs, in float64
    expected, _ = reference_attention(*leaves64, causal)
    close(out, expected, HALF_TOLERANCE[dtype])
    for got, want in zip(grads, torch.autograd.grad(expected, leaves64, grad_out.double())):
        assert got.dtype == dtype
        close(got, want, HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_is_an_option_at_a_wider_tolerance(device):
    q, k, v = randn(1, 2, 40, 32, seed=1), randn(1, 2, 40, 32, seed=2), randn(1, 2, 40, 32, seed=3)
    out = kernels.flash_attention(
        q.to(device), k.to(device), v.to(device), causal=True, block_m=16, block_n=16, input_precision="tf32"
    )
    close(out, reference_attention(q, k, v, True)[0], 2e-2)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6, deadline=None)
@given(
    T=st.integers(1, 40),
    S=st.integers(1, 40),
    D=st.sampled_from([8, 16, 20]),
    causal=st.booleans(),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
    scale=st.sampled_from([None, 0.0, -0.3, 2.0]),
)
def test_flash_any_shape_block_and_scale_matches_the_reference(device, T, S, D, causal, blocks, scale):
    q, k, v = randn(1, 1, T, D, seed=T), randn(1, 1, S, D, seed=S + 100), randn(1, 1, S, D, seed=S + 200)
    out = kernels.flash_attention(
        q.to(device),
        k.to(device),
        v.to(device),
        causal=causal,
        scale=scale,
        block_m=blocks[0],
        block_n=blocks[1],
    )
    close(out, reference_attention(q, k, v, causal, scale)[0], ATOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_empty_sequences(device):
    q, k, v = (
        randn(1, 2, 0, 16, seed=1).to(device),
        randn(1, 2, 5, 16, seed=2).to(device),
        randn(1, 2, 5, 16, seed=3),
    )
    assert kernels.flash_attention(q, k, v.to(device)).shape == (1, 2, 0, 16)
    q, k, v = (
        randn(1, 2, 4, 16, seed=1).to(device),
        randn(1, 2, 0, 16, seed=2).to(device),
        randn(1, 2, 0, 8, seed=3),
    )
    out, lse = kernels.flash_attention(q, k, v.to(device), return_lse=True)
    assert out.shape == (1, 2, 4, 8) and (out == 0).all() and lse.isneginf().all()


# --- paged decode -------------------------------------------------------------------------------


def filled_cache(lengths, *, page_size, num_kv_heads, D, DV, device, dtype=torch.float32, seed=0):
    """A PagedKVCache whose sequences grew together, so every block table jumps around the pool."""
    generator = torch.Generator().manual_seed(seed)
    pages = sum(math.ceil(n / page_size) for n in lengths) + 3
    cache = PagedKVCache(pages, page_size, num_kv_heads, D, value_dim=DV, dtype=dtype, device=device)
    for seq in range(len(lengths)):
        cache.add_sequence(seq)
    for step in range(max(lengths)):
        for seq, n in enumerate(lengths):
            if step < n:
                k = torch.randn(num_kv_heads, 1, D, generator=generator).to(device=device, dtype=dtype)
                v = torch.randn(num_kv_heads, 1, DV, generator=generator).to(device=device, dtype=dtype)
                cache.append(seq, k, v)
    return cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 9])
def test_paged_decode_matches_the_paged_cache_flash_decoding_and_sdpa(num_splits, device):
    # Lengths 0, 1, a partial page and several pages; page size 5 (not a power of two, not a block
    # multiple); grouped queries (4 query heads on 2 K/V heads); D_k != D_v, both padded.
    lengths, H_q, H_kv, D, DV = [13, 1, 0, 37], 4, 2, 24, 40
    cache = filled_cache(lengths, page_size=5, num_kv_heads=H_kv, D=D, DV=DV, device=device)
    tables, seq_lengths = kernels.paged_tables(cache, range(len(lengths)))
    assert tables.dtype == torch.int32 and tables.shape == (4, 8)
    q = randn(len(lengths), H_q, 1, D, seed=9).to(device)
    out, lse = kernels.paged_decode(
        q,
        cache.key_blocks,
        cache.value_blocks,
        tables,
        seq_lengths,
        num_splits=num_splits,
        block_n=16,
        return_lse=True,
    )
    assert out.shape == (4, H_q, 1, DV) and lse.shape == (4, H_q, 1)
    for seq, n in enumerate(lengths):
        if n == 0:
            assert (out[seq] == 0).all() and lse[seq].isneginf().all()
            continue
        close(out[seq], cache.attention(seq, q[seq]), ATOL32)  # the cache's own page-by-page loop
        keys, values = (x.repeat_interleave(H_q // H_kv, dim=0)[None].cpu() for x in cache.gather(seq))
        expected, expected_lse = flash_decoding(
            q[seq : seq + 1].cpu(), keys, values, num_splits=2, return_lse=True
        )
        close(out[seq : seq + 1], expected, ATOL32)
        close(lse[seq : seq + 1], expected_lse, ATOL32)
        close(
            out[seq : seq + 1], F.scaled_dot_product_attention(q[seq : seq + 1].cpu(), keys, values), ATOL32
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_paged_decode_half_precision(dtype, device):
    lengths = [20, 7]
    cache = filled_cache(lengths, page_size=16, num_kv_heads=2, D=32, DV=32, device=device, dtype=dtype)
    tables, seq_lengths = kernels.paged_tables(cache, [0, 1])
    q = randn(2, 2, 1, 32, seed=3, dtype=dtype).to(device)
    out = kernels.paged_decode(q, cache.key_blocks, cache.value_blocks, tables, seq_lengths, num_splits=2)
    assert out.dtype == dtype
    for seq in range(2):
        keys, values = (x.double()[None].cpu() for x in cache.gather(seq))
        expected, _ = reference_attention(q[seq : seq + 1].double(), keys, values, causal=False)
        close(out[seq : seq + 1], expected, HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_any_page_order_and_default_splits(device):
    # A hand-made table: sequence 0 on pages 3, 0, 2 (one page size 16, the block also 16).
    pool_k, pool_v = randn(4, 1, 16, 16, seed=1).to(device), randn(4, 1, 16, 16, seed=2).to(device)
    tables = torch.tensor([[3, 0, 2]], dtype=torch.int64, device=device)
    lengths = torch.tensor([40], device=device)
    q = randn(1, 1, 1, 16, seed=3).to(device)
    out = kernels.paged_decode(q, pool_k, pool_v, tables, lengths)
    keys = pool_k[[3, 0, 2]].transpose(0, 1).reshape(1, 48, 16)[:, :40][None]
    values = pool_v[[3, 0, 2]].transpose(0, 1).reshape(1, 48, 16)[:, :40][None]
    close(out, reference_attention(q, keys, values, causal=False)[0], ATOL32)


# --- chunked GLA --------------------------------------------------------------------------------


def gla_inputs(B, H, T, DK, DV, *, scalar_gate, strength=1.0, device="cpu", seed=0):
    q, k = randn(B, H, T, DK, seed=seed), randn(B, H, T, DK, seed=seed + 1)
    v = randn(B, H, T, DV, seed=seed + 2)
    shape = (B, H, T) if scalar_gate else (B, H, T, DK)
    g = strength * F.logsigmoid(randn(*shape, seed=seed + 3) + 1.0)
    return tuple(x.to(device) for x in (q, k, v, g))


def reference_gla(q, k, v, g, **kwargs):
    """course_lib's GLA, token by token in float64 (a scalar gate is one gate for every key dim)."""
    if g.dim() == 3:
        g = g[..., None].expand(*g.shape, q.shape[-1])
    return gla(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), g.double().cpu(), form="recurrent", **kwargs
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["gla", "simple_gla"])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_gla_chunk_matches_the_recurrence_with_states_in_and_out(chunk_size, scalar_gate, device):
    # T = 37: not a multiple of the chunk; D_k = 24 (padded), D_v = 40 (two blocks of 32 values).
    q, k, v, g = gla_inputs(2, 2, 37, 24, 40, scalar_gate=scalar_gate)
    initial = randn(2, 2, 24, 40, seed=9)
    out, final = kernels.gla_chunk(
        *(x.to(device) for x in (q, k, v, g)),
        chunk_size=chunk_size,
        initial_state=initial.to(device),
        output_final_state=True,
    )
    expected, expected_final = reference_gla(
        q, k, v, g, initial_state=initial.double(), output_final_state=True
    )
    close(out, expected, 2 * ATOL32)
    close(final, expected_final, 2 * ATOL32)
    # course_lib's own chunk form, float32 (the same chunking in PyTorch).
    gates = g[..., None].expand_as(q) if scalar_gate else g
    close(out, gla(q, k, v, gates, chunk_size=chunk_size, initial_state=initial), 2 * ATOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_gla_chunk_strong_forgetting_does_not_overflow(device):
    # Log gates down to -40 per step: exp(-b_s) alone would overflow float32 within one chunk.
    q, k, v, g = gla_inputs(1, 2, 40, 16, 16, scalar_gate=False, strength=40.0, seed=3)
    out = kernels.gla_chunk(*(x.to(device) for x in (q, k, v, g)), chunk_size=32)
    assert torch.isfinite(out).all()
    close(out, reference_gla(q, k, v, g), ATOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_gla_chunk_state_carried_across_calls_equals_one_call(device):
    q, k, v, g = (x.to(device) for x in gla_inputs(1, 2, 50, 16, 24, scalar_gate=True, seed=5))
    whole, whole_state = kernels.gla_chunk(q, k, v, g, output_final_state=True)
    first, state = kernels.gla_chunk(
        q[:, :, :21], k[:, :, :21], v[:, :, :21], g[:, :, :21], output_final_state=True
    )
    second, final = kernels.gla_chunk(
        q[:, :, 21:], k[:, :, 21:], v[:, :, 21:], g[:, :, 21:], initial_state=state, output_final_state=True
    )
    close(torch.cat([first, second], dim=2), whole, ATOL32)
    close(final, whole_state, ATOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_gla_chunk_short_and_empty_sequences(device):
    for T in (0, 1):
        q, k, v, g = gla_inputs(1, 1, T, 16, 8, scalar_gate=False, seed=7)
        initial = randn(1, 1, 16, 8, seed=8)
        out, final = kernels.gla_chunk(
            *(x.to(device) for x in (q, k, v, g)), initial_state=initial.to(device), output_final_state=True
        )
        expected, expected_final = reference_gla(
            q, k, v, g, initial_state=initial.double(), output_final_state=True
        )
        assert out.shape == (1, 1, T, 8)
        close(out, expected, ATOL32)
        close(final, expected_final, ATOL32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gla_chunk_half_precision(dtype, device):
    q, k, v, g = (x.to(dtype) for x in gla_inputs(1, 2, 30, 16, 16, scalar_gate=False, seed=11))
    out = kernels.gla_chunk(*(x.to(device) for x in (q, k, v, g)))
    assert out.dtype == dtype
    close(out, reference_gla(q, k, v, g), HALF_TOLERANCE[dtype])


# --- compiled for a GPU, without one -----------------------------------------------------------


def test_every_kernel_compiles_for_an_nvidia_gpu(tmp_path):
    """Compiling (not running) checks what the interpreter cannot: tl.dot's minimum sizes, loop
    variables that change type, shared memory. Triton compiles in-process, with the ptxas of its
    wheel; only the launch needs a GPU. It runs in a subprocess with the interpreter off."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "course_lib.kernels.compile_check"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name in compile_check.KERNELS:
        assert f"{name}: compiled for sm_80" in result.stdout


# --- bad input: a ValueError/TypeError naming the argument, never a Triton traceback ------------


def flash_args(T=8, S=8, D=16, DV=16, dtype=torch.float32):
    return (
        randn(1, 1, T, D, seed=1, dtype=dtype, device=RUN_DEVICE),
        randn(1, 1, S, D, seed=2, dtype=dtype, device=RUN_DEVICE),
        randn(1, 1, S, DV, seed=3, dtype=dtype, device=RUN_DEVICE),
    )


@pytest.mark.parametrize(
    "call, error, name",
    [
        (
            lambda: kernels.flash_attention(*flash_args(dtype=torch.float64)),
            TypeError,
            "q must be float16, bfloat16",
        ),
        (lambda: kernels.flash_attention(*flash_args(D=129)), ValueError, "head dim D=129"),
        (lambda: kernels.flash_attention(*flash_args(DV=256)), ValueError, "value head dim D_v=256"),
        (lambda: kernels.flash_attention(*flash_args(), block_m=24), ValueError, "block_m=24"),
        (lambda: kernels.flash_attention(*flash_args(), block_n=8), ValueError, "block_n=8"),
        (lambda: kernels.flash_attention(*flash_args(), block_m=64.0), TypeError, "block_m"),
        (
            lambda: kernels.flash_attention(*flash_args(), input_precision="fast"),
            ValueError,
            "input_precision",
        ),
        (lambda: kernels.flash_attention(*flash_args(), causal=1), TypeError, "causal"),
        (lambda: kernels.flash_attention(*flash_args(), return_lse="yes"), TypeError, "return_lse"),
        (lambda: kernels.flash_attention(*flash_args(), scale=float("nan")), ValueError, "scale"),
        (lambda: kernels.flash_attention(*flash_args()[:2], flash_args(S=9)[2]), ValueError, "v must have"),
        (
            lambda: kernels.flash_attention(
                *[torch.zeros(1, 1, 1, 16, device=RUN_DEVICE).expand(1, 2**27, 1, 16)] * 3
            ),
            ValueError,
            "q has 2147483648 elements: the kernels index with 32-bit offsets",
        ),
    ],
)
def test_flash_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_mismatched_devices_are_refused_before_any_kernel_runs():
    q, k, v = flash_args()
    with pytest.raises(ValueError, match="on one device"):
        kernels.flash_attention(q, elsewhere(k), v)
    with pytest.raises(ValueError, match="block_tables must be on the same device as q"):
        kernels.paged_decode(
            q[:, :, :1],
            k[None, 0],
            v[None, 0],
            elsewhere(torch.zeros(1, 1, dtype=torch.int32)),
            torch.ones(1, dtype=torch.int32),
        )


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(ValueError, match="q is on the CPU but Triton's interpreter is off"):
        kernels.flash_attention(*(x.cpu() for x in flash_args()))
    with pytest.raises(ValueError, match="q is on the CPU but Triton's interpreter is off"):
        kernels.gla_chunk(*gla_inputs(1, 1, 4, 16, 16, scalar_gate=True))


def test_out_of_shared_memory_becomes_a_value_error_naming_the_blocks():
    import triton

    class TooBig:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise triton.runtime.errors.OutOfResources(294912, 232448, "shared memory")

            return run

    with pytest.raises(ValueError, match="block_m=128, block_n=128: the tiles need 294912 of shared memory"):
        common.launch(TooBig(), (1,), blocks="block_m=128, block_n=128")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_largest_blocks_either_run_or_say_they_do_not_fit():
    q, k, v = (x.cuda() for x in flash_args(T=256, S=256, D=128, DV=128))
    try:
        out = kernels.flash_attention(q, k, v, block_m=128, block_n=128)
    except ValueError as error:  # a clear message, never Triton's OutOfResources
        assert "block_m=128, block_n=128" in str(error)
    else:
        close(out, reference_attention(q, k, v, False)[0], ATOL32)


def paged_args(lengths=(5,), page_size=4, H_q=2, H_kv=1, D=16, dtype=torch.float32):
    pages = max(1, sum(math.ceil(n / page_size) for n in lengths))
    q = randn(len(lengths), H_q, 1, D, seed=1, dtype=dtype)
    pool_k, pool_v = (
        randn(pages, H_kv, page_size, D, seed=2, dtype=dtype),
        randn(pages, H_kv, page_size, D, seed=3, dtype=dtype),
    )
    tables = torch.arange(pages, dtype=torch.int32).reshape(1, -1).repeat(len(lengths), 1)
    args = q, pool_k, pool_v, tables, torch.tensor(lengths, dtype=torch.int32)
    return tuple(x.to(RUN_DEVICE) for x in args)


def with_item(args, index, value):
    args = list(args)
    args[index] = value.to(RUN_DEVICE)
    return args


@pytest.mark.parametrize(
    "call, error, name",
    [
        (
            lambda: kernels.paged_decode(*with_item(paged_args(), 0, randn(1, 2, 2, 16, seed=0))),
            ValueError,
            "q must hold one new token",
        ),
        (
            lambda: kernels.paged_decode(*with_item(paged_args(), 3, torch.zeros(1, 2))),
            TypeError,
            "block_tables must have dtype",
        ),
        (
            lambda: kernels.paged_decode(*with_item(paged_args(), 4, torch.tensor([9], dtype=torch.int32))),
            ValueError,
            "lengths must lie in 0 .. 8",
        ),
        (
            lambda: kernels.paged_decode(
                *with_item(paged_args(), 3, torch.tensor([[0, 7]], dtype=torch.int32))
            ),
            ValueError,
            "block_tables must name pages 0 .. 1",
        ),
        (
            lambda: kernels.paged_decode(*paged_args(H_q=3, H_kv=2)),
            ValueError,
            "num_kv_heads=2 must divide num_heads=3",
        ),
        (lambda: kernels.paged_decode(*paged_args(), block_n=20), ValueError, "block_n=20"),
        (lambda: kernels.paged_decode(*paged_args(), num_splits=0), ValueError, "num_splits=0"),
        (
            lambda: kernels.paged_decode(*paged_args(dtype=torch.float64)),
            TypeError,
            "q must be float16, bfloat16",
        ),
        (lambda: kernels.paged_decode(*paged_args(D=200)), ValueError, "head dim D=200"),
        (lambda: kernels.paged_tables("cache", [0]), TypeError, "cache must be a PagedKVCache"),
    ],
)
def test_paged_decode_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize(
    "call, error, name",
    [
        (
            lambda: kernels.gla_chunk(
                *gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE), chunk_size=8
            ),
            ValueError,
            "chunk_size=8",
        ),
        (
            lambda: kernels.gla_chunk(
                *gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE), block_dv=48
            ),
            ValueError,
            "block_dv=48",
        ),
        (
            lambda: kernels.gla_chunk(
                *with_item(
                    gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE), 3, torch.ones(1, 1, 8)
                )
            ),
            ValueError,
            "g must be <= 0",
        ),
        (
            lambda: kernels.gla_chunk(
                *with_item(
                    gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE),
                    3,
                    -torch.ones(1, 1, 8, 3),
                )
            ),
            ValueError,
            "g must have shape",
        ),
        (
            lambda: kernels.gla_chunk(
                *(x.double() for x in gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE))
            ),
            TypeError,
            "q must be float16, bfloat16",
        ),
        (
            lambda: kernels.gla_chunk(*gla_inputs(1, 1, 8, 160, 16, scalar_gate=True, device=RUN_DEVICE)),
            ValueError,
            "key head dim D_k=160",
        ),
        (
            lambda: kernels.gla_chunk(
                *gla_inputs(1, 1, 8, 16, 16, scalar_gate=True, device=RUN_DEVICE), output_final_state=1
            ),
            TypeError,
            "output_final_state",
        ),
    ],
)
def test_gla_chunk_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
