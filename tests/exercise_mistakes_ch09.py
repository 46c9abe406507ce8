"""Wrong solutions of chapter 09's exercises, one per misconception: each must fail its checker with a
message that names it (the fragment). They are @triton.jit functions, defined in this file so that Triton can
read their source; without Triton (the course's kernels extra) there are none, and chapter 09 has no
exercises."""

# ruff: noqa: I001  (course_lib.kernels first: it switches Triton's interpreter on before Triton is imported)
import importlib.util

MISTAKES = {}

if importlib.util.find_spec("triton") is not None:
    from course_lib import kernels

    import triton
    import triton.language as tl

    @triton.jit
    def attend_without_rescaling(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probabilities = tl.exp(scores - safe_max[:, None])
        row_sum = row_sum + tl.sum(probabilities, axis=1)
        return new_max, row_sum, acc + tl.dot(probabilities, v, input_precision=PRECISION)

    @triton.jit
    def attend_unstabilised(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        probabilities = tl.exp(scores)  # no running max: exp overflows float32 beyond 88.7
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        return (
            new_max,
            row_sum + tl.sum(probabilities, axis=1),
            acc + tl.dot(probabilities, v, input_precision=PRECISION),
        )

    @triton.jit
    def attend_nan_for_empty_rows(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        probabilities = tl.exp(scores - new_max[:, None])  # -inf - (-inf) = NaN for a row that saw nothing
        correction = tl.exp(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
        acc = acc * correction[:, None] + tl.dot(probabilities, v, input_precision=PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def attend_without_scale(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probabilities = tl.exp(scores - safe_max[:, None])
        correction = tl.exp(row_max - safe_max)
        row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
        acc = acc * correction[:, None] + tl.dot(probabilities, v, input_precision=PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def attend_ignoring_the_mask(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        probabilities = tl.exp(scores - new_max[:, None])
        correction = tl.exp(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
        acc = acc * correction[:, None] + tl.dot(probabilities, v, input_precision=PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def attend_calling_the_library(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
        return kernels.attend_block(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION)

    @triton.jit
    def key_end_without_skipping(start_m, T, S, BLOCK_M: tl.constexpr):
        return S

    @triton.jit
    def key_end_skipping_too_much(start_m, T, S, BLOCK_M: tl.constexpr):
        return tl.minimum(S, start_m + S - T)

    @triton.jit
    def key_end_start_aligned(start_m, T, S, BLOCK_M: tl.constexpr):
        return tl.minimum(S, start_m + BLOCK_M)

    @triton.jit
    def key_end_not_capped(start_m, T, S, BLOCK_M: tl.constexpr):
        return start_m + BLOCK_M + S - T

    @triton.jit
    def gather_as_if_contiguous(TABLE, tokens, valid, page_size, page_stride, token_stride):
        return (tokens // page_size).to(tl.int64) * page_stride + (tokens % page_size) * token_stride

    @triton.jit
    def gather_with_a_page_stride_from_the_page_size(
        TABLE, tokens, valid, page_size, page_stride, token_stride
    ):
        physical_page = tl.load(TABLE + tokens // page_size, mask=valid, other=0)
        return physical_page.to(tl.int64) * page_size * token_stride + (tokens % page_size) * token_stride

    @triton.jit
    def gather_calling_the_library(TABLE, tokens, valid, page_size, page_stride, token_stride):
        return kernels.page_offsets(TABLE, tokens, valid, page_size, page_stride, token_stride)

    MISTAKES = {
        "9.1": [
            ("no rescaling", "not rescaled by exp(old max - new max)", attend_without_rescaling),
            ("no running max", "subtract the running max", attend_unstabilised),
            ("NaN for a row that sees nothing", "exp(-inf - (-inf)) is NaN", attend_nan_for_empty_rows),
            ("no scale", "scores without the scale", attend_without_scale),
            ("the mask ignored", "the visible mask ignored", attend_ignoring_the_mask),
            ("the library's attend_block", "course's own code", kernels.attend_block),
            ("a call to the library's attend_block", "course's own code", attend_calling_the_library),
        ],
        "9.2": [
            ("no skipping", "hold a key it may see", key_end_without_skipping),
            ("skipping too much", "a skipped K block held a key", key_end_skipping_too_much),
            ("the diagonal aligned to the start", "ignores S - T", key_end_start_aligned),
            ("not capped at S", "must never pass S", key_end_not_capped),
            ("the library's causal_key_end", "course's own code", kernels.causal_key_end),
        ],
        "9.3": [
            ("a contiguous cache", "a contiguous cache", gather_as_if_contiguous),
            ("page_size * token_stride as the page stride", "a page holds the slots of every K/V head",
             gather_with_a_page_stride_from_the_page_size),
            ("the library's page_offsets", "course's own code", kernels.page_offsets),
            ("a call to the library's page_offsets", "course's own code", gather_calling_the_library),
        ],
    }  # fmt: skip
