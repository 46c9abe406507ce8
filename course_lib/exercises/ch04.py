"""Checkers for notebook 04: KV bytes per token, repeat_kv, one paged-cache append, top-p filtering."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..decoding import top_p_filter
from ..kv_cache import MODEL_CONFIGS, PagedKVCache, gqa_attention, kv_cache_bytes
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_kv_bytes_per_token", "check_repeat_kv", "check_paged_append", "check_top_p_filter"]


def check_kv_bytes_per_token(fn: Callable[[dict], float]) -> None:
    """``fn(config)`` must return the fp16 KV-cache bytes one token adds, over all layers.

    ``config`` has the fields of ``MODEL_CONFIGS`` (MLA configs cache ``kv_lora_rank +
    qk_rope_head_dim`` numbers per layer); the sliding window is ignored (one token is below it).
    """

    def case(name):
        def check():
            config = MODEL_CONFIGS[name]
            expected = kv_cache_bytes(config, 1, 1, torch.float16)
            got = fn(dict(config))
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise ExerciseFailed(f"{name}: expected a number of bytes, got {type(got).__name__}")
            if abs(got - expected) > 0.5:
                raise ExerciseFailed(
                    f"{name} ({config['attention'].upper()}): got {got:,} bytes per token, expected "
                    f"{expected:,}"
                )

        return check

    names = ["Llama-2-7B", "Llama-2-70B", "Gemma-2B", "Gemma-7B", "DeepSeek-V2"]
    run_cases("check_kv_bytes_per_token", [(name, case(name)) for name in names])


def check_repeat_kv(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """``fn(x, group)``: ``(B, H_kv, S, D)`` -> ``(B, H_kv * group, S, D)``, head h = kv head h // group.

    The result, fed to ordinary multi-head attention, must equal ``gqa_attention``.
    """
    generator = torch.Generator().manual_seed(4)

    def case(B, H_kv, group, S, D):
        def check():
            x = torch.randn(B, H_kv, S, D, generator=generator, dtype=torch.float64)
            expected = torch.stack([x[:, h // group] for h in range(H_kv * group)], dim=1)
            got = fn(x, group)
            compare(got, expected, f"repeat_kv of (B={B}, H_kv={H_kv}, S={S}, D={D}) with group={group}")
            q = torch.randn(B, H_kv * group, 3, D, generator=generator, dtype=torch.float64)
            values = torch.randn(B, H_kv, S, D, generator=generator, dtype=torch.float64)
            scores = q @ fn(x, group).transpose(-2, -1) / D**0.5
            mine = torch.softmax(scores, dim=-1) @ fn(values, group)
            compare(mine, gqa_attention(q, x, values), f"attention with repeated K, V (group={group})")

        return check

    shapes = [(1, 2, 4, 5, 3), (2, 1, 8, 3, 4), (1, 4, 1, 6, 2), (1, 3, 2, 1, 8)]
    run_cases("check_repeat_kv", [(f"shape {s}", case(*s)) for s in shapes])


def check_paged_append(fn: Callable[[list, int, int, list], tuple[int, int]]) -> None:
    """``fn(block_table, length, block_size, free_blocks) -> (physical_block, offset)``.

    Where does the token at position ``length`` go? When the last block is full (or there is no
    block yet) take a block with ``free_blocks.pop()`` and append it to ``block_table`` (both lists
    are changed in place); then return the physical block and the slot inside it. The tables must
    match those of ``PagedKVCache`` after the same appends.
    """

    def case(block_size, num_tokens, num_blocks):
        def check():
            table: list[int] = []
            free = list(range(num_blocks - 1, -1, -1))  # the library's convention: block 0 first
            for length in range(num_tokens):
                got = fn(table, length, block_size, free)
                if not isinstance(got, tuple) or len(got) != 2:
                    raise ExerciseFailed(f"token {length}: expected a (block, offset) tuple, got {got!r}")
                if len(table) != length // block_size + 1:
                    raise ExerciseFailed(
                        f"block_size={block_size}, token {length}: the block table should hold "
                        f"{length // block_size + 1} block(s), holds {len(table)}: {table}"
                    )
                expected = (table[-1], length % block_size)
                if tuple(got) != expected:
                    raise ExerciseFailed(
                        f"block_size={block_size}, token {length}: got (block, offset) = {tuple(got)}, "
                        f"expected {expected}"
                    )
            cache = PagedKVCache(num_blocks, block_size, 1, 1)
            cache.add_sequence("s")
            cache.append("s", torch.zeros(1, num_tokens, 1), torch.zeros(1, num_tokens, 1))
            if table != cache.block_table("s"):
                raise ExerciseFailed(
                    f"block_size={block_size}, {num_tokens} tokens: table {table}, "
                    f"PagedKVCache has {cache.block_table('s')}"
                )
            if len(free) != cache.num_free_blocks:
                raise ExerciseFailed(
                    f"block_size={block_size}: {len(free)} blocks left free, expected {cache.num_free_blocks}"
                )

        return check

    cases = [(4, 1, 4), (4, 9, 4), (1, 5, 6), (16, 40, 5), (3, 12, 4)]
    run_cases("check_paged_append", [(f"block_size={b}, {n} tokens", case(b, n, m)) for b, n, m in cases])


def check_top_p_filter(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> None:
    """``fn(logits, p)`` keeps the smallest set of most likely tokens whose probability reaches ``p``
    (the most likely token always); removed logits become ``-inf``. Compared with ``top_p_filter``."""
    generator = torch.Generator().manual_seed(5)
    hand = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # cumulative 0.5, 0.8, 0.95, 1.0

    def case(logits, p, description):
        def check():
            expected = top_p_filter(logits, p)
            got = fn(logits.clone(), p)
            compare(
                torch.isfinite(got) if isinstance(got, torch.Tensor) else got,
                torch.isfinite(expected),
                f"{description}: which tokens are kept",
            )
            kept = torch.isfinite(expected)
            compare(got[kept], expected[kept], f"{description}: kept logits must be unchanged")

        return check

    cases = [
        (hand, 0.55, "p=0.55 on probabilities [0.5, 0.3, 0.15, 0.05]"),
        (hand, 0.75, "p=0.75 on [0.5, 0.3, 0.15, 0.05]"),
        (hand, 0.81, "p=0.81 on [0.5, 0.3, 0.15, 0.05]"),
        (hand, 0.1, "p=0.1 (only the most likely token)"),
        (hand, 1.0, "p=1.0 (every token)"),
        (hand.flip(0), 0.9, "p=0.9, tokens in increasing order"),
        (torch.randn(3, 10, generator=generator), 0.7, "a batch of 3 rows, p=0.7"),
    ]
    run_cases("check_top_p_filter", [(d, case(logits, p, d)) for logits, p, d in cases])
