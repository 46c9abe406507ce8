"""Checkers for notebook 04: KV bytes per token, repeat_kv, one paged-cache append, top-p filtering, decode
attention read through a block table, GQA decode without repeating K and V; and the chapter's predict and
explain exercises."""

from __future__ import annotations

import torch

from ..kv_cache import MODEL_CONFIGS
from .common import Case, Draw, Mismatch, checker, compare, compare_exact, compare_number, declare

__all__ = [
    "check_kv_bytes_per_token",
    "check_repeat_kv",
    "check_paged_append",
    "check_top_p_filter",
    "check_paged_decode",
    "check_gqa_decode",
]


def _kv_numbers(config: dict) -> int:
    """Numbers one token adds to the cache over all layers, from the definition."""
    if config["attention"] == "mla":
        per_layer = config["kv_lora_rank"] + config["qk_rope_head_dim"]  # the latent and the RoPE key
    else:
        per_layer = 2 * config["num_kv_heads"] * config["head_dim"]  # a key and a value per kv head
    return per_layer * config["num_layers"]


def _random_config(draw: Draw, attention: str) -> dict:
    heads = draw.choice([8, 12, 16, 32, 40])
    config = dict(
        attention=attention,
        num_layers=draw.int(2, 90),
        num_heads=heads,
        head_dim=draw.choice([64, 80, 96, 128]),
    )
    config["hidden_size"] = heads * config["head_dim"]
    if attention == "mla":
        config.update(kv_lora_rank=draw.choice([256, 384, 512]), qk_rope_head_dim=draw.choice([32, 64]))
    else:
        config["num_kv_heads"] = {
            "mha": heads,
            "mqa": 1,
            "gqa": draw.choice([d for d in (2, 4, 8) if heads % d == 0]),
        }[attention]
    return config


@checker("4.1", title="bytes per token", points=1, task="the KV-cache size")
def check_kv_bytes_per_token(draw: Draw):
    """``fn(config)``: the fp16 KV-cache bytes one token adds over all layers (an int). MLA configs cache
    ``kv_lora_rank + qk_rope_head_dim`` numbers per layer, the others a key and a value per kv head."""
    named = ["Llama-2-7B", "Llama-3-8B", "Gemma-2B", "DeepSeek-V2"]
    cases = [(name, dict(MODEL_CONFIGS[name])) for name in named]
    cases += [
        (f"a made-up {kind.upper()} model", _random_config(draw, kind)) for kind in ("gqa", "mla", "mqa")
    ]
    for name, config in cases:
        expected = 2 * _kv_numbers(config)
        layers = config["num_layers"]
        variants = {}
        if config["attention"] != "mla":
            variants["the cache of every query head (num_heads, not num_kv_heads)"] = (
                2 * 2 * config["num_heads"] * config["head_dim"] * layers
            )
            variants["keys only (values forgotten)"] = expected / 2
        else:
            variants["the latent only (the decoupled RoPE key forgotten)"] = (
                2 * config["kv_lora_rank"] * layers
            )
            variants["MLA counted as full keys and values per head"] = (
                2 * 2 * config["num_heads"] * config["head_dim"] * layers
            )
        variants["one layer only"] = expected / layers
        variants["fp32 sizes (4 bytes per number, not 2)"] = 2 * expected
        variants["the number of cached numbers (not bytes)"] = expected / 2

        def judge(got, expected, variants=variants, name=name):
            compare_number(
                got,
                expected,
                f"bytes per token of {name}",
                integer=True,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            f"{name} ({config['attention'].upper()})",
            (dict(config),),
            expected=expected,
            compare=judge,
            inputs=["config"],
        )


@checker(
    "4.2", title="repeat_kv for GQA", points=1, task="repeat_kv", fallback="course_lib.kv_cache:repeat_kv"
)
def check_repeat_kv(draw: Draw):
    """``fn(x, group)``: ``(B, H_kv, S, D)`` -> ``(B, H_kv * group, S, D)``, head h = kv head h // group."""
    for name, B, H_kv, group, S, D in [
        ("a few groups", draw.int(1, 2), draw.int(2, 4), draw.int(2, 4), draw.int(2, 6), draw.int(2, 5)),
        ("one kv head (MQA)", draw.int(1, 2), 1, draw.int(2, 8), draw.int(1, 5), draw.int(2, 5)),
        ("group of one (MHA)", 1, draw.int(2, 4), 1, draw.int(2, 5), draw.int(2, 5)),
        ("one cached token", 1, 3, 2, 1, 4),
    ]:
        x = draw.randn(B, H_kv, S, D)
        expected = torch.stack([x[:, h // group] for h in range(H_kv * group)], dim=1)
        variants = {
            "the kv heads cycled (x.repeat(1, group, 1, 1)): head h reads kv head h % H_kv": (
                lambda x=x, group=group: x.repeat(1, group, 1, 1)
            ),
            "each kv head repeated along the sequence axis": lambda x=x, group=group: x.repeat_interleave(
                group, 2
            ),
        }

        def judge(got, expected, variants=variants, group=group):
            compare(got, expected, f"repeat_kv(x, group={group})", atol=0, rtol=0, variants=variants)

        yield Case(
            f"{name}: B={B}, H_kv={H_kv}, group={group}, S={S}, D={D}",
            (x, group),
            expected=expected,
            compare=judge,
            inputs=["x", "group"],
        )


@checker("4.3", title="one paged-cache append", points=2, task="the paged append")
def check_paged_append(draw: Draw):
    """``fn(block_table, length, block_size, free_blocks) -> (physical_block, offset)``: where the token at
    position ``length`` goes. When it starts a new block, take one with ``free_blocks.pop()`` and append it
    to ``block_table`` (both lists change in place). The free list is a shuffled pool, as in a server
    that has been running for a while, and the sequence may already hold tokens."""
    for scenario in range(3):
        block_size = draw.choice([1, 3, 4, 16]) if scenario else draw.choice([4, 8])
        pool = draw.permutation(draw.int(12, 24))
        start_blocks = draw.int(0, 2) if scenario else 0
        table = [pool.pop() for _ in range(start_blocks)]
        length = max(0, start_blocks * block_size - draw.int(0, block_size - 1)) if start_blocks else 0
        free = pool[:]
        appends = min(draw.int(block_size + 2, 3 * block_size + 3), (len(free) - 1) * block_size)
        # The whole run is simulated first; each append is one case, on the reader's own lists.
        expected_steps = []
        sim_table, sim_free = table[:], free[:]
        for position in range(length, length + appends):
            if position % block_size == 0:
                sim_table.append(sim_free.pop())
            expected_steps.append(
                ((sim_table[position // block_size], position % block_size), sim_table[:], sim_free[:])
            )
        yours_table, yours_free = table[:], free[:]
        for step, position in enumerate(range(length, length + appends)):
            (block, offset), table_after, free_after = expected_steps[step]
            logical = position // block_size

            def judge(
                got,
                expected,
                table_after=table_after,
                free_after=free_after,
                logical=logical,
                position=position,
                yours_table=yours_table,
                yours_free=yours_free,
                offset=offset,
            ):
                if not isinstance(got, (tuple, list)) or len(got) != 2:
                    raise Mismatch(f"expected a (physical_block, offset) pair, got {got!r}")
                if yours_table != table_after:
                    hint = ""
                    if len(yours_table) < len(table_after):
                        hint = "\nhint: the last block was full (or there was none): take a new block first"
                    elif len(yours_table) > len(table_after):
                        hint = "\nhint: you took a block although the last one still had room"
                    elif yours_table[:-1] == table_after[:-1]:
                        hint = (
                            "\nhint: the new block must be the one free_blocks.pop() returns (the last one)"
                        )
                    raise Mismatch(
                        f"block_table after the append is {yours_table}, expected {table_after}{hint}"
                    )
                if yours_free != free_after:
                    raise Mismatch(f"free_blocks after the append is {yours_free}, expected {free_after}")
                if tuple(got) != expected:
                    hint = ""
                    if tuple(got) == (logical, offset):
                        hint = (
                            f"\nhint: {logical} is the logical block (position // block_size); the token "
                            f"goes to the physical block block_table[{logical}] = {expected[0]}"
                        )
                    elif got[0] == expected[0]:
                        hint = "\nhint: the block is right; the slot inside it is position % block_size"
                    raise Mismatch(
                        f"token at position {position}: got (block, offset) = {tuple(got)}, "
                        f"expected {expected}{hint}"
                    )

            yield Case(
                f"append {step + 1} of {appends}: block_size={block_size}, the token at position {position}",
                (yours_table, position, block_size, yours_free),
                expected=(block, offset),
                compare=judge,
                inputs=["block_table", "length", "block_size", "free_blocks"],
                copy_args=False,
            )


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    probabilities = torch.softmax(logits.double(), -1)
    order = probabilities.sort(dim=-1, descending=True, stable=True).indices
    sorted_p = probabilities.gather(-1, order)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@checker(
    "4.4",
    title="top-p (nucleus) filtering",
    points=1,
    task="top-p filtering",
    fallback="course_lib.decoding:top_p_filter",
)
def check_top_p_filter(draw: Draw):
    """``fn(logits, p)`` keeps the smallest set of most likely tokens whose probability reaches ``p`` (the
    most likely token always); the others become ``-inf``; kept logits are unchanged."""
    hand = torch.log(
        torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    )  # sorted: 0.5, 0.3, 0.15, 0.05
    cases = [
        ("p=0.55 on [0.05, 0.5, 0.15, 0.3]: two tokens", hand, 0.55),
        ("p=0.81: three tokens", hand, 0.81),
        ("p=0.1: only the most likely token", hand, 0.1),
        ("p=1.0: every token", hand, 1.0),
    ]
    for _ in range(3):
        logits = draw.randn(draw.int(1, 4), draw.int(5, 30), scale=2.0, dtype=torch.float32)
        for _ in range(20):
            p = draw.float(0.3, 0.95)
            sorted_p = torch.softmax(logits.double(), -1).sort(-1, descending=True).values.cumsum(-1)
            if (sorted_p - p).abs().min() > 1e-4:
                break
        cases.append((f"random float32 logits {tuple(logits.shape)}, p={p:.3f}", logits, p))
    for name, logits, p in cases:
        keep = _top_p(logits, p)
        probabilities = torch.softmax(logits.double(), -1)
        order = probabilities.sort(dim=-1, descending=True, stable=True).indices
        sorted_p = probabilities.gather(-1, order)
        including = sorted_p.cumsum(-1) < p
        variants = {
            "the tokens whose cumulative mass *including* themselves stays below p (the token that crosses p "
            "is dropped)": lambda including=including, order=order: torch.zeros_like(including).scatter(
                -1, order, including
            ),
            "the least likely tokens (sorted in increasing order)": lambda logits=logits, p=p: _top_p(
                -logits, p
            ),
        }

        def judge(got, expected, logits=logits, variants=variants, p=p):
            if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
                raise Mismatch(f"expected a tensor of shape {tuple(logits.shape)}, got {got!r:.80}")
            compare_exact(
                torch.isfinite(got), expected, f"which tokens are kept at p={p:.3f}", variants=variants
            )
            compare(
                got[expected].to(logits.dtype),
                logits[expected],
                "the kept logits (they must be unchanged)",
                atol=0,
                rtol=0,
                check_dtype=False,
            )
            if not torch.all(got[~expected] == float("-inf")):
                raise Mismatch("removed tokens must be -inf")

        yield Case(name, (logits, p), expected=keep, compare=judge, inputs=["logits", "p"])


# --- predict and explain ---------------------------------------------------------------------------

declare("4.5", kind="predict", title="the KV cache of Llama-3-8B at 32K tokens")
declare("4.6", kind="predict", title="the slots contiguous preallocation wastes on one static batch")
declare("4.9", kind="explain", title="why GQA speeds up decoding but not prefill", points=2)


# --- 4.7: decode attention that reads the cache through a block table --------------------------------


def _decode_reference(q, keys, values):
    """Attention of one query per head over contiguous keys ``(H, n, D)``: the definition, whole rows."""
    scores = (keys @ q[:, :, None])[..., 0] * q.shape[-1] ** -0.5  # (H, n)
    return torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), values)


def _paged_pool(draw: Draw, lengths, block_size, H, D, D_v, shared_prefix=False):
    """A pool of blocks holding each sequence's tokens at shuffled physical blocks, garbage elsewhere.

    Returns key_blocks, value_blocks, block_tables (padded with random blocks), the sequences' keys and
    values stored contiguously, and the keys and values of each sequence's whole last block (stale slots
    included)."""
    needed = [-(-n // block_size) for n in lengths]
    prefix_blocks = 1 if shared_prefix else 0
    total = sum(needed) - prefix_blocks * (len(lengths) - 1) + draw.int(2, 5)
    order = draw.permutation(total)
    # Garbage everywhere first: stale slots and unused blocks hold large values that must not be read.
    key_blocks = draw.randn(total, H, block_size, D, scale=4.0)
    value_blocks = draw.randn(total, H, block_size, D_v, scale=20.0)
    tables, keys, values = [], [], []
    shared = [order.pop() for _ in range(prefix_blocks)]
    shared_keys = draw.randn(H, prefix_blocks * block_size, D)
    shared_values = draw.randn(H, prefix_blocks * block_size, D_v)
    for n, count in zip(lengths, needed):
        own = shared + [order.pop() for _ in range(count - prefix_blocks)]
        k = torch.cat([shared_keys, draw.randn(H, count * block_size - shared_keys.shape[1], D)], 1)
        v = torch.cat([shared_values, draw.randn(H, count * block_size - shared_values.shape[1], D_v)], 1)
        for logical, physical in enumerate(own):
            span = slice(logical * block_size, min((logical + 1) * block_size, n))
            width = span.stop - span.start
            key_blocks[physical, :, :width] = k[:, span]
            value_blocks[physical, :, :width] = v[:, span]
        tables.append(own)
        keys.append(k[:, :n])
        values.append(v[:, :n])
    width = max(needed) + draw.int(0, 2)
    padded = [t + [draw.int(0, total - 1) for _ in range(width - len(t))] for t in tables]
    return key_blocks, value_blocks, torch.tensor(padded, dtype=torch.long), keys, values


@checker("4.7", title="decode attention through a block table", points=2, task="paged decode attention")
def check_paged_decode(draw: Draw):
    """``fn(q, key_blocks, value_blocks, block_tables, lengths) -> (R, H, D_v)``: one decoding query per
    sequence, ``q (R, H, D)``, attending over that sequence's ``lengths[r]`` cached tokens, which live in
    the physical blocks ``block_tables[r, 0], block_tables[r, 1], ...`` of the pool ``key_blocks
    (N, H, block_size, D)`` / ``value_blocks (N, H, block_size, D_v)``. Scale ``D ** -0.5``."""
    for name, lengths, block_size, shared in [
        ("one sequence, whole blocks", [(m := draw.choice([4, 8])) * draw.int(2, 4)], m, False),
        (
            "sequences of uneven lengths, last blocks partly filled",
            [draw.not_multiple(3, 30, 4) for _ in range(draw.int(2, 4))],
            4,
            False,
        ),
        ("a sequence of one token beside a longer one", [1, draw.int(9, 20)], draw.choice([4, 8]), False),
        ("blocks of one token", [draw.int(2, 7) for _ in range(2)], 1, False),
        (
            "two forks sharing their first block",
            [draw.int(9, 15), draw.int(9, 15)],
            draw.choice([4, 8]),
            True,
        ),
    ]:
        H, D, D_v = draw.int(1, 3), draw.choice([4, 8]), draw.choice([3, 5])
        key_blocks, value_blocks, tables, keys, values = _paged_pool(
            draw, lengths, block_size, H, D, D_v, shared_prefix=shared
        )
        R = len(lengths)
        q = draw.randn(R, H, D)
        expected = torch.stack([_decode_reference(q[r], keys[r], values[r]) for r in range(R)])
        n_blocks = [-(-n // block_size) for n in lengths]

        def physical_order(
            q=q, key_blocks=key_blocks, value_blocks=value_blocks, lengths=lengths, bs=block_size
        ):
            """Blocks 0, 1, 2, ... of the pool read as if they were the sequence's."""
            out = []
            for r, n in enumerate(lengths):
                k = key_blocks[: -(-n // bs)].transpose(0, 1).reshape(q.shape[1], -1, key_blocks.shape[-1])
                v = (
                    value_blocks[: -(-n // bs)]
                    .transpose(0, 1)
                    .reshape(q.shape[1], -1, value_blocks.shape[-1])
                )
                out.append(_decode_reference(q[r], k[:, :n], v[:, :n]))
            return torch.stack(out)

        def gathered(r, count, key_blocks=key_blocks, value_blocks=value_blocks, tables=tables):
            blocks = tables[r, :count]
            k = key_blocks[blocks].transpose(0, 1).reshape(key_blocks.shape[1], -1, key_blocks.shape[-1])
            v = (
                value_blocks[blocks]
                .transpose(0, 1)
                .reshape(value_blocks.shape[1], -1, value_blocks.shape[-1])
            )
            return k, v

        def stale(q=q, lengths=lengths, n_blocks=n_blocks, gathered=gathered):
            """Every slot of the sequence's blocks, the unwritten ones after its last token too."""
            return torch.stack(
                [_decode_reference(q[r], *gathered(r, n_blocks[r])) for r in range(len(lengths))]
            )

        def whole_blocks_only(q=q, lengths=lengths, bs=block_size, gathered=gathered, values=values):
            out = []
            for r, n in enumerate(lengths):
                full = n // bs
                if full == 0:  # nothing to attend to: zeros, as softmax over no key times no value gives
                    out.append(q.new_zeros(q.shape[1], values[r].shape[-1]))
                    continue
                k, v = gathered(r, full)
                out.append(_decode_reference(q[r], k, v))
            return torch.stack(out)

        def no_scale(q=q, keys=keys, values=values):
            return torch.stack(
                [_decode_reference(q[r] * q.shape[-1] ** 0.5, keys[r], values[r]) for r in range(len(keys))]
            )

        variants = {
            "attention over the pool's blocks 0, 1, 2, ... in physical order: read the sequence's blocks "
            "through its table, key_blocks[block_tables[r, i]]": physical_order,
            "attention over every slot of the sequence's blocks: the slots after its last token hold stale "
            "data from other sequences; keep only the first lengths[r] tokens": stale,
            "attention over the full blocks only: the last, partly filled block holds tokens too": (
                whole_blocks_only
            ),
            "attention without the 1/sqrt(D) scale": no_scale,
        }

        def judge(got, expected, variants=variants):
            compare(got, expected, "output", atol=1e-10, rtol=1e-9, variants=variants)

        yield Case(
            f"{name}: lengths {lengths}, blocks of {block_size}, a pool of {key_blocks.shape[0]} blocks",
            (q, key_blocks, value_blocks, tables, torch.tensor(lengths)),
            expected=expected,
            compare=judge,
            inputs=["q", "key_blocks", "value_blocks", "block_tables", "lengths"],
        )


# --- 4.8: GQA decode without repeating K and V -------------------------------------------------------


@checker("4.8", title="GQA decode without repeating K and V", points=2, task="grouped-query decode attention")
def check_gqa_decode(draw: Draw):
    """``fn(q, k_cache, v_cache) -> (B, H_q, D_v)``: one decoding query per sequence and query head,
    ``q (B, H_q, D)``, over ``k_cache (B, H_kv, S, D)`` and ``v_cache (B, H_kv, S, D_v)``; query head ``h``
    reads kv head ``h // (H_q // H_kv)``. Scale ``D ** -0.5``. No copy of K or V per query head."""
    for name, B, H_kv, group, S in [
        ("GQA, groups of 4", draw.int(1, 2), draw.int(2, 3), 4, draw.int(10, 40)),
        ("GQA, groups of 2", draw.int(1, 3), 4, 2, draw.int(5, 30)),
        ("MQA: one kv head for every query head", draw.int(1, 2), 1, draw.int(3, 8), draw.int(10, 40)),
        ("MHA: groups of one", draw.int(1, 2), draw.int(2, 4), 1, draw.int(5, 20)),
        ("one cached token", 1, 2, 3, 1),
    ]:
        D, D_v = draw.choice([8, 16]), draw.choice([6, 8])
        H_q = H_kv * group
        q = draw.randn(B, H_q, D)
        k = draw.randn(B, H_kv, S, D)
        v = draw.randn(B, H_kv, S, D_v)

        def attend(kv_head, q=q, k=k, v=v, scale=D**-0.5):
            keys, values = k[:, kv_head], v[:, kv_head]  # (B, H_q, S, D) by indexing, for the reference
            weights = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, keys) * scale, -1)
            return torch.einsum("bhs,bhsd->bhd", weights, values)

        heads = torch.arange(H_q)
        expected = attend(heads // group)
        variants = {
            "query head h reading kv head h % H_kv (the heads cycled, as x.repeat or a reshape of q to "
            "(B, group, H_kv, D) gives): head h belongs to group h // (H_q // H_kv)": (
                lambda attend=attend, heads=heads, H_kv=H_kv: attend(heads % H_kv)
            ),
            "attention without the 1/sqrt(D) scale": lambda attend=attend, heads=heads, g=group, D=D: attend(
                heads // g, scale=1.0
            ),
        }
        limit = max(k.numel(), v.numel(), B * H_q * max(S, D, D_v))

        def judge(got, expected, variants=variants):
            compare(got, expected, "output", atol=1e-10, rtol=1e-9, variants=variants)

        yield Case(
            f"{name}: B={B}, H_q={H_q}, H_kv={H_kv}, S={S}, D={D}, D_v={D_v}",
            (q, k, v),
            expected=expected,
            compare=judge,
            inputs=["q", "k_cache", "v_cache"],
            max_elements=limit,
            too_large="that is as large as the keys or values copied for every query head: GQA's point is "
            "that a group's query heads read their kv head where it is. Make the group's queries the rows "
            "of one product with that head, (B, H_kv, group, D) @ (B, H_kv, D, S), with no broadcast of K or "
            "V",
        )
