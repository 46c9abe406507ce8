"""Checkers for notebook 09: the FA2 kernel's inner step, causal block skipping, the paged gather; and the
chapter's predict and explain exercises.

Each build exercise is a ``@triton.jit`` function that the library's kernel calls in place of its own
(:func:`course_lib.kernels.fa2_forward` takes ``attend=`` and ``key_end=``,
:func:`course_lib.kernels.paged_decode` takes ``gather=``), so the reader's code runs inside the real kernel:
on the CPU under Triton's interpreter, compiled on a GPU. A case's ``call`` launches the kernel; the guard
lets the kernel's own code run (named in each exercise's ``allow``) but not the library's answer to the
exercise, which is refused whether it is called from the reader's function (the interpreter runs it as
Python, in a file of ``course_lib``) or referred to by it (checked before the launch, for compiled kernels).
Expected values come from the course's PyTorch code in float64: ``course_lib.tiling.flash_attention`` and
``course_lib.kv_cache.PagedKVCache.attention``; the hints from a PyTorch replay of the kernel's loop with one
named mistake.

Needs Triton (the course's ``kernels`` extra); :mod:`.catalog` imports this module only when it is installed.
"""

# ruff: noqa: I001  (course_lib.kernels first: it switches Triton's interpreter on before Triton is imported)
from __future__ import annotations

import math
import types
from pathlib import Path

import torch

from ..kernels import INTERPRET, fa2_forward, paged_decode, paged_tables

import triton
import triton.language as tl

from ..kv_cache import PagedKVCache
from ..tiling import flash_attention
from .common import Case, Draw, Mismatch, checker, compare, declare
from .guard import Refused

__all__ = ["check_fa2_inner", "check_causal_skipping", "check_page_gather"]

_TRITON_DIR = str(Path(triton.__file__).resolve().parent)  # its compiler runs ptxas on a GPU
_FORWARD = "course_lib.kernels.flash_forward."
_DECODE = "course_lib.kernels.decode."
_HERE = "course_lib.exercises.ch09."
# The kernels' own code, which runs around the reader's step (the interpreter runs it as Python).
_KERNEL_COMMON = ("course_lib.kernels.common",)
_CALLS = tuple(_HERE + name for name in ("_check_jit", "_is_course_object", "_unwrap"))  # around the launch
_FORWARD_CODE = tuple(
    _FORWARD + name
    for name in ("fa2_forward", "_fa2_forward", "fa2_forward_kernel", "check_flash_inputs", "default_blocks")
) + (_FORWARD + "<module>",)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tolerance() -> float:
    # The interpreter multiplies float32 exactly; on a GPU a plain tl.dot of float32 uses TF32.
    return 1e-4 if INTERPRET else 2e-2


# ---------------------------------------------------------------------------------------------------
# Running the reader's @triton.jit function inside a library kernel (inside the guard).


def _is_course_object(value: object) -> str | None:
    """The ``course_lib`` name of a module, function or Triton function, else None."""
    if isinstance(value, types.ModuleType):
        name = value.__name__
    else:
        inner = getattr(value, "fn", value)  # a @triton.jit function keeps the Python function in .fn
        name = f"{getattr(inner, '__module__', '') or ''}.{getattr(inner, '__qualname__', '')}"
    return name if name == "course_lib" or name.startswith("course_lib.") else None


def _check_jit(fn: object, what: str) -> None:
    """``fn`` must be the reader's own step, referring to nothing of ``course_lib``, checked before the launch
    because a compiled kernel runs on the GPU, where the guard cannot watch it. Compiled kernels call only
    ``@triton.jit`` functions; the interpreter also runs a plain Python function (watched like any code)."""
    triton_function = type(fn).__module__.startswith("triton") and isinstance(
        getattr(fn, "fn", None), types.FunctionType
    )
    inner = fn.fn if triton_function else fn
    if not isinstance(inner, types.FunctionType) or not (triton_function or INTERPRET):
        raise TypeError(
            f"{what} must be a @triton.jit function (the kernel calls it on tiles), got {type(fn).__name__}"
        )
    own = _is_course_object(fn)
    if own:
        raise Refused(f"your function is {own}, the course's own code; write {what} yourself")
    for name in inner.__code__.co_names:
        course = _is_course_object(inner.__globals__.get(name))
        if course:
            raise Refused(f"your function refers to {course}, the course's own code; write {what} yourself")


def _unwrap(run):
    """Run a launch; the interpreter wraps what the reader's code raised: raise the original instead (a
    stub's NotImplementedError then reads as "not implemented yet")."""
    try:
        return run()
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, NotImplementedError) or "NotImplementedError" in str(cause):
                raise NotImplementedError("not implemented yet") from None
            if not type(cause).__module__.startswith("triton") and cause is not error:
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def _run_attend(attend, q, k, v, causal, block_m, block_n):
    """The forward kernel with the reader's inner step: ``(out, lse)`` on the CPU."""
    _check_jit(attend, "the inner step")
    out, lse = _unwrap(
        lambda: fa2_forward(q, k, v, causal=causal, block_m=block_m, block_n=block_n, attend=attend)
    )
    return out.cpu(), lse.cpu()


@triton.jit
def _key_end_probe(OUT, T, S, BLOCK_M: tl.constexpr, KEY_END: tl.constexpr):
    """Store ``KEY_END`` of each Q block, so the checker can count the K blocks the loop visits."""
    block = tl.program_id(0)
    tl.store(OUT + block, KEY_END(block * BLOCK_M, T, S, BLOCK_M))


def _run_key_end(key_end, q, k, v, block_m, block_n):
    """The causal forward kernel with the reader's bound, and the bound of every Q block: ``(out, ends)``."""
    _check_jit(key_end, "the loop's bound")
    T, S = q.shape[2], k.shape[2]
    out, _ = _unwrap(
        lambda: fa2_forward(q, k, v, causal=True, block_m=block_m, block_n=block_n, key_end=key_end)
    )
    ends = torch.zeros(triton.cdiv(T, block_m), dtype=torch.int32, device=q.device)
    _unwrap(lambda: _key_end_probe[(len(ends),)](ends, T, S, block_m, key_end))
    return out.cpu(), ends.cpu()


def _run_gather(gather, q, key_blocks, value_blocks, tables, lengths, num_splits, block_n):
    """The paged decode kernel with the reader's gather: the output of every sequence, on the CPU."""
    _check_jit(gather, "the gather")
    out = _unwrap(
        lambda: paged_decode(
            q,
            key_blocks,
            value_blocks,
            tables,
            lengths,
            num_splits=num_splits,
            block_n=block_n,
            gather=gather,
        )
    )
    return out.cpu()


# ---------------------------------------------------------------------------------------------------
# 9.1: the FA2 inner step.


def _fa2_replay(q, k, v, causal, block_m, block_n, mistake=None):
    """The forward kernel's loop in PyTorch (float64), block by block, with one named ``mistake``: what a
    wrong inner step computes, for hints. Returns the output."""
    B, H, T, D = q.shape
    S, scale = k.shape[2], D**-0.5
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for start_m in range(0, T, block_m):
        rows = torch.arange(start_m, min(start_m + block_m, T))
        qb = q[:, :, rows].double()
        row_max = torch.full((B, H, len(rows)), -math.inf, dtype=torch.float64)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(B, H, len(rows), v.shape[-1], dtype=torch.float64)
        key_end = min(S, start_m + block_m + S - T) if causal else S
        for start_n in range(0, max(key_end, 0), block_n):
            cols = torch.arange(start_n, start_n + block_n)
            inside = cols < S
            kb = torch.zeros(B, H, block_n, D, dtype=torch.float64)
            vb = torch.zeros(B, H, block_n, v.shape[-1], dtype=torch.float64)
            kb[:, :, inside], vb[:, :, inside] = (
                k[:, :, cols[inside]].double(),
                v[:, :, cols[inside]].double(),
            )
            visible = inside[None, :].expand(len(rows), block_n)
            if causal:
                visible = visible & (cols[None, :] <= rows[:, None] + S - T)
            scores = qb @ kb.transpose(-1, -2) * (1.0 if mistake == "no scale" else scale)
            if mistake != "mask ignored":
                scores = scores.masked_fill(~visible, -math.inf)
            new_max = torch.maximum(row_max, scores.amax(-1))
            safe = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
            p = torch.exp(scores - safe[..., None])
            correction = 1.0 if mistake == "no rescale" else torch.exp(row_max - safe)
            row_sum = row_sum * correction + p.sum(-1)
            acc = acc * (correction if mistake == "no rescale" else correction[..., None]) + p @ vb
            row_max = new_max
        out[:, :, rows] = acc / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))[..., None]
    return out


@checker(
    "9.1",
    title="the FA2 inner step",
    points=2,
    task="the inner step",
    allow=(*_FORWARD_CODE, _FORWARD + "causal_key_end", *_KERNEL_COMMON, *_CALLS, _HERE + "_run_attend"),
    processes_from=(_TRITON_DIR,),
)
def check_fa2_inner(draw: Draw):
    """``attend(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION)``, a ``@triton.jit`` function:
    fold one K/V block into a Q block's running softmax (the body of the FA2 loop). q ``(BLOCK_M, D)``, k
    ``(BLOCK_N, D)``, v ``(BLOCK_N, D_v)``; ``visible`` is False where a query may not see a key;
    ``row_max``, ``row_sum`` ``(BLOCK_M,)`` and the unnormalised ``acc`` ``(BLOCK_M, D_v)`` describe the keys
    seen so far; returns the three updated. Runs inside ``course_lib.kernels.fa2_forward_kernel``."""
    for name, T, S, causal, blocks, large in [
        ("full attention, T not a multiple of the block", draw.not_multiple(20, 45, 16), None, False,
         (16, 16), False),
        ("causal, fewer queries than keys", draw.int(9, 30), draw.int(33, 60), True, (16, 32), False),
        ("causal, more queries than keys: the first queries see no key", draw.int(34, 50), draw.int(9, 24),
         True, (32, 16), False),
        ("one query", 1, draw.int(20, 50), True, (16, 16), False),
        ("scores beyond 88 (their exp overflows float32)", draw.int(17, 30), draw.int(17, 40),
         False, (16, 16), True),
    ]:  # fmt: skip
        S = T if S is None else S
        D, DV = draw.choice([16, 24]), draw.choice([8, 16, 24])
        q, k, v = draw.randn(1, 1, T, D), draw.randn(1, 1, S, D), draw.randn(1, 1, S, DV)
        if large:
            q = q * 60.0  # scores up to a hundred or more: exp overflows float32 beyond 88.7
        yield _attend_case(f"{name}: T={T}, S={S}, D={D}, D_v={DV}, blocks {blocks[0]}x{blocks[1]}",
                           q, k, v, causal, *blocks)  # fmt: skip


def _attend_case(name, q, k, v, causal, block_m, block_n) -> Case:
    T, S = q.shape[2], k.shape[2]
    tolerance = _tolerance()
    sees_nothing = torch.zeros(T, dtype=torch.bool)
    if causal and T > S:
        sees_nothing[: T - S] = True
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), -math.inf)
    largest = scores.amax(-1)  # (1, H, T): each query's largest visible score
    regions = {
        "in queries that see no key at all": sees_nothing.expand(1, 1, T)[..., None].expand(
            1, 1, T, v.shape[-1]
        ),
        "in queries whose largest score exceeds 88": (largest > 88)[..., None].expand(1, 1, T, v.shape[-1]),
    }
    advice = {
        "in queries that see no key at all": "row_max stays -inf there, and exp(-inf - (-inf)) is NaN: "
        "subtract 0 where the new max is -inf (and keep row_sum 0)",
        "in queries whose largest score exceeds 88": "exp(score) overflows float32: subtract the running max "
        "before exponentiating, and rescale row_sum and acc by exp(old max - new max)",
    }
    variants = {
        "the old row_sum and acc not rescaled by exp(old max - new max)": lambda: _fa2_replay(
            q, k, v, causal, block_m, block_n, "no rescale"
        ),
        "scores without the scale": lambda: _fa2_replay(q, k, v, causal, block_m, block_n, "no scale"),
        "the visible mask ignored (keys past S or above the diagonal counted)": lambda: _fa2_replay(
            q, k, v, causal, block_m, block_n, "mask ignored"
        ),
    }

    def expected():
        return flash_attention(q, k, v, causal=causal, return_lse=True)

    def judge(got, expected):
        out, lse = got
        compare(out, expected[0].float(), "output", atol=tolerance, rtol=tolerance, variants=variants,
                regions=regions, advice=advice, check_dtype=False)  # fmt: skip
        if not torch.equal(lse.isneginf(), expected[1].isneginf()):
            raise Mismatch(
                "logsumexp: a query that sees no key must keep row_sum 0 (logsumexp -inf), and every other "
                "query must end with row_sum > 0"
            )
        seen = expected[1].isfinite()
        try:
            compare(lse[seen], expected[1][seen].float(), "logsumexp", atol=tolerance, rtol=tolerance,
                    check_dtype=False)  # fmt: skip
        except Mismatch as mismatch:
            off_by_max = torch.allclose(
                (lse - expected[1])[seen].double(), largest[seen], atol=1e-3, rtol=1e-3
            )
            if not off_by_max:
                raise
            raise Mismatch(
                f"{mismatch}\nhint: your logsumexp is the answer plus each query's largest score: row_sum "
                "holds exp(score) without the running max subtracted, and the kernel adds row_max back at "
                "the end (lse = row_max + log row_sum); subtract the running max before exponentiating"
            ) from None

    device = _device()
    return Case(
        name,
        (q.float().to(device), k.float().to(device), v.float().to(device), causal, block_m, block_n),
        expected=expected,
        compare=judge,
        inputs=["q", "k", "v", "causal", "block_m", "block_n"],
        call=_run_attend,
    )


# ---------------------------------------------------------------------------------------------------
# 9.2: causal block skipping.


def _needed_key_blocks(T: int, S: int, block_m: int, block_n: int) -> list[int]:
    """For each Q block, how many K blocks hold a key one of its queries may see (from the definition)."""
    needed = []
    for start in range(0, T, block_m):
        last_query = min(start + block_m, T) - 1
        keys_seen = min(S, max(0, last_query + S - T + 1))  # query i sees keys 0 .. i + S - T
        needed.append(math.ceil(keys_seen / block_n))
    return needed


@checker(
    "9.2",
    title="causal block skipping",
    points=1,
    task="the loop's bound",
    allow=(*_FORWARD_CODE, _FORWARD + "attend_block", *_KERNEL_COMMON, *_CALLS, _HERE + "_run_key_end",
           _HERE + "_key_end_probe", _HERE + "<module>"),
    processes_from=(_TRITON_DIR,),
)  # fmt: skip
def check_causal_skipping(draw: Draw):
    """``key_end(start_m, T, S, BLOCK_M)``, a ``@triton.jit`` function: one past the last key that a query of
    the block ``start_m .. start_m + BLOCK_M - 1`` may see (query i sees keys ``0 .. i + S - T``), at most S.
    The forward kernel's loop stops there: the output must not change (nothing visible skipped) and every
    K block the loop visits must hold a visible key (nothing invisible visited)."""
    for name, T, S, block_m, block_n in [
        ("T = S, square blocks", draw.choice([48, 64]), None, 16, 16),
        ("T = S, not a multiple of the blocks", draw.not_multiple(33, 50, 16), None, 16, 32),
        ("fewer queries than keys", draw.int(12, 24), draw.int(36, 56), 16, 16),
        ("more queries than keys", draw.int(36, 50), draw.int(12, 24), 32, 16),
        ("one query", 1, draw.int(30, 50), 16, 16),
    ]:
        S = T if S is None else S
        q, k, v = draw.randn(1, 1, T, 16), draw.randn(1, 1, S, 16), draw.randn(1, 1, S, 16)
        yield _key_end_case(f"{name}: T={T}, S={S}, blocks {block_m}x{block_n}", q, k, v, block_m, block_n)


def _key_end_case(name, q, k, v, block_m, block_n) -> Case:
    T, S = q.shape[2], k.shape[2]
    needed = _needed_key_blocks(T, S, block_m, block_n)
    start_aligned = [min(S, start + block_m) for start in range(0, T, block_m)]

    def judge(got, expected):
        out, ends = got
        hints = []
        if any(int(end) > S for end in ends):
            hints.append(f"key_end must never pass S = {S}: blocks past the last key hold nothing")
        if T != S and ends.tolist() == start_aligned:
            hints.append("your bound ignores S - T: the diagonal is aligned to the end, query i sees keys up "
                         "to i + S - T")  # fmt: skip
        try:
            compare(out, expected.float(), "output (a skipped K block held a key the queries may see?)",
                    atol=1e-4, rtol=1e-4, check_dtype=False)  # fmt: skip
        except Mismatch as mismatch:
            raise Mismatch("\n".join([str(mismatch)] + ["hint: " + h for h in hints])) from None
        visited = [math.ceil(max(0, int(end)) / block_n) for end in ends.tolist()]
        for block, (got_blocks, want) in enumerate(zip(visited, needed)):
            if got_blocks != want:
                rows = f"queries {block * block_m}..{min((block + 1) * block_m, T) - 1}"
                raise Mismatch(
                    f"Q block {block} ({rows}) visits {got_blocks} K blocks, but {want} hold a key it may "
                    f"see (key_end returned {int(ends[block])})" + "".join("\nhint: " + h for h in hints)
                )

    device = _device()
    return Case(
        name,
        (q.float().to(device), k.float().to(device), v.float().to(device), block_m, block_n),
        expected=lambda: flash_attention(q, k, v, causal=True),
        compare=judge,
        inputs=["q", "k", "v", "block_m", "block_n"],
        call=_run_key_end,
    )


# ---------------------------------------------------------------------------------------------------
# 9.3: the paged gather.


def _decode_replay(cache: PagedKVCache, q: torch.Tensor, lengths: list[int], mistake: str) -> torch.Tensor:
    """Decode attention that reads the pool through a wrong gather (named ``mistake``), in float64: what
    the kernel computes with it, for hints."""
    pages, kv_heads, page_size, D = cache.key_blocks.shape
    keys = cache.key_blocks.double().cpu().reshape(-1, D)  # rows of the pool: (page, kv head, slot)
    values = cache.value_blocks.double().cpu().reshape(-1, cache.value_blocks.shape[-1])
    heads = q.shape[1]
    outputs = []
    for seq, length in enumerate(lengths):
        tokens = torch.arange(length)
        table = torch.tensor(cache.block_tables[seq], dtype=torch.long)
        logical, slot = tokens // page_size, tokens % page_size
        if mistake == "contiguous":
            page_rows = logical * kv_heads * page_size
        else:  # "page stride": pages page_size * token_stride apart
            page_rows = table[logical] * page_size
        per_head = []
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            rows = page_rows + kv_head * page_size + slot
            scores = keys[rows] @ q[seq, head, 0].double().cpu() * D**-0.5
            per_head.append(torch.softmax(scores, -1) @ values[rows])
        outputs.append(torch.stack(per_head)[:, None])
    return torch.stack(outputs)


@checker(
    "9.3",
    title="the paged gather",
    points=1,
    task="the gather",
    allow=tuple(
        _DECODE + name
        for name in (
            "paged_decode", "paged_decode_kernel", "combine_splits_kernel", "default_num_splits", "<module>"
        )
    ) + (*_KERNEL_COMMON, *_CALLS, _HERE + "_run_gather"),
    processes_from=(_TRITON_DIR,),
)  # fmt: skip
def check_page_gather(draw: Draw):
    """``gather(TABLE, tokens, valid, page_size, page_stride, token_stride)``, a ``@triton.jit`` function:
    the element offsets in the pool of the rows of logical ``tokens`` (BLOCK_N,) of one sequence, whose block
    table row starts at ``TABLE`` (logical page -> physical page). Pages are ``page_stride`` elements apart,
    tokens within a page ``token_stride``; load only where ``valid``. Runs inside
    ``course_lib.kernels.paged_decode_kernel`` on caches whose pages are scattered over the pool."""
    for name, lengths, page_size, heads, kv_heads in [
        ("three sequences, small pages", [draw.int(6, 14), draw.int(1, 3), draw.int(15, 24)], draw.int(2, 5),
         2, 1),
        ("two K/V heads (a page holds both)", [draw.int(12, 20), draw.int(5, 10)], draw.choice([4, 8]), 2, 2),
        ("pages whose size is not a power of two", [draw.int(4, 9), draw.int(12, 20)], draw.choice([3, 5, 7]),
         2, 2),
        ("one sequence, pages of one token", [draw.int(10, 20)], 1, 1, 1),
    ]:  # fmt: skip
        yield _gather_case(draw, f"{name}: lengths {lengths}, page size {page_size}, {heads} query / "
                           f"{kv_heads} K/V heads", lengths, page_size, heads, kv_heads)  # fmt: skip


def _gather_case(draw, name, lengths, page_size, heads, kv_heads) -> Case:
    device, D = _device(), 16
    pages = sum(math.ceil(n / page_size) for n in lengths) + 2
    cache = PagedKVCache(pages, page_size, kv_heads, D, device=device)
    for seq in range(len(lengths)):
        cache.add_sequence(seq)
    for step in range(max(lengths)):  # the sequences grow together: their pages interleave in the pool
        for seq, n in enumerate(lengths):
            if step < n:
                cache.append(seq, draw.randn(kv_heads, 1, D).float().to(device),
                             draw.randn(kv_heads, 1, D).float().to(device))  # fmt: skip
    q = draw.randn(len(lengths), heads, 1, D).float().to(device)
    tables, seq_lengths = paged_tables(cache, range(len(lengths)))
    num_splits = draw.int(1, 3)

    def expected():
        return torch.stack([cache.attention(seq, q[seq]).cpu() for seq in range(len(lengths))])

    variants = {
        "a contiguous cache: logical page tokens // page_size read as if it were the physical page (load it "
        "from the block table, TABLE + tokens // page_size)": lambda: _decode_replay(
            cache, q, lengths, "contiguous"
        ),
    }
    if kv_heads > 1:
        variants[
            f"pages page_size * token_stride = {page_size * D} elements apart; they are page_stride = "
            f"{kv_heads * page_size * D} apart (a page holds the slots of every K/V head)"
        ] = lambda: _decode_replay(cache, q, lengths, "page stride")

    def judge(got, expected):
        compare(got, expected, "output", atol=1e-4, rtol=1e-4, check_dtype=False, variants=variants)

    return Case(
        name,
        (q, cache.key_blocks, cache.value_blocks, tables, seq_lengths, num_splits, 16),
        expected=expected,
        compare=judge,
        inputs=["q", "key_blocks", "value_blocks", "block_tables", "lengths", "num_splits", "block_n"],
        copy_args=False,
        call=_run_gather,
    )


# ---------------------------------------------------------------------------------------------------
# Predict and explain.

declare("9.4", kind="predict", title="how much of causal attention is computed")
declare("9.5", kind="explain", title="two kernels for the backward, no tl.dot for decoding", points=2)
