"""Images and video: spatial reduction and divided space-time attention against dense attention
over all H*W(*F) tokens with the equivalent construction (averaged keys, explicit masks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.sparse.vision import (
    DividedSpaceTimeAttention,
    SpatialReductionAttention,
    space_attention,
    spatial_reduction,
    spatial_reduction_attention,
    time_attention,
    vision_attention_cost,
)


def dense(q, k, v, allowed=None, scale=None):
    """float64 softmax attention over flattened tokens; rows with nothing allowed are zero."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def loop_pool(x, ratio):
    """Average of each ratio x ratio patch, one patch at a time; border patches over the pixels they have."""
    B, H, height, width, D = x.shape
    rows, cols = math.ceil(height / ratio), math.ceil(width / ratio)
    out = torch.zeros(B, H, rows, cols, D, dtype=x.dtype)
    for r in range(rows):
        for c in range(cols):
            out[:, :, r, c] = x[:, :, r * ratio : (r + 1) * ratio, c * ratio : (c + 1) * ratio].mean(
                dim=(2, 3)
            )
    return out


def image_inputs(B, H, height, width, D, D_v=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    D_v = D if D_v is None else D_v
    return (
        torch.randn(B, H, height, width, D, generator=g, dtype=dtype),
        torch.randn(B, H, height, width, D, generator=g, dtype=dtype),
        torch.randn(B, H, height, width, D_v, generator=g, dtype=dtype),
    )


# --- spatial reduction ------------------------------------------------------------------------------

SIZES = [(1, 1, 1), (4, 4, 2), (5, 7, 3), (6, 9, 2), (3, 8, 8), (7, 5, 1)]


@pytest.mark.parametrize("height,width,ratio", SIZES, ids=[f"{h}x{w}-R{r}" for h, w, r in SIZES])
def test_spatial_reduction_attention_is_dense_attention_over_pooled_keys(height, width, ratio):
    q, k, v = image_inputs(2, 3, height, width, 5, 4)
    pooled_k, pooled_v = loop_pool(k, ratio), loop_pool(v, ratio)
    torch.testing.assert_close(spatial_reduction(k, ratio), pooled_k)
    expected = dense(q.flatten(2, 3), pooled_k.flatten(2, 3), pooled_v.flatten(2, 3))
    out = spatial_reduction_attention(q, k, v, ratio)
    assert out.shape == (2, 3, height, width, 4)
    torch.testing.assert_close(out.flatten(2, 3), expected)


def test_ratio_one_is_full_attention_over_the_pixels():
    q, k, v = image_inputs(1, 2, 4, 5, 6)
    full = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
    torch.testing.assert_close(spatial_reduction_attention(q, k, v, 1).flatten(2, 3), full)


def test_spatial_reduction_attention_gradcheck_and_half_precision():
    q, k, v = image_inputs(1, 2, 5, 4, 3, 2)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: spatial_reduction_attention(*a, 2, scale=0.8), inputs)
    q, k, v = image_inputs(1, 2, 8, 8, 16, dtype=torch.float16)
    out = spatial_reduction_attention(q, k, v, 4)
    assert out.dtype == torch.float16
    expected = dense(
        q.flatten(2, 3), loop_pool(k.double(), 4).flatten(2, 3), loop_pool(v.double(), 4).flatten(2, 3)
    )
    torch.testing.assert_close(out.flatten(2, 3).double(), expected, atol=3e-3, rtol=1e-2)


@pytest.mark.parametrize("height,width,ratio", [(4, 6, 2), (5, 7, 3), (3, 3, 1)])
def test_layer_matches_convolution_written_as_patches(height, width, ratio):
    torch.manual_seed(0)
    layer = SpatialReductionAttention(8, 2, ratio).double()
    x = torch.randn(2, height * width, 8, dtype=torch.float64)
    B, C, H, D = 2, 8, 2, 4
    q = layer.W_q(x).view(B, -1, H, D).transpose(1, 2)
    if ratio > 1:
        # A stride-R R x R convolution is a linear map of each zero-padded, non-overlapping patch.
        image = F.pad(x.transpose(1, 2).reshape(B, C, height, width), (0, -width % ratio, 0, -height % ratio))
        patches = F.unfold(image, kernel_size=ratio, stride=ratio).transpose(1, 2)  # (B, patches, C*R*R)
        reduced = patches @ layer.reduce.weight.reshape(C, -1).T + layer.reduce.bias
        reduced = F.layer_norm(reduced, (C,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
        assert reduced.shape[1] == math.ceil(height / ratio) * math.ceil(width / ratio)
    else:
        reduced = x
    k, v = layer.W_kv(reduced).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)
    expected = layer.W_o(dense(q, k, v).transpose(1, 2).reshape(B, -1, C))
    torch.testing.assert_close(layer(x, height, width), expected)


# --- divided space-time -------------------------------------------------------------------------------


def video_masks(frames, N, causal=False):
    """(F*N, F*N) masks over tokens ordered frame by frame: same patch (time), same frame (space)."""
    frame = torch.arange(frames).repeat_interleave(N)
    patch = torch.arange(N).repeat(frames)
    time = patch.unsqueeze(1) == patch.unsqueeze(0)
    if causal:
        time = time & (frame.unsqueeze(0) <= frame.unsqueeze(1))
    return time, frame.unsqueeze(1) == frame.unsqueeze(0)


@pytest.mark.parametrize("frames,N", [(1, 1), (3, 5), (4, 7), (6, 1), (1, 6)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_time_and_space_attention_are_masked_dense_attention(frames, N, causal):
    g = torch.Generator().manual_seed(frames * N)
    q, k, v = (torch.randn(2, 3, frames, N, d, generator=g, dtype=torch.float64) for d in (4, 4, 5))
    time_mask, space_mask = video_masks(frames, N, causal)
    flat = [x.flatten(2, 3) for x in (q, k, v)]
    torch.testing.assert_close(time_attention(q, k, v, causal=causal).flatten(2, 3), dense(*flat, time_mask))
    torch.testing.assert_close(space_attention(q, k, v).flatten(2, 3), dense(*flat, space_mask))


def test_time_and_space_gradcheck_and_half_precision():
    g = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(1, 2, 3, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    assert torch.autograd.gradcheck(lambda *a: time_attention(*a, causal=True), inputs)
    assert torch.autograd.gradcheck(lambda *a: space_attention(*a, scale=-0.5), inputs)
    q, k, v = (x.detach().half() for x in inputs)
    time_mask, space_mask = video_masks(3, 4)
    out = space_attention(q, k, v)
    assert out.dtype == torch.float16
    flat = [x.flatten(2, 3) for x in (q, k, v)]
    torch.testing.assert_close(out.flatten(2, 3).double(), dense(*flat, space_mask), atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(
        time_attention(q, k, v).flatten(2, 3).double(), dense(*flat, time_mask), atol=3e-3, rtol=1e-2
    )


@pytest.mark.parametrize("causal_time", [False, True])
def test_divided_layer_matches_masked_dense_composition(causal_time):
    torch.manual_seed(0)
    layer = DividedSpaceTimeAttention(8, 2, causal_time=causal_time).double()
    frames, N = 3, 5
    x = torch.randn(2, frames, N, 8, dtype=torch.float64)
    time_mask, space_mask = video_masks(frames, N, causal_time)

    def masked_layer(tokens, qkv, out_proj, allowed):  # dense multi-head attention with a mask
        q, k, v = qkv(tokens).view(2, frames * N, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return out_proj(dense(q, k, v, allowed).transpose(1, 2).reshape(2, frames * N, 8))

    tokens = x.reshape(2, frames * N, 8)
    y = masked_layer(tokens, layer.time_qkv, layer.time_out, time_mask)
    z = masked_layer(layer.space_norm(tokens + y), layer.space_qkv, layer.space_out, space_mask)
    torch.testing.assert_close(layer(x), (y + z).view(2, frames, N, 8))


def test_two_hops_connect_every_token():
    torch.manual_seed(2)
    layer = DividedSpaceTimeAttention(4, 1).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda t: layer(t).sum(-1), x)  # (1, 3, 4, 1, 3, 4, 4)
    influence = jacobian.abs().sum(-1)[0, :, :, 0]  # (3, 4, 3, 4): output token <- input token
    assert (influence > 0).all()
    # One hop alone does not: time attention never mixes two patches of different frames.
    video = x.view(1, 1, 3, 4, 4)
    jacobian = torch.autograd.functional.jacobian(lambda t: time_attention(t, t, t).sum(-1), video)
    time_only = jacobian[0, 0, :, :, 0, 0].abs().sum(-1)  # (3, 4, 3, 4): output token <- input token
    assert time_only[0, 1, 1, 2] == 0 and time_only[0, 1, 2, 1] != 0


# --- costs --------------------------------------------------------------------------------------------


def test_vision_attention_cost_formulas():
    costs = {
        c.name: c for c in vision_attention_cost(56, 56, num_heads=1, head_dim=64, ratio=8, kernel_size=7)
    }
    N = 56 * 56
    assert costs["full"].keys_per_query == N and costs["full"].score_entries == N * N
    assert costs["spatial reduction"].keys_per_query == 7 * 7
    assert costs["full"].score_entries // costs["spatial reduction"].score_entries == 64  # R^2
    assert costs["spatial reduction"].flops == 4 * N * 49 * 64 + 2 * 49 * (64 * 64) * 64
    assert costs["neighborhood"].keys_per_query == 49
    video = {c.name: c for c in vision_attention_cost(14, 14, 8, num_heads=2, head_dim=32, ratio=2)}
    tokens = 8 * 196
    assert video["full"].score_entries == 2 * tokens * tokens
    assert video["divided space-time"].score_entries == 2 * tokens * (8 + 196)
    assert video["spatial reduction"].keys_per_query == 8 * 49
    assert video["full"].flops == 2 * 2 * 2 * tokens * tokens * 32


def test_costs_count_the_keys_the_functions_use():
    q, k, v = image_inputs(1, 1, 9, 10, 4)
    keys = spatial_reduction(k, 4).flatten(2, 3).shape[2]
    costs = {c.name: c for c in vision_attention_cost(9, 10, head_dim=4, ratio=4, kernel_size=3)}
    assert costs["spatial reduction"].keys_per_query == keys == 3 * 3


# --- bad input ----------------------------------------------------------------------------------------

_img = torch.randn(1, 2, 4, 4, 3)
_vid = torch.randn(1, 2, 3, 4, 3)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: spatial_reduction(_img, 0), ValueError, "ratio"),
        (lambda: spatial_reduction(_img[0], 2), ValueError, "x"),
        (lambda: spatial_reduction_attention(_img, _img[:, :, :3], _img, 2), ValueError, "k"),
        (lambda: spatial_reduction_attention(_img, _img, _img[:, :1], 2), ValueError, "v"),
        (lambda: spatial_reduction_attention(_img, _img.double(), _img, 2), TypeError, "^k .*dtype of q"),
        (lambda: spatial_reduction_attention(_img, _img, _img, 2.0), TypeError, "ratio"),
        (lambda: spatial_reduction_attention(_img, _img, _img, 2, scale=float("inf")), ValueError, "scale"),
        (lambda: time_attention(_vid, _vid, _vid, causal="yes"), TypeError, "causal"),
        (lambda: time_attention(_vid[0], _vid, _vid), ValueError, "q"),
        (lambda: space_attention(_vid, _vid[:, :, :2], _vid), ValueError, "k"),
        (lambda: SpatialReductionAttention(10, 4, 2), ValueError, "num_heads"),
        (lambda: SpatialReductionAttention(8, 2, 0), ValueError, "ratio"),
        (lambda: SpatialReductionAttention(8, 2, 2)(torch.randn(1, 12, 8), 3, 5), ValueError, "x"),
        (lambda: SpatialReductionAttention(8, 2, 2)(torch.randn(1, 12, 8), 0, 5), ValueError, "height"),
        (lambda: DividedSpaceTimeAttention(8, 3), ValueError, "num_heads"),
        (lambda: DividedSpaceTimeAttention(8, 2, causal_time=1), TypeError, "causal_time"),
        (lambda: DividedSpaceTimeAttention(8, 2)(torch.randn(1, 2, 3, 6)), ValueError, "x"),
        (lambda: vision_attention_cost(4, 4, kernel_size=5), ValueError, "kernel_size"),
        (lambda: vision_attention_cost(4, 4, 0), ValueError, "frames"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
