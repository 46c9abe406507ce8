"""Chapter 02: the memory hierarchy, arithmetic intensity and the roofline.

The module follows the notebook: a table of real accelerators (how much memory, how fast it
is, how much on-chip SRAM, how many FLOP/s), the arithmetic intensity of the operations of a
transformer (GEMM, GEMV, attention in prefill and in decode), the roofline that turns an
intensity into attainable FLOP/s, and two measurements that put this machine on its own roofline.

Units: bytes, bytes per second and FLOP per second (no K/M/G prefixes inside the code);
decimal units as vendors use them (1 GB = 1e9 bytes, 1 TB/s = 1e12 bytes/s), except SRAM,
which vendors give in binary KiB.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.benchmark as benchmark

from .checks import check_bool, check_float, check_int, check_tensor

__all__ = [
    "Accelerator",
    "ACCELERATORS",
    "gemm_intensity",
    "gemv_intensity",
    "attention_flops",
    "attention_bytes",
    "attention_intensity",
    "prefill_intensity",
    "decode_intensity",
    "roofline",
    "ridge_point",
    "time_bound",
    "measure_matmul_flops",
    "measure_memory_bandwidth",
]

KIB = 1024


# --- the accelerators -----------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    """Datasheet figures of one accelerator.

    ``peak_flops_16bit`` is the dense (no 2:4 sparsity) fp16/bf16 tensor-core rate with fp32
    accumulation, the one attention kernels use; vendors often headline the "with sparsity"
    figure, which is twice as large. ``peak_flops_fp32`` is plain fp32 (no TF32 tensor cores).
    ``sram_per_sm_bytes`` is the combined L1 / shared-memory array of one SM, the on-chip
    memory a FlashAttention tile lives in (the configurable shared part is a bit smaller).
    """

    name: str
    memory_bytes: float
    memory_bandwidth: float
    sram_per_sm_bytes: int
    sm_count: int
    peak_flops_16bit: float
    peak_flops_fp32: float
    memory_kind: str

    @property
    def sram_bytes(self) -> int:
        """On-chip SRAM of the whole chip: ``sm_count * sram_per_sm_bytes``."""
        return self.sm_count * self.sram_per_sm_bytes

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte where the memory roof meets the 16-bit compute roof."""
        return self.peak_flops_16bit / self.memory_bandwidth


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 80 GB HBM2e at 2,039 GB/s; BF16/FP16
    # tensor 312 TFLOPS dense (624 "with sparsity"); FP32 19.5 TFLOPS. NVIDIA Ampere (GA100)
    # architecture whitepaper: 108 SMs, 192 KB combined L1/shared memory per SM (the
    # FlashAttention paper, Dao et al. 2022, quotes the same "192KB ... per each of 108 SMs").
    "A100-80GB-SXM": Accelerator(
        name="A100-80GB-SXM",
        memory_bytes=80e9,
        memory_bandwidth=2039e9,
        sram_per_sm_bytes=192 * KIB,
        sm_count=108,
        peak_flops_16bit=312e12,
        peak_flops_fp32=19.5e12,
        memory_kind="HBM2e",
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3 at 3.35 TB/s; BF16/FP16 tensor
    # 1,979 TFLOPS "with sparsity", i.e. 989.4 dense; FP32 67 TFLOPS (66.9). NVIDIA Hopper
    # (GH100) architecture whitepaper: 132 SMs, 256 KB combined L1/shared per SM.
    "H100-SXM": Accelerator(
        name="H100-SXM",
        memory_bytes=80e9,
        memory_bandwidth=3.35e12,
        sram_per_sm_bytes=256 * KIB,
        sm_count=132,
        peak_flops_16bit=989.4e12,
        peak_flops_fp32=66.9e12,
        memory_kind="HBM3",
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s; the same GH100
    # chip and compute figures as H100 SXM (BF16 1,979 TFLOPS with sparsity = 989.4 dense).
    "H200-SXM": Accelerator(
        name="H200-SXM",
        memory_bytes=141e9,
        memory_bandwidth=4.8e12,
        sram_per_sm_bytes=256 * KIB,
        sm_count=132,
        peak_flops_16bit=989.4e12,
        peak_flops_fp32=66.9e12,
        memory_kind="HBM3e",
    ),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: 24 GB GDDR6X at 1,008 GB/s;
    # 128 SMs with 128 KB L1/shared each; FP32 82.6 TFLOPS; FP16 tensor with FP32 accumulate
    # 165.2 TFLOPS dense (330.4 with sparsity; 330.3 dense with FP16 accumulate).
    "RTX-4090": Accelerator(
        name="RTX-4090",
        memory_bytes=24e9,
        memory_bandwidth=1008e9,
        sram_per_sm_bytes=128 * KIB,
        sm_count=128,
        peak_flops_16bit=165.2e12,
        peak_flops_fp32=82.6e12,
        memory_kind="GDDR6X",
    ),
    # A laptop part, GeForce RTX 4060 Laptop GPU at its top power limit (115 W, 2370 MHz boost;
    # NVIDIA's product page gives a 1470-2370 MHz range by laptop): 24 Ada SMs (3072 CUDA cores,
    # 128 KB L1/shared each), 8 GB GDDR6 on 128 bits at 16 Gbps = 256 GB/s.
    # Derived, not printed by NVIDIA: FP32 = 3072 cores * 2 * 2.37 GHz = 14.6 TFLOPS; FP16 tensor
    # (FP32 accumulate, dense) = 512 FLOP/clock/SM (the RTX 4090's 165.2 TFLOPS / 128 SMs /
    # 2.52 GHz) * 24 SMs * 2.37 GHz = 29.1 TFLOPS. A laptop with a lower power limit is slower.
    "RTX-4060-Laptop": Accelerator(
        name="RTX-4060-Laptop",
        memory_bytes=8e9,
        memory_bandwidth=256e9,
        sram_per_sm_bytes=128 * KIB,
        sm_count=24,
        peak_flops_16bit=29.1e12,
        peak_flops_fp32=14.6e12,
        memory_kind="GDDR6",
    ),
}


# --- arithmetic intensity -------------------------------------------------------------------


def _check_bytes_per_element(bytes_per_element: object) -> float:
    return check_float(bytes_per_element, "bytes_per_element", min=0, min_open=True)


def gemm_intensity(M: int, N: int, K: int, *, bytes_per_element: float = 2) -> float:
    """FLOPs per byte of ``C (M, N) = A (M, K) @ B (K, N)`` read and written once.

    FLOPs ``2 M N K`` (a multiply and an add per term); bytes ``(M K + K N + M N) * bytes``.
    A square ``n x n`` GEMM reaches ``2 n / (3 bytes)``: it grows with the size, so big GEMMs are
    compute-bound.
    """
    M = check_int(M, "M", min=1)
    N = check_int(N, "N", min=1)
    K = check_int(K, "K", min=1)
    size = _check_bytes_per_element(bytes_per_element)
    return 2 * M * N * K / ((M * K + K * N + M * N) * size)


def gemv_intensity(M: int, K: int, *, bytes_per_element: float = 2) -> float:
    """FLOPs per byte of ``y (M) = A (M, K) @ x (K)``: a GEMM with ``N = 1``.

    Every weight is read once and used once, so the intensity stays below
    ``2 / bytes_per_element`` whatever the size: memory-bound (this is decoding with batch 1).
    """
    M = check_int(M, "M", min=1)
    K = check_int(K, "K", min=1)
    return gemm_intensity(M, 1, K, bytes_per_element=bytes_per_element)


def _allowed_pairs(T: int, S: int, causal: bool) -> int:
    """Number of (query, key) pairs attention computes: ``T S``, or the causal count.

    Causal aligns the diagonal to the end: query ``i`` sees keys ``0 .. S - T + i``.
    """
    if not causal:
        return T * S
    return sum(min(S, max(0, S - T + i + 1)) for i in range(T))


def attention_flops(
    T: int, S: int, D: int, *, batch_size: int = 1, num_heads: int = 1, causal: bool = False
) -> int:
    """Matmul FLOPs of attention: ``q k^T`` and ``P v``, ``2 D`` each per computed pair.

    The softmax's few FLOPs per score are left out, as in the FlashAttention papers.
    """
    T = check_int(T, "T", min=1)
    S = check_int(S, "S", min=1)
    D = check_int(D, "D", min=1)
    batch_size = check_int(batch_size, "batch_size", min=1)
    num_heads = check_int(num_heads, "num_heads", min=1)
    check_bool(causal, "causal")
    return 4 * D * batch_size * num_heads * _allowed_pairs(T, S, causal)


def attention_bytes(
    T: int,
    S: int,
    D: int,
    *,
    batch_size: int = 1,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    bytes_per_element: float = 2,
) -> float:
    """Fewest HBM bytes attention can move: read q, k, v and write o once (a fused kernel).

    ``num_kv_heads`` below ``num_heads`` is grouped-query attention: fewer keys and values to read.
    """
    T = check_int(T, "T", min=1)
    S = check_int(S, "S", min=1)
    D = check_int(D, "D", min=1)
    batch_size = check_int(batch_size, "batch_size", min=1)
    num_heads = check_int(num_heads, "num_heads", min=1)
    num_kv_heads = num_heads if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads", min=1)
    size = _check_bytes_per_element(bytes_per_element)
    query_side = 2 * batch_size * num_heads * T * D
    key_value_side = 2 * batch_size * num_kv_heads * S * D
    return (query_side + key_value_side) * size


def attention_intensity(
    T: int,
    S: int,
    D: int,
    *,
    batch_size: int = 1,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    causal: bool = False,
    bytes_per_element: float = 2,
) -> float:
    """FLOPs per byte of a fused attention kernel: :func:`attention_flops` / :func:`attention_bytes`."""
    flops = attention_flops(T, S, D, batch_size=batch_size, num_heads=num_heads, causal=causal)
    moved = attention_bytes(
        T,
        S,
        D,
        batch_size=batch_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        bytes_per_element=bytes_per_element,
    )
    return flops / moved


def prefill_intensity(
    T: int,
    D: int,
    *,
    batch_size: int = 1,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    causal: bool = True,
    bytes_per_element: float = 2,
) -> float:
    """Attention over a whole prompt of ``T`` tokens (``S = T``).

    With 16-bit values that is about ``T / 2`` FLOPs per byte (``T / 4`` causal, half the pairs):
    it grows with the prompt, so long prompts are compute-bound.
    """
    return attention_intensity(
        T,
        T,
        D,
        batch_size=batch_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        causal=causal,
        bytes_per_element=bytes_per_element,
    )


def decode_intensity(
    S: int,
    D: int,
    *,
    batch_size: int = 1,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    bytes_per_element: float = 2,
) -> float:
    """One new token (``T = 1``) attending to a KV cache of ``S`` tokens.

    Each cached key and value is read to be used once, so the intensity is about
    ``2 / bytes_per_element * num_heads / num_kv_heads`` FLOPs per byte whatever ``S`` and the
    batch: memory-bound. Grouped-query attention raises it by the group size.
    """
    return attention_intensity(
        1,
        S,
        D,
        batch_size=batch_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        causal=False,
        bytes_per_element=bytes_per_element,
    )


# --- the roofline ---------------------------------------------------------------------------


def roofline(intensity, peak_flops: float, bandwidth: float):
    """Attainable FLOP/s at an arithmetic intensity: ``min(peak_flops, intensity * bandwidth)``.

    ``intensity`` may be a number, a NumPy array or a tensor (for plotting a whole curve); the
    result has the same kind. Left of the ridge point memory bandwidth binds, right of it compute.
    """
    peak_flops = check_float(peak_flops, "peak_flops", min=0, min_open=True)
    bandwidth = check_float(bandwidth, "bandwidth", min=0, min_open=True)
    if isinstance(intensity, torch.Tensor):
        check_tensor(intensity, "intensity", floating=True)
        if bool((intensity < 0).any()):
            raise ValueError("intensity must be >= 0 everywhere")
        return torch.clamp(intensity * bandwidth, max=peak_flops)
    if isinstance(intensity, (np.ndarray, list, tuple)):
        values = np.asarray(intensity, dtype=float)
        if (values < 0).any() or np.isnan(values).any():
            raise ValueError("intensity must be >= 0 everywhere")
        return np.minimum(values * bandwidth, peak_flops)
    if isinstance(intensity, bool) or not isinstance(intensity, numbers.Real):
        raise TypeError(f"intensity must be a number, array or tensor, got {type(intensity).__name__}")
    intensity = check_float(intensity, "intensity", min=0)
    return min(peak_flops, intensity * bandwidth)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """The intensity (FLOPs per byte) where the two roofs meet: ``peak_flops / bandwidth``."""
    peak_flops = check_float(peak_flops, "peak_flops", min=0, min_open=True)
    bandwidth = check_float(bandwidth, "bandwidth", min=0, min_open=True)
    return peak_flops / bandwidth


def time_bound(flops: float, bytes_moved: float, peak_flops: float, bandwidth: float) -> tuple[float, str]:
    """Lower bound on the run time of a kernel, and which roof sets it.

    Returns ``(seconds, "compute" | "memory")`` with seconds
    ``max(flops / peak_flops, bytes_moved / bandwidth)``.
    """
    flops = check_float(flops, "flops", min=0)
    bytes_moved = check_float(bytes_moved, "bytes_moved", min=0)
    peak_flops = check_float(peak_flops, "peak_flops", min=0, min_open=True)
    bandwidth = check_float(bandwidth, "bandwidth", min=0, min_open=True)
    compute_time = flops / peak_flops
    memory_time = bytes_moved / bandwidth
    if compute_time >= memory_time:
        return compute_time, "compute"
    return memory_time, "memory"


# --- measuring this machine -----------------------------------------------------------------


def _timer_median(statement: str, globals_: dict, min_run_time: float) -> float:
    """Median seconds per run of ``statement`` with torch.utils.benchmark (it syncs CUDA itself)."""
    timer = benchmark.Timer(stmt=statement, globals=globals_, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_matmul_flops(
    size: int = 512,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    min_run_time: float = 0.5,
) -> float:
    """Measured FLOP/s of a square ``size x size`` matmul on this machine (``2 size^3`` FLOPs).

    Large sizes approach the compute roof; the default keeps the measurement to about a second.
    """
    size = check_int(size, "size", min=1)
    min_run_time = check_float(min_run_time, "min_run_time", min=0, min_open=True)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = _timer_median("torch.matmul(a, b)", {"torch": torch, "a": a, "b": b}, min_run_time)
    return 2 * size**3 / seconds


def measure_memory_bandwidth(
    num_elements: int = 2**23,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    min_run_time: float = 0.5,
) -> float:
    """Measured bytes/s of a large copy on this machine (each element read once, written once).

    The default copies 32 MiB of float32 into another 32 MiB, more than most CPU caches hold,
    so the measurement reflects main memory rather than cache.
    """
    num_elements = check_int(num_elements, "num_elements", min=1)
    min_run_time = check_float(min_run_time, "min_run_time", min=0, min_open=True)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype, got {type(dtype).__name__}")
    source = torch.ones(num_elements, dtype=dtype, device=device)
    target = torch.empty_like(source)
    seconds = _timer_median("target.copy_(source)", {"source": source, "target": target}, min_run_time)
    element_size = source.element_size()
    return 2 * num_elements * element_size / seconds
