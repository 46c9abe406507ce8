"""Chapter 06: linear attention — kernels, feature maps, and the three forms.

Softmax attention weighs value ``j`` for query ``i`` by ``exp(q_i . k_j)``. Replace that kernel by
a dot product of features, ``phi(q_i) . phi(k_j)``, and the products can be reordered:

    (phi(Q) phi(K)^T) V   — a (T, S) matrix first: quadratic in the length,
    phi(Q) (phi(K)^T V)   — a (D', D_v) matrix first: linear in the length.

The module follows the notebook: the feature maps (elu+1, ReLU, the identity, Performer's FAVOR+),
then ``linear_attention`` in its three forms — parallel (the masked quadratic matrix), recurrent
(a ``(D', D_v)`` state updated token by token) and chunk (parallel inside a chunk, the state
between chunks) — and the implied attention matrix; then two relatives that are not kernels of
this kind: efficient attention (Shen et al.) and Linformer. Tensors are ``(B, H, T, D)`` for
queries and ``(B, H, S, D)`` / ``(B, H, S, D_v)`` for keys and values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from torch import nn

from .checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_like,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .recurrent.runner import run_recurrence

__all__ = [
    "elu_plus_one",
    "relu_map",
    "identity_map",
    "FavorPlus",
    "favor_plus",
    "linear_attention",
    "parallel_form",
    "recurrent_form",
    "chunk_form",
    "linear_attention_matrix",
    "efficient_attention",
    "linformer_attention",
    "LinformerAttention",
]

FORMS = ("parallel", "recurrent", "chunk")
# Added to the normaliser so a query that sees no key (or only zero features) returns zeros, not NaN.
DEFAULT_EPS = 1e-6


# --- feature maps -------------------------------------------------------------------------------


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: positive everywhere (Katharopoulos et al., 2020). Shape is unchanged."""
    check_tensor(x, "x", floating=True)
    return F_.elu(x) + 1.0


def relu_map(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)``: non-negative, zero for every negative coordinate. Shape is unchanged."""
    check_tensor(x, "x", floating=True)
    return torch.relu(x)


def identity_map(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself: plain (unnormalised) linear attention, ``o = Q K^T V`` with a causal mask.

    Its features can be negative, so the normaliser ``phi(q) . sum phi(k)`` can be zero or change
    sign; :func:`linear_attention` therefore only accepts it with ``normalize=False``.
    """
    check_tensor(x, "x", floating=True)
    return x


class FavorPlus:
    """Performer's FAVOR+ map: positive orthogonal random features for the softmax kernel.

    With rows ``w_1 .. w_m`` of :attr:`projection` and ``x' = sqrt(scale) * x``,

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),    E[phi(q) . phi(k)] = exp(scale * q . k),

    because ``E[exp(w . a)] = exp(|a|^2 / 2)`` for ``w ~ N(0, I)``. Every feature is positive, so
    the normaliser never cancels (the sin/cos features of the first random-feature papers do).
    ``orthogonal=True`` draws the ``w`` in blocks of ``head_dim`` mutually orthogonal directions
    with chi-distributed lengths: each ``w`` is still marginally ``N(0, I)`` (unbiased), and the
    variance drops. ``scale`` (finite, >= 0) defaults to ``head_dim ** -0.5``, so ``linear_attention``
    with this map and ``causal=False`` approximates ``softmax(Q K^T / sqrt(D)) V``.

    The features are fixed until :meth:`redraw`; the projection lives on the CPU in float64 and is
    cast to the input's device and dtype on each call. No max-subtraction is done, so very large
    ``|x|`` can overflow ``exp`` in float32 (Performer's implementation subtracts a max, which
    keeps the ratio of the normalised form but makes ``phi`` itself biased).
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        *,
        scale: float | None = None,
        orthogonal: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        if num_features is None:
            # Performer's default m = d log d, and at least d.
            num_features = max(self.head_dim, int(self.head_dim * math.log(self.head_dim)))
        self.num_features = check_int(num_features, "num_features", min=1)
        self.scale = resolve_scale(scale, self.head_dim)
        if self.scale < 0:
            # phi(q) . phi(k) is a positive-definite kernel; exp(scale q . k) is one only for scale >= 0.
            raise ValueError(f"scale={self.scale} must be >= 0 for FAVOR+ (it estimates exp(scale * q . k))")
        self.orthogonal = check_bool(orthogonal, "orthogonal")
        self._generator = check_generator(generator, seed)
        self.projection = self._draw()

    def _draw(self) -> torch.Tensor:
        """Draw the ``(num_features, head_dim)`` projection with this map's generator."""
        m, d, g = self.num_features, self.head_dim, self._generator
        if not self.orthogonal:
            return torch.randn(m, d, generator=g, device=g.device, dtype=torch.float64).cpu()
        blocks = []
        for _ in range(math.ceil(m / d)):
            gaussian = torch.randn(d, d, generator=g, device=g.device, dtype=torch.float64).cpu()
            orthonormal, triangular = torch.linalg.qr(gaussian)
            # QR's sign convention ties each direction to the Gaussian it came from (Householder QR
            # makes q_1 . e_1 < 0 always): flipping by sign(diag R) makes the rotation uniformly random.
            orthonormal = orthonormal * torch.sign(torch.diagonal(triangular)).unsqueeze(0)
            blocks.append(orthonormal.T)  # rows are orthonormal directions
        directions = torch.cat(blocks)[:m]
        # Give each row the length of a Gaussian vector, so each row is marginally N(0, I).
        lengths = torch.randn(m, d, generator=g, device=g.device, dtype=torch.float64).cpu().norm(dim=1)
        return directions * lengths.unsqueeze(1)

    def redraw(self, *, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        """Draw new random features: from ``seed``/``generator`` if given, else from this map's own stream."""
        if seed is not None or generator is not None:
            self._generator = check_generator(generator, seed)
        self.projection = self._draw()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., head_dim)`` -> ``(..., num_features)`` positive features."""
        check_tensor(x, "x", floating=True)
        if x.dim() == 0 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must end in head_dim={self.head_dim} for this favor_plus map, got {tuple(x.shape)}"
            )
        x = x * self.scale**0.5
        projection = self.projection.to(device=x.device, dtype=x.dtype)
        exponent = x @ projection.T - 0.5 * (x * x).sum(-1, keepdim=True)
        return torch.exp(exponent) * self.num_features**-0.5

    def __repr__(self) -> str:
        kind = "orthogonal" if self.orthogonal else "iid"
        return f"FavorPlus(head_dim={self.head_dim}, num_features={self.num_features}, {kind})"


def favor_plus(
    head_dim: int,
    num_features: int | None = None,
    *,
    scale: float | None = None,
    orthogonal: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> FavorPlus:
    """Make a FAVOR+ feature map (see :class:`FavorPlus`) to pass as ``feature_map=``."""
    return FavorPlus(
        head_dim, num_features, scale=scale, orthogonal=orthogonal, seed=seed, generator=generator
    )


# --- linear attention ---------------------------------------------------------------------------


def _features(q, k, v, feature_map, scale, initial_state, normalize):
    """Apply the feature map (in the compute dtype), scale phi(q), and unpack the initial state."""
    if not callable(feature_map):
        raise TypeError(f"feature_map must be callable, got {type(feature_map).__name__}")
    if normalize and feature_map is identity_map:
        raise ValueError(
            "normalize=True needs a non-negative feature_map; identity_map gives signed features whose "
            "normaliser can be zero — use normalize=False"
        )
    dtype = compute_dtype(q)
    phi_q, phi_k = feature_map(q.to(dtype)), feature_map(k.to(dtype))
    for name, phi, x in (("q", phi_q, q), ("k", phi_k, k)):
        if not isinstance(phi, torch.Tensor) or phi.dim() != 4 or phi.shape[:3] != x.shape[:3]:
            got = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise ValueError(f"feature_map must map {name} of shape (B, H, L, D) to (B, H, L, D'), got {got}")
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"feature_map gave {phi_q.shape[-1]} features for q but {phi_k.shape[-1]} for k")
    phi_q, phi_k = phi_q.to(dtype), phi_k.to(dtype)
    B, H, _, num_features = phi_k.shape
    state_shape = (B, H, num_features, v.shape[-1])
    if initial_state is None:
        state = torch.zeros(state_shape, dtype=dtype, device=q.device)
        normaliser = torch.zeros(state_shape[:3], dtype=dtype, device=q.device)
    elif normalize:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state must be a tuple (S, z) when normalize=True")
        state, normaliser = initial_state
        check_tensor(state, "initial_state[0]", ndim=4, floating=True)
        check_shape(state, "initial_state[0]", state_shape, names="B, H, D', D_v")
        check_tensor(normaliser, "initial_state[1]", ndim=3, floating=True)
        check_shape(normaliser, "initial_state[1]", state_shape[:3], names="B, H, D'")
    else:
        check_tensor(initial_state, "initial_state", ndim=4, floating=True)
        check_shape(initial_state, "initial_state", state_shape, names="B, H, D', D_v")
        state, normaliser = initial_state, None
    for part in (state, normaliser):
        if part is not None and part.device != q.device:
            raise ValueError(f"initial_state must be on the device of q ({q.device}), got {part.device}")
    values, state = v.to(dtype), state.to(dtype)
    if normalize:
        # The normaliser z = sum phi(k_j) is the state of a value that is always 1: append a column
        # of ones to V and z rides along as the last column of S, through every form unchanged.
        values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
        state = torch.cat([state, normaliser.to(dtype).unsqueeze(-1)], dim=-1)
    return phi_q * scale, phi_k, values, state


def parallel_form(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic form: the (masked) T x S matrix phi(Q) phi(K)^T, plus what the initial state adds.

    The three forms share one signature: phi_q ``(B, H, T, D')`` (already scaled), phi_k
    ``(B, H, S, D')``, v ``(B, H, S, D_v)``, state ``(B, H, D', D_v)``, all in the compute dtype;
    each returns ``(o, final_state)``: ``(B, H, T, D_v)`` and ``(B, H, D', D_v)``.
    """
    T, S = phi_q.shape[2], phi_k.shape[2]
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = torch.tril(scores, diagonal=S - T)  # query i sees keys j <= S - T + i
    return scores @ v + phi_q @ state, state + phi_k.transpose(-1, -2) @ v


def _align_to_end(phi_q, phi_k, v):
    """Pad with zero features so causal queries and keys have one length, aligned at the end.

    Zero query rows produce outputs that are dropped; zero key features add nothing to the state.
    """
    T, S = phi_q.shape[2], phi_k.shape[2]
    if S > T:
        phi_q = F_.pad(phi_q, (0, 0, S - T, 0))
    elif T > S:
        phi_k, v = F_.pad(phi_k, (0, 0, T - S, 0)), F_.pad(v, (0, 0, T - S, 0))
    return phi_q, phi_k, v


def recurrent_form(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, through chapter 07's runner: write ``S_t = S_{t-1} + phi(k_t) v_t^T``, read
    ``phi(q_t)^T S_t``. Same signature as :func:`parallel_form`.

    Causal queries and keys are aligned at the end (query i is read after key S - T + i); without
    ``causal`` every query is read after the last key (queries padded in front, keys behind).
    """
    T, S = phi_q.shape[2], phi_k.shape[2]
    if causal:
        phi_q, phi_k, v = _align_to_end(phi_q, phi_k, v)
    else:
        phi_q, phi_k, v = F_.pad(phi_q, (0, 0, S, 0)), F_.pad(phi_k, (0, 0, 0, T)), F_.pad(v, (0, 0, 0, T))
    length = phi_q.shape[2]
    if length == 0:  # no query and no key
        return phi_q.new_zeros(*phi_q.shape[:3], v.shape[-1]), state
    outputs, state = run_recurrence(
        length,
        state,
        write=lambda t, memory: phi_k[:, :, t, :, None] * v[:, :, t, None, :],
        read=lambda t, memory: (phi_q[:, :, t, :, None] * memory).sum(2),
    )
    return outputs[:, :, length - T :], state


def chunk_form(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    causal: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise: masked attention inside each chunk, the state (a prefix sum) across chunks.

    Same signature as :func:`parallel_form`, plus ``chunk_size``.
    """
    B, H, T = phi_q.shape[:3]
    if not causal:
        # With no mask every query reads the same state: one sum over all chunks' outer products.
        pad = -phi_k.shape[2] % chunk_size
        phi_k_c = F_.pad(phi_k, (0, 0, 0, pad)).reshape(B, H, -1, chunk_size, phi_k.shape[-1])
        v_c = F_.pad(v, (0, 0, 0, pad)).reshape(B, H, -1, chunk_size, v.shape[-1])
        state = state + (phi_k_c.transpose(-1, -2) @ v_c).sum(2)
        return phi_q @ state, state
    phi_q, phi_k, v = _align_to_end(phi_q, phi_k, v)
    length = phi_q.shape[2]
    if length == 0:  # no query and no key
        return phi_q.new_zeros(*phi_q.shape[:3], v.shape[-1]), state
    pad = -length % chunk_size  # zero features at the end change no earlier output and no state

    def split(x):
        return F_.pad(x, (0, 0, 0, pad)).reshape(B, H, -1, chunk_size, x.shape[-1])

    phi_q_c, phi_k_c, v_c = split(phi_q), split(phi_k), split(v)
    chunk_states = phi_k_c.transpose(-1, -2) @ v_c  # (B, H, N, D', D_v): what each chunk writes
    # The state chunk n reads: the initial state plus every earlier chunk (an exclusive prefix sum).
    after = chunk_states.cumsum(2) + state.unsqueeze(2)
    before = after - chunk_states
    scores = torch.tril(phi_q_c @ phi_k_c.transpose(-1, -2))  # inside a chunk: plain causal attention
    output = phi_q_c @ before + scores @ v_c
    output = output.reshape(B, H, -1, v.shape[-1])[:, :, length - T : length]
    return output, after[:, :, -1]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map=elu_plus_one,
    causal: bool = True,
    normalize: bool = True,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Kernelised attention ``o_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps)``.

    q (B, H, T, D), k (B, H, S, D), v (B, H, S, D_v) -> o (B, H, T, D_v) in q's dtype.

    ``feature_map`` is any callable ``(..., D) -> (..., D')`` applied to q and k alike:
    :func:`elu_plus_one`, :func:`relu_map`, a :func:`favor_plus` map, or :func:`identity_map`
    (only with ``normalize=False``). ``scale`` (default ``D ** -0.5``) multiplies ``phi(q)``: with
    ``normalize=True`` it cancels (up to ``eps``); without, ``o_t = S_t^T (scale * phi(q_t))`` as
    in chapter 07. ``eps`` (default 1e-6) is added to the normaliser, so a query that sees no key
    — or only zero features, as ReLU can give — returns zeros instead of NaN; it assumes
    non-negative features, for which the normaliser is a sum of non-negative terms.

    Forms (same numbers, different cost): ``"parallel"`` builds the masked (T, S) matrix
    phi(Q) phi(K)^T (quadratic, the reference, :func:`parallel_form`); ``"recurrent"`` walks the
    tokens with a ``(D', D_v)`` state (:func:`recurrent_form`, through chapter 07's
    :func:`~course_lib.recurrent.run_recurrence`); ``"chunk"`` does masked attention inside chunks
    of ``chunk_size`` and passes the state between chunks (:func:`chunk_form`). ``causal=True``
    aligns the diagonal to the end (query i sees keys ``j <= S - T + i``); a query that sees
    nothing reads only the initial state. ``T = 0`` gives a ``(B, H, 0, D_v)`` output.

    State: ``S = sum_j phi(k_j) v_j^T`` of shape (B, H, D', D_v); with ``normalize=True`` the state
    is the tuple ``(S, z)`` with ``z = sum_j phi(k_j)`` of shape (B, H, D') — the normaliser's own
    state. ``initial_state`` (same format) stands for keys seen before this call; the final state
    (returned as ``(o, state)`` when ``output_final_state``, in float32, or float64 for float64
    input) adds every key of this call, so a causal sequence can be processed in pieces. With
    ``causal=False`` every query reads the initial state plus all S keys of the call.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    causal = check_bool(causal, "causal")
    normalize = check_bool(normalize, "normalize")
    check_choice(form, "form", FORMS)
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    scale = resolve_scale(scale, D)
    eps = check_float(eps, "eps", min=0, min_open=True)
    output_final_state = check_bool(output_final_state, "output_final_state")
    phi_q, phi_k, values, state = _features(q, k, v, feature_map, scale, initial_state, normalize)

    if form == "parallel":
        output, final = parallel_form(phi_q, phi_k, values, state, causal)
    elif form == "recurrent":
        output, final = recurrent_form(phi_q, phi_k, values, state, causal)
    else:
        output, final = chunk_form(phi_q, phi_k, values, state, causal, chunk_size)
    if normalize:
        output = output[..., :-1] / (output[..., -1:] + eps)
        final = (final[..., :-1], final[..., -1])
    output = output.to(q.dtype)
    return (output, final) if output_final_state else output


def linear_attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    feature_map=elu_plus_one,
    causal: bool = True,
    normalize: bool = True,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """The (B, H, T, S) matrix A that linear attention applies to the values: ``o = A v``.

    Row i is ``scale phi(q_i).phi(k_j)`` over the visible keys, divided by its sum plus ``eps``
    when ``normalize``. It has rank at most D' (the feature count) before masking — the low rank
    the notebook measures. Returned in float32 (float64 for float64 input); no initial state.
    """
    check_tensor(q, "q", ndim=4, floating=True)
    check_tensor(k, "k", ndim=4, floating=True)
    values = torch.zeros(*k.shape[:3], 1, dtype=k.dtype, device=k.device)  # only q and k matter here
    B, H, T, S, D, _ = check_attention_inputs(q, k, values)
    causal = check_bool(causal, "causal")
    normalize = check_bool(normalize, "normalize")
    scale = resolve_scale(scale, D)
    eps = check_float(eps, "eps", min=0, min_open=True)
    phi_q, phi_k, *_ = _features(q, k, values, feature_map, scale, None, normalize)
    matrix = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        matrix = torch.tril(matrix, diagonal=S - T)
    if normalize:
        matrix = matrix / (matrix.sum(-1, keepdim=True) + eps)
    return matrix


# --- efficient attention (Shen et al.) ----------------------------------------------------------


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Efficient attention: ``softmax_D(Q) (softmax_S(K)^T V)`` (Shen et al., 2021).

    q (B, H, T, D), k (B, H, S, D), v (B, H, S, D_v) -> (B, H, T, D_v), in q's dtype.

    Q is normalised over its feature dimension (each query becomes a distribution over the D
    "global context" slots) and K over the *sequence* dimension (each slot becomes a distribution
    over the S keys, so ``softmax_S(K)^T V`` is D weighted averages of the values). The implied
    (T, S) matrix ``softmax_D(Q) softmax_S(K)^T`` then has rows that sum to one:
    ``sum_j sum_d q'_id k'_jd = sum_d q'_id * 1 = 1``. One of the course's source documents
    normalises K over its last (feature) dimension instead; then ``sum_j k'_jd`` is no longer 1 —
    the column sums over d add up to S — so a row of the implied matrix sums to
    ``sum_d q'_id sum_j k'_jd``, about S / D: the output grows with the sequence length instead of
    averaging the values. No scale is applied (each softmax sees only q or only k) and there is no
    causal form: the softmax over the sequence would need every future key.
    """
    check_attention_inputs(q, k, v)
    dtype = compute_dtype(q)
    query_weights = torch.softmax(q.to(dtype), dim=-1)  # over features D
    key_weights = torch.softmax(k.to(dtype), dim=-2)  # over the sequence S
    context = key_weights.transpose(-1, -2) @ v.to(dtype)  # (B, H, D, D_v)
    return (query_weights @ context).to(q.dtype)


# --- Linformer ----------------------------------------------------------------------------------


def linformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    E: torch.Tensor,
    F: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linformer: softmax attention over k projected positions, ``softmax(Q (E K)^T * scale) (F V)``.

    q (B, H, T, D), k (B, H, S, D), v (B, H, S, D_v); E and F of shape (P, S) (shared by the
    heads) or (H, P, S) (one per head) project the S positions down to P -> (B, H, T, D_v).

    Masking rules: every projected key ``(E K)_p`` mixes all S positions, so no mask over
    (query, key) pairs survives the projection. ``causal=True`` raises ``ValueError`` (each
    projected key would already contain future tokens). Padding is supported: ``key_padding_mask``
    (B, S), True for real tokens, zeroes the padded keys and values before the projection, so they
    add nothing to any projected key or value. A fully padded sequence gives zeros.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    if check_bool(causal, "causal"):
        raise ValueError(
            "causal=True is not supported by linformer_attention: the projection E mixes all S positions, "
            "so every projected key already contains future tokens"
        )
    for name, projection in (("E", E), ("F", F)):
        check_tensor(projection, name, ndim=(2, 3), floating=True)
        if projection.shape[-1] != S or (projection.dim() == 3 and projection.shape[0] != H):
            raise ValueError(
                f"{name} must have shape (P, S={S}) or (H={H}, P, S={S}), got {tuple(projection.shape)}"
            )
        check_like(projection, name, q, dtype=False)
    if E.shape[-2] != F.shape[-2]:
        raise ValueError(
            f"E and F must project to the same length P, got E {tuple(E.shape)}, F {tuple(F.shape)}"
        )
    scale = resolve_scale(scale, D)
    dtype = compute_dtype(q)
    keys, values = k.to(dtype), v.to(dtype)
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", ndim=2, dtype=torch.bool)
        check_like(key_padding_mask, "key_padding_mask", q, dtype=False)
        check_shape(key_padding_mask, "key_padding_mask", (B, S), names="B, S")
        keep = key_padding_mask[:, None, :, None].to(dtype)
        keys, values = keys * keep, values * keep
    projected_keys = E.to(dtype) @ keys  # (B, H, P, D)
    projected_values = F.to(dtype) @ values  # (B, H, P, D_v)
    weights = torch.softmax(q.to(dtype) @ projected_keys.transpose(-1, -2) * scale, dim=-1)
    return (weights @ projected_values).to(q.dtype)


class LinformerAttention(nn.Module):
    """Multi-head Linformer self-attention: q/k/v/out projections plus learned E and F of shape (P, L).

    ``max_len`` L is the longest sequence; a shorter input of length T uses the first T columns
    of E and F. ``share_kv=True`` uses one projection for keys and values (Linformer's sharing).
    Input and output are (B, T, embed_dim).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_len: int,
        proj_len: int,
        *,
        share_kv: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = check_int(embed_dim, "embed_dim", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.max_len = check_int(max_len, "max_len", min=1)
        self.proj_len = check_int(proj_len, "proj_len", min=1)
        self.share_kv = check_bool(share_kv, "share_kv")
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool(bias, "bias"))
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        # N(0, 1/P) entries: a Johnson-Lindenstrauss style random projection at initialisation.
        self.E = nn.Parameter(torch.randn(proj_len, max_len) * proj_len**-0.5)
        self.F = self.E if share_kv else nn.Parameter(torch.randn(proj_len, max_len) * proj_len**-0.5)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        B, T, C = x.shape
        if C != self.embed_dim:
            raise ValueError(f"x must have embed_dim={self.embed_dim} features, got {tuple(x.shape)}")
        if T > self.max_len:
            raise ValueError(f"x has length T={T} but this layer was built for max_len={self.max_len}")
        heads = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        E, F = self.E[:, :T].to(x.dtype), self.F[:, :T].to(x.dtype)
        o = linformer_attention(heads[0], heads[1], heads[2], E, F, key_padding_mask=key_padding_mask)
        return self.out(o.transpose(1, 2).reshape(B, T, C))
