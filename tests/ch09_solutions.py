"""Answers to notebook 09's exercises, right and wrong, for tests/test_ch09_notebook_layer.py.

``course_lib.kernels`` is imported first: it switches Triton's interpreter on when there is no GPU,
and ``@triton.jit`` decides when a function is defined whether it is interpreted.
"""

# ruff: noqa: I001  (the import order matters)
from course_lib.kernels import page_offsets

import triton
import triton.language as tl


@triton.jit
def attend(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
    scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probabilities = tl.exp(scores - safe_max[:, None])
    correction = tl.exp(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
    acc = acc * correction[:, None] + tl.dot(probabilities.to(v.dtype), v, input_precision=PRECISION)
    return new_max, row_sum, acc


@triton.jit
def attend_without_rescaling(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
    scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probabilities = tl.exp(scores - safe_max[:, None])
    return (
        new_max,
        row_sum + tl.sum(probabilities, axis=1),
        acc + tl.dot(probabilities, v, input_precision=PRECISION),
    )


@triton.jit
def stub_attend(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
    raise NotImplementedError("Your solution here")


@triton.jit
def key_end(start_m, T, S, BLOCK_M: tl.constexpr):
    return tl.minimum(S, start_m + BLOCK_M + S - T)


@triton.jit
def key_end_without_skipping(start_m, T, S, BLOCK_M: tl.constexpr):
    return S


@triton.jit
def key_end_skipping_too_much(start_m, T, S, BLOCK_M: tl.constexpr):
    return tl.minimum(S, start_m + S - T)


@triton.jit
def gather(TABLE, tokens, valid, page_size, page_stride, token_stride):
    physical_page = tl.load(TABLE + tokens // page_size, mask=valid, other=0)
    return physical_page.to(tl.int64) * page_stride + (tokens % page_size) * token_stride


@triton.jit
def gather_as_if_contiguous(TABLE, tokens, valid, page_size, page_stride, token_stride):
    return (tokens // page_size).to(tl.int64) * page_stride + (tokens % page_size) * token_stride


library_gather = page_offsets
