"""The shared argument checks: the right error type, and the argument's name in the message."""

import pytest
import torch

from course_lib import checks


def test_check_attention_inputs_returns_the_sizes():
    q, k, v = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 6, 5), torch.zeros(2, 3, 6, 7)
    assert checks.check_attention_inputs(q, k, v) == (2, 3, 4, 6, 5, 7)
    assert checks.check_attention_inputs(q, k[:, :1], v[:, :1], same_heads=False) == (2, 3, 4, 6, 5, 7)


def test_check_mask_expands_to_the_target():
    mask = torch.ones(4, 6, dtype=torch.bool)
    assert checks.check_mask(mask, "mask", (2, 3, 4, 6)).shape == (2, 3, 4, 6)


def test_numbers_pass_through():
    assert checks.check_int(3, "n", min=1) == 3
    assert checks.check_float(2, "x", min=0, min_open=True) == 2.0
    assert checks.check_choice("a", "mode", ["a", "b"]) == "a"
    checks.check_divisible(8, "num_heads", 2, "num_kv_heads")


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: checks.check_tensor([1], "x"), TypeError, "x must be a torch.Tensor"),
        (
            lambda: checks.check_tensor(torch.zeros(2), "x", ndim=(3, 4)),
            ValueError,
            "x must have 3 or 4 dims",
        ),
        (
            lambda: checks.check_tensor(torch.zeros(2, dtype=torch.int32), "x", floating=True),
            TypeError,
            "x must",
        ),
        (lambda: checks.check_tensor(torch.zeros(2), "m", dtype=torch.bool), TypeError, "m must have dtype"),
        (
            lambda: checks.check_shape(torch.zeros(2, 3), "g", (2, 4), names="B, T"),
            ValueError,
            r"g must have shape \(2, 4\)",
        ),
        (
            lambda: checks.check_attention_inputs(
                torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float64)
            ),
            TypeError,
            "dtype",
        ),
        (lambda: checks.check_int(True, "n"), TypeError, "n must be an int"),
        (lambda: checks.check_int(0, "n", min=1), ValueError, "n=0 must be >= 1"),
        (lambda: checks.check_int(9, "n", max=8), ValueError, "n=9 must be <= 8"),
        (lambda: checks.check_float("x", "scale"), TypeError, "scale must be a number"),
        (lambda: checks.check_float(float("nan"), "scale"), ValueError, "scale must not be NaN"),
        (lambda: checks.check_float(0.0, "p", min=0.0, min_open=True), ValueError, "p=0.0 must be > 0"),
        (lambda: checks.check_float(1.0, "p", max=1.0, max_open=True), ValueError, "p=1.0 must be < 1"),
        (lambda: checks.check_bool(1, "causal"), TypeError, "causal must be a bool"),
        (lambda: checks.check_choice("c", "mode", ["a", "b"]), ValueError, "mode='c' must be one of"),
        (
            lambda: checks.check_divisible(8, "num_heads", 3, "num_kv_heads"),
            ValueError,
            "num_kv_heads=3 must divide num_heads=8",
        ),
        (
            lambda: checks.check_mask(torch.ones(3, 5, dtype=torch.bool), "mask", (1, 1, 4, 5)),
            ValueError,
            "mask",
        ),
    ],
)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the dtype rule and the scale rule ------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=["fp16", "bf16", "fp32", "fp64"],
)
def test_compute_dtype_keeps_float64_and_lifts_the_rest_to_float32(dtype, expected):
    assert checks.compute_dtype(dtype) == expected
    assert checks.compute_dtype(torch.zeros(2, dtype=dtype)) == expected


@pytest.mark.parametrize("head_dim", [1, 4, 64, 7])
def test_resolve_scale_defaults_to_one_over_root_head_dim(head_dim):
    assert checks.resolve_scale(None, head_dim) == pytest.approx(1 / head_dim**0.5, rel=1e-15)


@pytest.mark.parametrize("scale", [0, 0.0, -0.0, -2.5, 3, 1e-300, -1e300], ids=str)
def test_resolve_scale_takes_any_finite_real_as_a_float(scale):
    value = checks.resolve_scale(scale, 8)
    assert isinstance(value, float) and value == float(scale)
    assert checks.resolve_scale(torch.tensor(0.5).item(), 8) == 0.5


@pytest.mark.parametrize(
    "scale, error",
    [
        (float("inf"), ValueError),
        (float("-inf"), ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        (False, TypeError),
        ("0.5", TypeError),
        (torch.tensor(0.5), TypeError),
        (1j, TypeError),
    ],
    ids=["inf", "-inf", "nan", "True", "False", "str", "tensor", "complex"],
)
def test_resolve_scale_refuses_what_is_not_a_finite_real(scale, error):
    with pytest.raises(error, match=r"^scale"):
        checks.resolve_scale(scale, 8)
    with pytest.raises(error, match=r"^temperature"):  # the message names the argument it is given
        checks.resolve_scale(scale, 8, name="temperature")


# --- side tensors, meta tensors, hashable ids (issue 14) -------------------------------------------


def test_a_meta_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match="^logits must hold data, got a meta tensor"):
        checks.check_tensor(torch.zeros(2, 3, device="meta"), "logits")


def test_check_like_compares_device_and_dtype_with_the_main_input():
    q = torch.zeros(1, 2, 3, 4)
    assert checks.check_like(torch.zeros(5), "bias", q, dtype=False) is not None
    with pytest.raises(TypeError, match=r"^v must have the dtype of q \(torch.float32\), got torch.float64"):
        checks.check_like(torch.zeros(5, dtype=torch.float64), "v", q)
    checks.check_like(torch.zeros(5, dtype=torch.float64), "gates", q, dtype=False)  # cast later
    # A tensor on another device than `like` (here `like` is on the meta device, the only second
    # device a CPU-only machine has) is refused by name.
    with pytest.raises(ValueError, match=r"^gates must be on the device of x \(meta\), got cpu"):
        checks.check_like(torch.zeros(5), "gates", torch.zeros(5, device="meta"), "x", dtype=False)
    with pytest.raises(TypeError, match="^v must be a torch.Tensor"):
        checks.check_like([1.0], "v", q)


def test_check_mask_checks_the_device_when_asked():
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert checks.check_mask(mask, "mask", (1, 1, 3, 5), device=torch.device("cpu")).shape == (1, 1, 3, 5)
    with pytest.raises(ValueError, match=r"^mask must be on the device of q \(meta\)"):
        checks.check_mask(mask, "mask", (1, 1, 3, 5), device=torch.device("meta"))


def test_check_broadcast_refuses_to_grow_the_target():
    assert checks.check_broadcast(torch.zeros(3, 5), "bias", (2, 1, 3, 5)).shape == (2, 1, 3, 5)
    with pytest.raises(ValueError, match=r"^bias must have at most 4 dims \(B, H, T, S\)"):
        checks.check_broadcast(torch.zeros(2, 2, 1, 3, 5), "bias", (2, 1, 3, 5))
    with pytest.raises(ValueError, match="^bias of shape"):
        checks.check_broadcast(torch.zeros(4, 5), "bias", (2, 1, 3, 5))


def test_check_hashable_names_the_argument():
    assert checks.check_hashable(("a", 1), "seq_id") == ("a", 1)
    with pytest.raises(TypeError, match="^seq_id must be hashable"):
        checks.check_hashable([1, 2], "seq_id")
