"""Compile every kernel of chapter 09 for an NVIDIA GPU, on a machine that has none.

Triton compiles in-process (Python AST -> Triton IR -> LLVM -> PTX -> cubin with the ``ptxas`` that
ships in its wheel); only *running* a kernel needs a GPU. Compiling catches what the interpreter
cannot: a ``tl.dot`` below the hardware's minimum size, a loop variable that changes type, a tile
that needs more shared memory than an SM has. It also reports the shared memory each kernel uses::

    TRITON_INTERPRET=0 python -m course_lib.kernels.compile_check            # every kernel, sm_80
    TRITON_INTERPRET=0 python -m course_lib.kernels.compile_check --arch 90 --head-dim 128 --dtype fp32

It must run with the interpreter off (``TRITON_INTERPRET=0``): interpreted kernels are not compiled.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .common import INTERPRET, padded_dim
from .decode import combine_splits_kernel, page_offsets, paged_decode_kernel
from .flash_backward import fa2_backward_dkdv_kernel, fa2_backward_dq_kernel
from .flash_forward import attend_block, causal_key_end, default_blocks, fa2_forward_kernel
from .gla import gla_chunk_kernel

__all__ = ["KERNELS", "compile_kernel", "main"]

KERNELS = (
    "fa2_forward",
    "fa2_backward_dkdv",
    "fa2_backward_dq",
    "paged_decode",
    "combine_splits",
    "gla_chunk",
)
_TORCH_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _flash_signature(pointers: Sequence[str], dtype: str) -> dict:
    scalars = {"T": "i32", "S": "i32", "D": "i32", "DV": "i32", "scale": "fp32"}
    return {name: kind.replace("DT", dtype) for name, kind in pointers} | scalars


def _plan(name: str, dtype: str, head_dim: int, block_m: int, block_n: int):
    """(kernel, signature, constexprs, options) for one kernel at one configuration."""
    width = padded_dim(head_dim)
    precision = "ieee" if dtype == "fp32" else "tf32"
    flash = {"CAUSAL": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": width, "BLOCK_DV": width}
    flash["PRECISION"] = precision
    if name == "fa2_forward":
        pointers = [("Q", "*DT"), ("K", "*DT"), ("V", "*DT"), ("O", "*DT"), ("LSE", "*fp32")]
        constants = flash | {"ATTEND": attend_block, "KEY_END": causal_key_end}
        return (
            fa2_forward_kernel,
            _flash_signature(pointers, dtype),
            constants,
            {"num_warps": 4, "num_stages": 2},
        )
    if name in ("fa2_backward_dkdv", "fa2_backward_dq"):
        pointers = [
            ("Q", "*DT"),
            ("K", "*DT"),
            ("V", "*DT"),
            ("DO", "*DT"),
            ("LSE", "*fp32"),
            ("DELTA", "*fp32"),
        ]
        outputs = [("DK", "*DT"), ("DV_OUT", "*DT")] if name == "fa2_backward_dkdv" else [("DQ", "*DT")]
        kernel = fa2_backward_dkdv_kernel if name == "fa2_backward_dkdv" else fa2_backward_dq_kernel
        return kernel, _flash_signature(pointers + outputs, dtype), flash, {"num_warps": 4, "num_stages": 1}
    if name == "paged_decode":
        signature = {"Q": f"*{dtype}", "K_POOL": f"*{dtype}", "V_POOL": f"*{dtype}", "TABLES": "*i32"}
        signature |= {"LENGTHS": "*i32", "PARTIAL_O": "*fp32", "PARTIAL_LSE": "*fp32"}
        for scalar in (
            "num_heads",
            "group",
            "table_width",
            "page_size",
            "key_page_stride",
            "value_page_stride",
        ):
            signature[scalar] = "i32"
        signature |= {"num_splits": "i32", "D": "i32", "DV": "i32", "scale": "fp32"}
        constants = {"BLOCK_N": block_n, "BLOCK_D": width, "BLOCK_DV": width, "GATHER": page_offsets}
        return paged_decode_kernel, signature, constants, {"num_warps": 4}
    if name == "combine_splits":
        signature = {"PARTIAL_O": "*fp32", "PARTIAL_LSE": "*fp32", "O": f"*{dtype}", "LSE": "*fp32"}
        signature |= {"num_splits": "i32", "DV": "i32"}
        return combine_splits_kernel, signature, {"BLOCK_SPLITS": 16, "BLOCK_DV": width}, {"num_warps": 4}
    if name == "gla_chunk":  # always float32 inside (the course's rule for half precision)
        signature = {x: "*fp32" for x in ("Q", "K", "V", "G", "O", "INITIAL", "FINAL")}
        signature |= {"T": "i32", "DK": "i32", "DV": "i32", "scale": "fp32"}
        constants = {"SCALAR_GATE": False, "HAS_INITIAL": True, "STORE_FINAL": True, "CHUNK": 16}
        constants |= {"BLOCK_DK": width, "BLOCK_DV": 32, "PRECISION": "ieee"}
        return gla_chunk_kernel, signature, constants, {"num_warps": 4}
    raise ValueError(f"name={name!r} must be one of {', '.join(KERNELS)}")


def compile_kernel(
    name: str,
    *,
    dtype: str = "fp16",
    head_dim: int = 64,
    block_m: int | None = None,
    block_n: int | None = None,
    arch: int = 80,
) -> dict:
    """Compile one kernel for ``sm_<arch>``; returns ``{"name", "arch", "shared_bytes", "seconds"}``.

    ``dtype`` is ``"fp16"``, ``"bf16"`` or ``"fp32"``; block sizes default to the library's.
    Raises ``RuntimeError`` when the interpreter is on (an interpreted kernel cannot be compiled).
    """
    if INTERPRET:
        raise RuntimeError("the interpreter is on: run with TRITON_INTERPRET=0 to compile for a GPU")
    if dtype not in _TORCH_NAMES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(_TORCH_NAMES)}")
    default_m, default_n = default_blocks(head_dim, head_dim, getattr(torch, _TORCH_NAMES[dtype]))
    kernel, signature, constants, options = _plan(
        name, dtype, head_dim, block_m or default_m, block_n or default_n
    )
    start = time.perf_counter()
    # In the kernel's parameter order; constexpr parameters are named, not typed.
    signature = {arg: "constexpr" if arg in constants else signature[arg] for arg in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32), options=options
    )
    return {
        "name": name,
        "arch": arch,
        "shared_bytes": compiled.metadata.shared,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.kernels.compile_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument(
        "--arch", type=int, default=80, help="compute capability x10: 80 A100, 89 RTX 40, 90 H100"
    )
    parser.add_argument("--dtype", choices=sorted(_TORCH_NAMES), default="fp16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-m", type=int)
    parser.add_argument("--block-n", type=int)
    args = parser.parse_args(argv)
    reports = []
    for name in args.kernels:
        report = compile_kernel(
            name,
            dtype=args.dtype,
            head_dim=args.head_dim,
            block_m=args.block_m,
            block_n=args.block_n,
            arch=args.arch,
        )
        print(
            f"{name:>18}: compiled for sm_{args.arch} ({args.dtype}, head dim {args.head_dim}), "
            f"shared memory {report['shared_bytes'] / 1024:.1f} KiB"
        )
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
