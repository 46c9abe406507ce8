"""Checkers pass correct solutions, fail wrong ones and stubs with a message that says what differs."""

import pytest
import torch

from course_lib.exercises import ExerciseFailed
from course_lib.exercises.ch00 import check_softmax
from course_lib.exercises.ch01 import (
    check_causal_mask,
    check_scaled_dot_product_attention,
    check_split_merge_heads,
)


def stub(*args):
    raise NotImplementedError("Your solution here")


def stable_softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def sdpa(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def split(x, H):
    B, T, C = x.shape
    return x.view(B, T, H, C // H).transpose(1, 2)


def merge(x):
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def test_checkers_pass_correct_solutions(capsys):
    check_softmax(stable_softmax)
    check_scaled_dot_product_attention(sdpa)
    check_causal_mask(lambda T: torch.ones(T, T, dtype=torch.bool).tril())
    check_split_merge_heads(split, merge)
    printed = capsys.readouterr().out
    for line in [
        "check_softmax: all 4 cases",
        "check_scaled_dot_product_attention: all 3 cases",
        "check_causal_mask: all 4 cases",
        "check_split_merge_heads: all 3 cases",
    ]:
        assert line in printed


@pytest.mark.parametrize(
    "check,wrong,message",
    [
        (check_softmax, lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), "NaN"),  # overflows
        (
            check_scaled_dot_product_attention,
            lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1) @ v,
            "largest difference",
        ),  # forgot the scale
        (check_causal_mask, lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "entries differ"),
        (check_causal_mask, lambda T: torch.ones(T, T).tril(), "bool"),
        (check_scaled_dot_product_attention, lambda q, k, v: q[..., :1], "shape"),
    ],
)
def test_checkers_explain_wrong_answers(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


def test_split_merge_checker_catches_a_wrong_head_layout():
    def split_interleaved(x, H):  # columns dealt out round-robin: a common mistake
        B, T, C = x.shape
        return x.view(B, T, C // H, H).permute(0, 3, 1, 2)

    with pytest.raises(ExerciseFailed, match="split_heads"):
        check_split_merge_heads(split_interleaved, merge)


@pytest.mark.parametrize("check", [check_softmax, check_scaled_dot_product_attention, check_causal_mask])
def test_checkers_fail_on_the_student_stub(check):
    with pytest.raises(ExerciseFailed, match="not implemented"):
        check(stub)
    with pytest.raises(ExerciseFailed, match="not implemented"):
        check_split_merge_heads(stub, merge)


def test_a_reader_function_that_crashes_is_reported_with_the_case():
    with pytest.raises(ExerciseFailed, match="raised"):
        check_causal_mask(lambda T: torch.ones(T, T + "x"))
