"""Checkers for notebook 04: KV bytes per token, repeat_kv, one paged-cache append, top-p filtering."""

from __future__ import annotations

import torch

from ..kv_cache import MODEL_CONFIGS
from .common import Case, Draw, Mismatch, checker, compare, compare_exact, compare_number

__all__ = ["check_kv_bytes_per_token", "check_repeat_kv", "check_paged_append", "check_top_p_filter"]


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
