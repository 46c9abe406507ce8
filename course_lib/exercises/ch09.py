"""Checkers for notebook 09: the FA2 kernel's inner step, causal block skipping, the paged gather.

Each exercise is a ``@triton.jit`` function that the library's kernel calls in place of its own
(:func:`course_lib.kernels.fa2_forward` takes ``attend=`` and ``key_end=``,
:func:`course_lib.kernels.paged_decode` takes ``gather=``), so the reader's code runs inside the
real kernel, on the CPU under Triton's interpreter or compiled on a GPU. Expected values come from
the course's PyTorch code: ``course_lib.tiling.flash_attention`` and
``course_lib.kv_cache.PagedKVCache.attention``, on random shapes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .. import kernels
from ..kernels import INTERPRET, fa2_forward, paged_decode, paged_tables
from ..kv_cache import PagedKVCache
from ..tiling import flash_attention
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_fa2_inner", "check_causal_skipping", "check_page_gather"]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tolerance() -> float:
    # The interpreter multiplies float32 exactly; on a GPU a plain tl.dot of float32 uses TF32.
    return 1e-4 if INTERPRET else 2e-2


def _refuse_library_call(fn: object, checker: str, forbidden: str) -> None:
    """The exercise is to write the step, not to call (or pass) the library's."""
    message = f"{checker}: write the step yourself instead of using course_lib's {forbidden}"
    if fn is getattr(kernels, forbidden):
        raise ExerciseFailed(message)
    try:
        source = inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):
        return
    body = source.split(":", 1)[-1]
    if forbidden in body and "NotImplementedError" not in body:
        raise ExerciseFailed(message)


def _call(run: Callable[[], object]) -> object:
    """Run the kernel; a stub's NotImplementedError (wrapped by Triton) reads as "not implemented yet"."""
    try:
        return run()
    except NotImplementedError:
        raise
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, NotImplementedError) or "NotImplementedError" in str(cause):
                raise NotImplementedError from None
            cause = cause.__cause__ or cause.__context__
        raise


def _qkv(generator, B, H, T, S, D, DV):
    q = torch.randn(B, H, T, D, generator=generator)
    k = torch.randn(B, H, S, D, generator=generator)
    v = torch.randn(B, H, S, DV, generator=generator)
    return q, k, v


# (B, H, T, S, D, D_v, causal, block_m, block_n): T not a multiple of the block, T != S both ways.
_FLASH_CASES = [
    (1, 2, 37, 37, 16, 16, False, 16, 16),
    (1, 1, 20, 45, 24, 40, True, 16, 32),
    (2, 1, 45, 20, 32, 8, True, 32, 16),
    (1, 1, 1, 50, 16, 16, True, 16, 16),
]


def check_fa2_inner(attend: Callable) -> None:
    """``attend(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION)``, a ``@triton.jit``
    function: fold one K/V block into a Q block's running softmax (the body of the FA2 loop).

    q ``(BLOCK_M, D)``, k ``(BLOCK_N, D)``, v ``(BLOCK_N, D_v)``; ``visible`` is False where a query
    may not see a key; ``row_max``, ``row_sum`` ``(BLOCK_M,)`` and the unnormalised ``acc``
    ``(BLOCK_M, D_v)`` describe the keys seen so far; returns the three updated. Runs inside
    ``course_lib.kernels.fa2_forward_kernel`` and is compared with ``course_lib.tiling.flash_attention``.
    """
    _refuse_library_call(attend, "check_fa2_inner", "attend_block")
    generator = torch.Generator().manual_seed(90)

    def case(B, H, T, S, D, DV, causal, block_m, block_n):
        q, k, v = _qkv(generator, B, H, T, S, D, DV)
        label = f"T={T}, S={S}, D={D}, D_v={DV}, {'causal' if causal else 'full'}, blocks {block_m}x{block_n}"

        def check():
            expected, expected_lse = flash_attention(
                q.double(), k.double(), v.double(), causal=causal, return_lse=True
            )
            device = _device()
            out, lse = _call(
                lambda: fa2_forward(
                    q.to(device), k.to(device), v.to(device),
                    causal=causal, block_m=block_m, block_n=block_n, attend=attend,
                )
            )  # fmt: skip
            compare(out, expected, f"{label}: output", atol=_tolerance(), rtol=_tolerance())
            if not torch.equal(lse.cpu().isneginf(), expected_lse.isneginf()):
                raise ExerciseFailed(
                    f"{label}: a query that sees no key must keep row_sum 0 (logsumexp -inf)"
                )
            seen = expected_lse.isfinite()
            compare(
                lse.cpu()[seen],
                expected_lse[seen],
                f"{label}: logsumexp",
                atol=_tolerance(),
                rtol=_tolerance(),
            )

        return check

    run_cases("check_fa2_inner", [(f"case {i}", case(*c)) for i, c in enumerate(_FLASH_CASES)])


@triton.jit
def _key_end_probe(OUT, T, S, BLOCK_M: tl.constexpr, KEY_END: tl.constexpr):
    """Store ``KEY_END`` of each Q block, so the checker can count the K blocks the loop visits."""
    block = tl.program_id(0)
    tl.store(OUT + block, KEY_END(block * BLOCK_M, T, S, BLOCK_M))


def _needed_key_blocks(T: int, S: int, block_m: int, block_n: int) -> list[int]:
    """For each Q block, how many K blocks hold a key one of its queries may see (from the definition)."""
    needed = []
    for start in range(0, T, block_m):
        last_query = min(start + block_m, T) - 1
        keys_seen = min(S, max(0, last_query + S - T + 1))  # query i sees keys 0 .. i + S - T
        needed.append(math.ceil(keys_seen / block_n))
    return needed


def check_causal_skipping(key_end: Callable) -> None:
    """``key_end(start_m, T, S, BLOCK_M)``, a ``@triton.jit`` function: one past the last key that
    a query of the block ``start_m .. start_m + BLOCK_M - 1`` may see (query i sees keys
    ``0 .. i + S - T``). The forward kernel's loop stops there; the checker compares the output with
    ``course_lib.tiling.flash_attention`` (nothing visible skipped) and counts the K blocks the loop
    visits against those that hold a visible key (nothing invisible visited)."""
    _refuse_library_call(key_end, "check_causal_skipping", "causal_key_end")
    generator = torch.Generator().manual_seed(91)
    cases = [(64, 64, 16, 16), (37, 37, 16, 32), (20, 45, 16, 16), (45, 20, 32, 16), (1, 50, 16, 16)]

    def case(T, S, block_m, block_n):
        q, k, v = _qkv(generator, 1, 1, T, S, 16, 16)
        label = f"T={T}, S={S}, blocks {block_m}x{block_n}"

        def check():
            device = _device()
            out, _ = _call(
                lambda: fa2_forward(
                    q.to(device), k.to(device), v.to(device),
                    causal=True, block_m=block_m, block_n=block_n, key_end=key_end,
                )
            )  # fmt: skip
            expected = flash_attention(q.double(), k.double(), v.double(), causal=True)
            compare(
                out, expected, f"{label}: output (a skipped block held a visible key?)", atol=1e-4, rtol=1e-4
            )
            ends = torch.zeros(triton.cdiv(T, block_m), dtype=torch.int32, device=device)
            _call(lambda: _key_end_probe[(len(ends),)](ends, T, S, block_m, key_end))
            visited = [math.ceil(max(0, int(end)) / block_n) for end in ends.tolist()]
            for block, (got, needed) in enumerate(zip(visited, _needed_key_blocks(T, S, block_m, block_n))):
                if got != needed:
                    rows = f"queries {block * block_m}..{min((block + 1) * block_m, T) - 1}"
                    raise ExerciseFailed(
                        f"{label}: Q block {block} ({rows}) visits {got} K blocks, but {needed} hold a key "
                        f"it may see (key_end returned {ends[block].item()})"
                    )

        return check

    run_cases("check_causal_skipping", [(f"T={c[0]}, S={c[1]}", case(*c)) for c in cases])


def check_page_gather(gather: Callable) -> None:
    """``gather(TABLE, tokens, valid, page_size, page_stride, token_stride)``, a ``@triton.jit``
    function: the element offsets in the pool of the rows of logical ``tokens`` (BLOCK_N,) of one
    sequence, whose block table row starts at ``TABLE`` (logical page -> physical page). Pages are
    ``page_stride`` elements apart, tokens within a page ``token_stride``; load only where ``valid``.
    Runs inside ``course_lib.kernels.paged_decode_kernel`` on caches whose pages are scattered, and
    is compared with ``course_lib.kv_cache.PagedKVCache.attention``."""
    _refuse_library_call(gather, "check_page_gather", "page_offsets")
    generator = torch.Generator().manual_seed(92)
    cases = [([13, 1, 40], 4, 2, 1), ([33, 16], 16, 4, 2), ([7, 29, 18], 3, 2, 2), ([50], 5, 1, 1)]

    def case(lengths, page_size, num_heads, num_kv_heads):
        device = _device()
        D = 16
        pages = sum(math.ceil(n / page_size) for n in lengths) + 2
        cache = PagedKVCache(pages, page_size, num_kv_heads, D, device=device)
        for seq in range(len(lengths)):
            cache.add_sequence(seq)
        for step in range(max(lengths)):  # sequences grow together: their pages interleave in the pool
            for seq, n in enumerate(lengths):
                if step < n:
                    keys, values = (torch.randn(num_kv_heads, 1, D, generator=generator) for _ in range(2))
                    cache.append(seq, keys.to(device), values.to(device))
        q = torch.randn(len(lengths), num_heads, 1, D, generator=generator).to(device)
        label = f"lengths {lengths}, page size {page_size}, {num_heads} query / {num_kv_heads} K/V heads"

        def check():
            tables, seq_lengths = paged_tables(cache, range(len(lengths)))
            out = _call(
                lambda: paged_decode(
                    q, cache.key_blocks, cache.value_blocks, tables, seq_lengths,
                    num_splits=2, block_n=16, gather=gather,
                )
            )  # fmt: skip
            for seq in range(len(lengths)):
                compare(
                    out[seq], cache.attention(seq, q[seq]), f"{label}: sequence {seq}", atol=1e-4, rtol=1e-4
                )

        return check

    run_cases("check_page_gather", [(f"page size {c[1]}", case(*c)) for c in cases])
