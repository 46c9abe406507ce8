"""Chapter 09's benchmark: the Triton kernels against PyTorch's SDPA and the course's PyTorch loops.

``kernels`` (CUDA only: under Triton's interpreter on a CPU, kernel timings mean nothing), at
length T, float16 for attention and float32 for GLA:

- FlashAttention-2 forward, causal, B=4, H=16, D=64: ``kernels.flash_attention`` vs SDPA vs
  ``tiling.flash_attention`` (the PyTorch FA2 loop, 256-row tiles);
- the same forward and backward together (kernels vs SDPA);
- one decode step over a paged cache of T tokens per sequence, B=8, 32 query / 8 K/V heads, D=128,
  pages of 16: ``kernels.paged_decode`` vs SDPA on the same keys stored contiguously vs
  ``PagedKVCache.attention`` (the PyTorch page-by-page loop);
- chunked GLA forward, B=4, H=16, D_k=D_v=64: ``kernels.gla_chunk`` vs ``recurrent.gla(form="chunk")``.

Besides time, the table gives matmul TFLOP/s (attention and GLA) or GB/s read from the cache
(decode), and that as a fraction of the GPU's datasheet peak (``course_lib.hardware.ACCELERATORS``,
matched by the device's name; 16-bit tensor-core FLOP/s for attention, float32 for GLA).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ..hardware import ACCELERATORS, Accelerator, attention_flops
from ..kv_cache import PagedKVCache
from ..measure import Measurement, SuiteUnavailable, random_qkv
from ..recurrent import gla
from ..tiling import flash_attention as pytorch_flash_attention

__all__ = ["SUITES", "kernels_suite", "kernels_methods", "match_accelerator", "kernels_table", "FAMILIES"]

BATCH, HEADS, HEAD_DIM = 4, 16, 64
DECODE_BATCH, DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM, PAGE = 8, 32, 8, 128, 16
LOOP_BLOCK = 256  # the PyTorch loop's tiles: large, as in chapter 03's benchmark
# family: (reference method, the methods in it)
FAMILIES = {
    "fa2 forward": ("sdpa", ("triton", "sdpa", "pytorch loop")),
    "fa2 forward+backward": ("sdpa", ("triton", "sdpa")),
    "paged decode": ("sdpa", ("triton", "sdpa", "pytorch paged")),
    "chunked gla": ("pytorch chunk", ("triton", "pytorch chunk")),
}


def match_accelerator(device_name: str) -> Accelerator | None:
    """The table's entry for a CUDA device name such as ``"NVIDIA H100 80GB HBM3"``, or None."""
    for key, accelerator in ACCELERATORS.items():
        model = key.split("-")[1] if key.startswith("RTX") else key.split("-")[0]  # "H100", "4090"
        if model.lower() in device_name.lower():
            return accelerator
    return None


def _with_extra(call, **extra):
    call.extra = extra
    return call


def _paged_inputs(T: int, device, seed: int = 0):
    """A paged cache of DECODE_BATCH sequences of T tokens (pages shuffled), and one query each."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_sequence = math.ceil(T / PAGE)
    cache = PagedKVCache(
        DECODE_BATCH * pages_per_sequence,
        PAGE,
        DECODE_KV_HEADS,
        DECODE_DIM,
        dtype=torch.float16,
        device=device,
    )
    order = torch.randperm(DECODE_BATCH * pages_per_sequence, generator=generator).tolist()
    cache.free_blocks = order  # hand pages out in a random order, as a busy server would
    for seq in range(DECODE_BATCH):
        cache.add_sequence(seq)
        keys, values = (
            torch.randn(DECODE_KV_HEADS, T, DECODE_DIM, generator=generator).to(device, torch.float16)
            for _ in range(2)
        )
        cache.append(seq, keys, values)
    q = torch.randn(DECODE_BATCH, DECODE_HEADS, 1, DECODE_DIM, generator=generator).to(device, torch.float16)
    return cache, q


def kernels_suite(device: torch.device | str = "cuda"):
    """The Triton kernels vs SDPA and the PyTorch loops; raises :class:`SuiteUnavailable` without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SuiteUnavailable(
            "the kernels suite needs a CUDA GPU: on a CPU the Triton kernels run in Triton's interpreter, "
            "one program after another in NumPy, and their timings mean nothing. Run "
            "`python -m course_lib.bench kernels` on a machine with an NVIDIA GPU "
            "(or `python -m course_lib.kernels.gpu_check` for the GPU tests and this benchmark together)."
        )
    if importlib.util.find_spec("triton") is None:
        raise SuiteUnavailable(
            "the kernels suite needs Triton: pip install -c constraints.txt -e '.[kernels]'"
        )
    return kernels_methods(device), "fa2 forward / sdpa", [1024, 2048, 4096, 8192]


def kernels_methods(device: torch.device | str) -> dict:
    """The suite's methods on any device the kernels run on (on the CPU under the interpreter, a
    smoke test of this file, never a measurement); ``methods[name](T)`` returns the callable."""
    device = torch.device(device)
    from .. import kernels  # imported here: listing the suites must not need Triton
    from ..kernels.decode import default_num_splits

    def fa2_inputs(T):
        return random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=torch.float16)

    def forward_flops(T):
        return attention_flops(T, T, HEAD_DIM, batch_size=BATCH, num_heads=HEADS, causal=True)

    def forward(name, fn):
        def build(T):
            q, k, v = fa2_inputs(T)
            return _with_extra(lambda: fn(q, k, v), family="fa2 forward", method=name, flops=forward_flops(T))

        return build

    def forward_backward(name, fn):
        def build(T):
            q, k, v = (x.requires_grad_() for x in fa2_inputs(T))
            grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)

            def run():
                return torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

            # The backward does 2.5 times the forward's matmul FLOPs (five products instead of two).
            return _with_extra(run, family="fa2 forward+backward", method=name, flops=3.5 * forward_flops(T))

        return build

    def decode(name):
        def build(T):
            cache, q = _paged_inputs(T, device)
            tables, lengths = kernels.paged_tables(cache, range(DECODE_BATCH))
            # Chosen here, so the timed call does not read the lengths back from the GPU.
            splits = default_num_splits(DECODE_BATCH * DECODE_HEADS, T, 32, device)
            read = 2 * DECODE_BATCH * DECODE_KV_HEADS * T * DECODE_DIM * 2  # K and V, float16
            if name == "triton":
                run = lambda: kernels.paged_decode(  # noqa: E731
                    q, cache.key_blocks, cache.value_blocks, tables, lengths, num_splits=splits
                )
            elif name == "sdpa":
                group = DECODE_HEADS // DECODE_KV_HEADS
                keys, values = (
                    torch.stack([x.repeat_interleave(group, dim=0) for x in pair])
                    for pair in zip(*(cache.gather(seq) for seq in range(DECODE_BATCH)))
                )
                run = lambda: F.scaled_dot_product_attention(q, keys, values)  # noqa: E731
            else:
                run = lambda: [cache.attention(seq, q[seq]) for seq in range(DECODE_BATCH)]  # noqa: E731
            flops = 4 * DECODE_BATCH * DECODE_HEADS * T * DECODE_DIM
            return _with_extra(run, family="paged decode", method=name, bytes=read, flops=flops)

        return build

    def chunked_gla(name):
        def build(T):
            generator = torch.Generator().manual_seed(1)
            shape = (BATCH, HEADS, T, HEAD_DIM)
            q, k, v = (torch.randn(shape, generator=generator).to(device) for _ in range(3))
            g = F.logsigmoid(torch.randn(shape, generator=generator) + 3).to(device)
            if name == "triton":
                run = lambda: kernels.gla_chunk(q, k, v, g, chunk_size=16)  # noqa: E731
            else:
                run = lambda: gla(q, k, v, g, form="chunk", chunk_size=64)  # noqa: E731
            # Matmul FLOPs of the chunk form with chunks of C: scores and P V inside each chunk (2 C D
            # each per token), reading and writing the D x D state (4 D^2 per token).
            C = 16
            flops = BATCH * HEADS * T * (2 * C * HEAD_DIM + 2 * C * HEAD_DIM + 4 * HEAD_DIM * HEAD_DIM)
            return _with_extra(run, family="chunked gla", method=name, flops=flops, fp32=True)

        return build

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # T == S: both conventions agree

    return {
        "fa2 forward / triton": forward(
            "triton", lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)
        ),
        "fa2 forward / sdpa": forward("sdpa", sdpa),
        "fa2 forward / pytorch loop": forward(
            "pytorch loop",
            lambda q, k, v: pytorch_flash_attention(
                q, k, v, causal=True, block_q=LOOP_BLOCK, block_k=LOOP_BLOCK
            ),
        ),
        "fa2 forward+backward / triton": forward_backward(
            "triton", lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)
        ),
        "fa2 forward+backward / sdpa": forward_backward("sdpa", sdpa),
        "paged decode / triton": decode("triton"),
        "paged decode / sdpa": decode("sdpa"),
        "paged decode / pytorch paged": decode("pytorch paged"),
        "chunked gla / triton": chunked_gla("triton"),
        "chunked gla / pytorch chunk": chunked_gla("pytorch chunk"),
    }


def kernels_table(results: list[Measurement], device_name: str | None = None) -> str:
    """One block per family: time, throughput, fraction of the GPU's peak and ratio to the reference."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown device"
    accelerator = match_accelerator(device_name)
    lines = [
        f"device: {device_name}; peaks from "
        + (
            f"the {accelerator.name} datasheet"
            if accelerator
            else "no datasheet in course_lib.hardware (n/a)"
        )
    ]
    by_key = {(r.extra.get("family"), r.extra.get("method"), r.T): r for r in results}
    lengths = sorted({r.T for r in results})
    for family, (reference, members) in FAMILIES.items():
        rows = [["T", "method", "ms", "throughput", "% of peak", f"/ {reference}"]]
        for T in lengths:
            ref = by_key.get((family, reference, T))
            for method in members:
                r = by_key.get((family, method, T))
                if r is None:
                    continue
                if family == "paged decode":
                    rate, unit = r.extra["bytes"] / r.seconds, "GB/s"
                    peak = accelerator.memory_bandwidth if accelerator else None
                else:
                    rate, unit = r.extra["flops"] / r.seconds, "TFLOP/s"
                    peak = None
                    if accelerator:
                        peak = (
                            accelerator.peak_flops_fp32
                            if r.extra.get("fp32")
                            else accelerator.peak_flops_16bit
                        )
                shown = rate / (1e9 if unit == "GB/s" else 1e12)
                rows.append(
                    [
                        str(T),
                        method,
                        f"{r.seconds * 1e3:.3f}",
                        f"{shown:.1f} {unit}",
                        f"{100 * rate / peak:.1f}%" if peak else "n/a",
                        f"{r.seconds / ref.seconds:.2f}x" if ref else "-",
                    ]
                )
        if len(rows) == 1:
            continue
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["", family]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


kernels_suite.table = kernels_table
kernels_suite.shape = {
    "B": BATCH,
    "H": HEADS,
    "D": HEAD_DIM,
    "decode": f"B={DECODE_BATCH} H={DECODE_HEADS} H_kv={DECODE_KV_HEADS} D={DECODE_DIM}",
}
SUITES = {"kernels": kernels_suite}
