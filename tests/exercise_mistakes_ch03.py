"""Wrong solutions of chapter 03's exercises 3.7 and 3.8, one per misconception (see exercise_mistakes.py).

Each entry: exercise id -> list of (description, expected fragment of the message, function(s)).
"""

import torch

import course_lib

NEG_INF = float("-inf")


def _flash(
    q,
    k,
    v,
    causal=False,
    block_q=16,
    block_k=16,
    *,
    skip=True,
    offset=None,
    guard=True,
    lse_kind="m + log l",
    order="fa2",
    skip_diagonal=False,
    tile_softmax=False,
):
    """The FA2 forward of exercise 3.7, with one thing done wrong at a time."""
    B, H, T, D = q.shape
    S, D_v = k.shape[2], v.shape[3]
    scale = D**-0.5
    offset = S - T if offset is None else offset
    out, lse = q.new_zeros(B, H, T, D_v), q.new_full((B, H, T), NEG_INF)
    q_blocks = list(enumerate(range(0, T, block_q)))
    k_blocks = list(enumerate(range(0, S, block_k)))
    state = {}
    for i, q0 in q_blocks:
        n = min(q0 + block_q, T) - q0
        state[i] = [q.new_full((B, H, n), NEG_INF), q.new_zeros(B, H, n), q.new_zeros(B, H, n, D_v)]
    pairs = [(a, b) for a in q_blocks for b in k_blocks]
    if order == "fa1":
        pairs = [(a, b) for b in k_blocks for a in q_blocks]
    tiles = []
    for (i, q0), (j, k0) in pairs:
        q1, k1 = min(q0 + block_q, T), min(k0 + block_k, S)
        above = k0 > q1 - 1 + offset
        if causal and skip and (above or (skip_diagonal and k1 - 1 > q0 + offset)):
            continue
        tiles.append((i, j))
        s = q[:, :, q0:q1] * scale @ k[:, :, k0:k1].transpose(-1, -2)
        if causal:
            hidden = torch.arange(k0, k1)[None, :] > torch.arange(q0, q1)[:, None] + offset
            s = s.masked_fill(hidden, NEG_INF)
        m, l, acc = state[i]
        m_new = torch.maximum(m, s.amax(-1))
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new)) if guard else m_new
        p = torch.softmax(s, -1) if tile_softmax else torch.exp(s - shift[..., None])
        correction = torch.exp(m - shift)
        state[i] = [m_new, l * correction + p.sum(-1), acc * correction[..., None] + p @ v[:, :, k0:k1]]
    for i, q0 in q_blocks:
        q1 = min(q0 + block_q, T)
        m, l, acc = state[i]
        out[:, :, q0:q1] = acc / (torch.where(l > 0, l, torch.ones_like(l)) if guard else l)[..., None]
        lse[:, :, q0:q1] = m + torch.log(l) if lse_kind == "m + log l" else m
    return out, lse, tiles


def _whole_scores(q, k, v, causal=False, block_q=16, block_k=16):
    """Attention on the whole T x S score matrix (right numbers, right tile list): not FlashAttention."""
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.arange(S)[None, :] > torch.arange(T)[:, None] + S - T, NEG_INF)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    total = e.sum(-1, keepdim=True)
    out = e @ v / torch.where(total > 0, total, torch.ones_like(total))
    return out, (m + torch.log(total))[..., 0], _flash(q, k, v, causal, block_q, block_k)[2]


def _library_forward(q, k, v, causal=False, block_q=16, block_k=16):
    out, lse = course_lib.tiling.flash_forward_fa2(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    return out, lse, []


def _tile(q_i, k_j, v_j, do_i, lse_i, delta_i, scale, allowed=None, *, kind=None):
    """The tile backward of exercise 3.8, with one thing done wrong at a time."""
    s = scale * (q_i @ k_j.T)
    if allowed is not None and kind != "mask ignored":
        s = s.masked_fill(~allowed, NEG_INF)
    safe = torch.where(torch.isfinite(lse_i), lse_i, torch.full_like(lse_i, float("inf")))
    if kind == "no guard":
        safe = lse_i
    if kind == "own softmax":
        p = torch.softmax(s, -1).nan_to_num(0.0)
    elif kind == "unstable":
        p = torch.exp(s) / torch.exp(safe)[:, None]
    else:
        p = torch.exp(s - safe[:, None])
    dp = do_i @ v_j.T
    delta = (p * dp).sum(-1) if kind == "tile delta" else delta_i
    ds = p * (dp - delta[:, None])
    if kind == "no scale":
        return ds @ k_j, ds.T @ q_i, p.T @ do_i
    if kind == "dO^T P":
        return scale * ds @ k_j, scale * ds.T @ q_i, do_i.T @ p
    return scale * ds @ k_j, scale * ds.T @ q_i, p.T @ do_i


def _autograd_tile(q_i, k_j, v_j, do_i, lse_i, delta_i, scale, allowed=None):
    q_i, k_j, v_j = (x.clone().requires_grad_() for x in (q_i, k_j, v_j))
    with torch.enable_grad():
        s = scale * (q_i @ k_j.T)
        if allowed is not None:
            s = s.masked_fill(~allowed, NEG_INF)
        p = torch.exp(s - torch.where(torch.isfinite(lse_i), lse_i, float("inf"))[:, None])
        loss = (p @ v_j * do_i).sum() - (p * delta_i[:, None]).sum()
        return torch.autograd.grad(loss, (q_i, k_j, v_j))


MISTAKES = {
    "3.7": [
        (
            "no tile skipped",
            "entirely above the causal diagonal",
            lambda *a, **kw: _flash(*a, **kw, skip=False),
        ),
        (
            "the diagonal tiles skipped too",
            "that some query sees",
            lambda *a, **kw: _flash(*a, **kw, skip_diagonal=True),
        ),
        ("the whole score matrix at once", "never holds a head's T x S scores", _whole_scores),
        (
            "the diagonal aligned to the start",
            "aligned to the start",
            lambda *a, **kw: _flash(*a, **kw, offset=0),
        ),
        (
            "no guard for rows that saw nothing",
            "see no key at all",
            lambda *a, **kw: _flash(*a, **kw, guard=False),
        ),
        (
            "the running max as the logsumexp",
            "the running max alone",
            lambda *a, **kw: _flash(*a, **kw, lse_kind="m"),
        ),
        ("FA1's loop order", "FA1's order", lambda *a, **kw: _flash(*a, **kw, order="fa1")),
        ("softmax of each tile", "PyTorch shortcut", lambda *a, **kw: _flash(*a, **kw, tile_softmax=True)),
        ("the library's flash_forward_fa2", "course's own code", _library_forward),
    ],
    "3.8": [
        (
            "P as the tile's own softmax",
            "softmax of this tile's keys alone",
            lambda *a, **kw: _tile(*a, **kw, kind="own softmax"),
        ),
        (
            "D from the tile",
            "D computed from this tile alone",
            lambda *a, **kw: _tile(*a, **kw, kind="tile delta"),
        ),
        ("the scale left out", "the scale is missing", lambda *a, **kw: _tile(*a, **kw, kind="no scale")),
        ("the mask ignored", "allowed ignored", lambda *a, **kw: _tile(*a, **kw, kind="mask ignored")),
        (
            "no guard for rows that see no key",
            "see no key at all",
            lambda *a, **kw: _tile(*a, **kw, kind="no guard"),
        ),
        ("exp(s) / exp(lse)", "exceed 700", lambda *a, **kw: _tile(*a, **kw, kind="unstable")),
        ("dO^T P instead of P^T dO", "axes swapped", lambda *a, **kw: _tile(*a, **kw, kind="dO^T P")),
        ("autograd on the tile", "PyTorch shortcut", _autograd_tile),
        (
            "the library's tile_gradients",
            "course's own code",
            lambda q, k, v, do, lse, delta, scale, allowed=None: course_lib.tiling.tile_gradients(
                q, k, v, do, scale * q @ k.T, lse, -delta, scale
            ),
        ),
    ],
}
