"""What every kernel of chapter 09 shares: which inputs Triton can take, and one launch helper.

Triton compiles a kernel for fixed block shapes: ``tl.arange`` needs a power of two, and on NVIDIA
GPUs ``tl.dot`` needs an inner dimension of at least 16. The rules below are the same on a GPU and
under the interpreter, so a call that works on a laptop works unchanged on a GPU:

- block sizes are 16, 32, 64 or 128;
- head dims are 1 .. 128; a head dim that is not a power of two (or is below 16) is padded inside
  the kernel to the next one, by masking the loads (padded lanes read 0 and are never stored);
- inputs are float16, bfloat16 or float32 (``tl.dot`` has no float64 on tensor cores, nor in the
  interpreter); a float32 ``tl.dot`` uses exact float32 (``"ieee"``) unless ``"tf32"`` is asked for;
- every tensor is on one device: a CUDA GPU, or the CPU when the interpreter is on.

Anything else is refused with a ``ValueError``/``TypeError`` naming the argument, before Triton
would have raised a compiler error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton

from ..checks import check_choice, check_int

__all__ = [
    "INTERPRET",
    "BLOCK_SIZES",
    "MAX_HEAD_DIM",
    "PRECISIONS",
    "kernel_device",
    "check_kernel_dtype",
    "check_head_dim",
    "check_indexable",
    "check_block",
    "dot_precision",
    "padded_dim",
    "launch",
]

# Read once, as @triton.jit did when the kernel modules were imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("ieee", "tf32")


def kernel_device(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> torch.device:
    """The one device of ``tensors``; refuse mixed devices, and CPU tensors without the interpreter."""
    device = tensors[0].device
    for tensor, name in zip(tensors, names):
        if tensor.device != device:
            raise ValueError(
                f"{name} must be on the same device as {names[0]} ({device}), got {tensor.device}"
            )
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{names[0]} is on the CPU but Triton's interpreter is off: move the tensors to a CUDA GPU, "
            "or set TRITON_INTERPRET=1 before importing course_lib.kernels (it is set for you when "
            "CUDA is absent)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{names[0]} is on {device}: the kernels run on CUDA GPUs, "
            "or on the CPU under Triton's interpreter"
        )
    return device


def check_kernel_dtype(x: torch.Tensor, name: str) -> torch.dtype:
    """float16, bfloat16 or float32: the dtypes ``tl.dot`` takes on a GPU and in the interpreter."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32 for the Triton kernels, got {x.dtype} "
            "(tl.dot has no float64; compare with course_lib's float64 references instead)"
        )
    return x.dtype


def check_head_dim(value: int, name: str) -> int:
    """A head dim the kernels take: 1 .. :data:`MAX_HEAD_DIM` (padded inside to a power of two)."""
    if not 1 <= value <= MAX_HEAD_DIM:
        raise ValueError(
            f"{name}={value} is not supported: the kernels take head dims from 1 to {MAX_HEAD_DIM} "
            "(padded inside to a power of two >= 16); larger tiles would not fit in shared memory"
        )
    return value


def check_indexable(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """The kernels compute offsets in 32-bit integers: each tensor must hold fewer than 2**31 elements."""
    for tensor, name in zip(tensors, names):
        if tensor.numel() >= 2**31:
            raise ValueError(
                f"{name} has {tensor.numel()} elements: the kernels index with 32-bit offsets, "
                "so each tensor must hold fewer than 2**31 (split the batch)"
            )


def check_block(value: object, name: str) -> int:
    """A block size: one of :data:`BLOCK_SIZES` (a power of two, and >= 16 for ``tl.dot``)."""
    value = check_int(value, name)
    if value not in BLOCK_SIZES:
        raise ValueError(
            f"{name}={value} must be one of {', '.join(map(str, BLOCK_SIZES))} "
            "(tl.arange needs a power of two and tl.dot an inner size >= 16)"
        )
    return value


def check_precision(value: object) -> str:
    """How a float32 ``tl.dot`` multiplies: ``"ieee"`` (exact) or ``"tf32"`` (faster, 10-bit mantissa)."""
    check_choice(value, "input_precision", PRECISIONS)
    return str(value)


def dot_precision(dtype: torch.dtype, input_precision: str) -> str:
    """The ``input_precision`` handed to ``tl.dot``: as asked for float32 operands; for 16-bit ones
    Triton's default ``"tf32"``, which it ignores (the tensor cores take them as they are)."""
    return input_precision if dtype == torch.float32 else "tf32"


def padded_dim(size: int) -> int:
    """The block width that holds ``size`` lanes: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(size))


def compute_dtype_for_dot(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels receive: the input's, except bfloat16 under the interpreter.

    Triton 3.7's interpreter multiplies bfloat16 ``tl.dot`` operands as raw integers (wrong
    numbers); loads and stores of bfloat16 work. Under the interpreter, bfloat16 inputs are
    therefore computed in float32 and the results cast back. On a GPU bfloat16 runs as is.
    """
    if INTERPRET and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def launch(kernel: Callable, grid: tuple[int, ...], *args, blocks: str, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, turning "out of shared memory" into a ValueError.

    ``blocks`` names the block sizes in play (e.g. ``"block_m=128, block_n=128"``) for the message.
    """
    try:
        kernel[grid](*args, **kwargs)
    except triton.runtime.errors.OutOfResources as error:
        raise ValueError(
            f"{blocks}: the tiles need {error.required} of {error.name} but this GPU has {error.limit}; "
            "pass smaller block sizes"
        ) from None
