"""Wrong solutions of chapter 06's new exercise (6.4), one per misconception: each must fail its checker with
a message that names it (the fragment listed). Loaded into tests/exercise_mistakes.py's MISTAKES."""

import torch

import course_lib


def _chunks(
    phi_q,
    phi_k,
    v,
    chunk_size,
    initial_state=None,
    *,
    read_after=False,
    mask="causal",
    carry=True,
    use_state=True,
    drop_tail=False,
    final_before_last=False,
    write_q=False,
):
    """The chunkwise form with one mistake switched on."""
    B, H, T, D = phi_k.shape
    zero = phi_q.new_zeros(B, H, D, v.shape[-1])
    start_state = zero if initial_state is None or not use_state else initial_state
    S, outputs, previous = start_state, [], start_state
    stop = T - T % chunk_size if drop_tail and T > chunk_size else T
    for start in range(0, stop, chunk_size):
        q, k, x = (t[:, :, start : start + chunk_size] for t in (phi_q, phi_k, v))
        scores = q @ k.transpose(-1, -2)
        scores = {"causal": torch.tril(scores), "strict": torch.tril(scores, -1), "none": scores}[mask]
        after = S + (q if write_q else k).transpose(-1, -2) @ x
        outputs.append(q @ (after if read_after else S) + scores @ x)
        previous = S
        S = after if carry else start_state
        if not carry:
            previous, S = after, start_state
    final = previous if final_before_last else S
    if not carry:
        final = previous
    return torch.cat(outputs, dim=2), final


def _parallel(phi_q, phi_k, v, chunk_size, initial_state=None):
    """The parallel form: right numbers, but the whole (T, T) matrix."""
    B, H, T, D = phi_k.shape
    S0 = phi_q.new_zeros(B, H, D, v.shape[-1]) if initial_state is None else initial_state
    o = torch.tril(phi_q @ phi_k.transpose(-1, -2)) @ v + phi_q @ S0
    return o, S0 + phi_k.transpose(-1, -2) @ v


def _token_by_token(phi_q, phi_k, v, chunk_size, initial_state=None):
    """The recurrent form: right numbers, one step per token."""
    B, H, T, D = phi_k.shape
    S = phi_q.new_zeros(B, H, D, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        S = S + phi_k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((phi_q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outputs, dim=2), S


MISTAKES = {
    "6.4": [
        ("read after the write", "counted twice", lambda *a, **kw: _chunks(*a, **kw, read_after=True)),
        (
            "no causal mask inside the chunk",
            "later keys of the chunk leak",
            lambda *a, **kw: _chunks(*a, **kw, mask="none"),
        ),
        ("the diagonal left out", "diagonal left out", lambda *a, **kw: _chunks(*a, **kw, mask="strict")),
        ("the state not carried", "not carried", lambda *a, **kw: _chunks(*a, **kw, carry=False)),
        (
            "the initial state ignored",
            "initial state ignored",
            lambda *a, **kw: _chunks(*a, **kw, use_state=False),
        ),
        (
            "the last, shorter chunk dropped",
            "without the last, shorter chunk",
            lambda *a, **kw: _chunks(*a, **kw, drop_tail=True),
        ),
        (
            "the final state before the last write",
            "before the last chunk's write",
            lambda *a, **kw: _chunks(*a, **kw, final_before_last=True),
        ),
        ("the parallel form", "parallel form", _parallel),
        ("token by token", "a loop over tokens", _token_by_token),
        (
            "the library's linear_attention",
            "course's own code",
            lambda q, k, v, c, initial_state=None: course_lib.linear_attention(
                q,
                k,
                v,
                feature_map=course_lib.linear.identity_map,
                normalize=False,
                scale=1.0,
                form="chunk",
                chunk_size=c,
                initial_state=initial_state,
                output_final_state=True,
            ),
        ),
        (
            "the library's chunk_form",
            "course's own code",
            lambda q, k, v, c, initial_state=None: course_lib.linear.chunk_form(
                q,
                k,
                v,
                torch.zeros(*k.shape[:2], k.shape[-1], v.shape[-1], dtype=q.dtype)
                if initial_state is None
                else initial_state,
                True,
                c,
            ),
        ),
    ],
}
