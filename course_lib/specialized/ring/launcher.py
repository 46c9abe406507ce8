"""Launching the ring: ``W`` CPU processes (gloo over loopback) or ``W`` GPUs (NCCL) in one group.

:func:`run_distributed` runs any function on every rank of a fresh process group and gathers the
results; :func:`run_ring_attention` shards full inputs over the ranks, runs
:func:`~course_lib.specialized.ring.ring_attention` (forward, and backward when given
``grad_output``) or the all-gather, and puts the result back in sequence order.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ...checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_shape,
    check_tensor,
    resolve_scale,
)
from .attention import RingStats, all_gather_attention, ring_attention
from .partition import LAYOUTS, shard_sequence, unshard_sequence

__all__ = ["METHODS", "run_distributed", "run_ring_attention"]

METHODS = ("ring", "all_gather")


def _use_loopback() -> None:
    """Make gloo talk over the loopback interface only (127.0.0.1), unless the user chose one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def _worker(rank, world_size, folder, backend, timeout, function, args):
    _use_loopback()
    if backend == "gloo":
        torch.set_num_threads(1)  # W processes share the cores; one thread each avoids oversubscription
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"result_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(
    function: Callable,
    world_size: int,
    *args: object,
    backend: str = "gloo",
    start_method: str | None = None,
    timeout: float = 120.0,
) -> list:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` new processes joined in one
    process group (a FileStore in a temporary folder; gloo talks over loopback), and return each
    rank's return value, in rank order. An exception in any rank is raised here.

    ``start_method`` defaults to ``"fork"`` on Linux when CUDA is not initialised (a fraction of
    a second per launch) and ``"spawn"`` elsewhere (each process imports torch afresh: seconds).
    With ``"spawn"``, ``function`` must be importable (defined at module level), and a script
    that calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    world_size = check_int(world_size, "world_size", min=1)
    check_choice(backend, "backend", ("gloo", "nccl"))
    if start_method is None:
        start_method = "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"
    check_choice(start_method, "start_method", ("spawn", "fork", "forkserver"))
    timeout = check_float(timeout, "timeout", min=0.0, min_open=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.start_processes(
            _worker,
            args=(world_size, folder, backend, timeout, function, args),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        return [
            torch.load(os.path.join(folder, f"result_{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]


def _attention_worker(rank, world_size, q_shards, k_shards, v_shards, grad_shards, method, options):
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    function = ring_attention if method == "ring" else all_gather_attention
    wants_grad = grad_shards is not None
    q, k, v = (
        shards[rank].to(device).requires_grad_(wants_grad) for shards in (q_shards, k_shards, v_shards)
    )
    out, stats = function(q, k, v, return_stats=True, **options)
    if not wants_grad:
        return out.cpu(), stats, None
    # Every rank runs its backward: the backward ring needs all of them.
    out.backward(grad_shards[rank].to(device))
    return out.detach().cpu(), stats, tuple(x.grad.cpu() for x in (q, k, v))


def run_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    method: str = "ring",
    grad_output: torch.Tensor | None = None,
    backend: str | None = None,
    start_method: str | None = None,
    timeout: float = 120.0,
    return_stats: bool = False,
) -> (
    torch.Tensor
    | tuple[torch.Tensor, list[RingStats]]
    | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[RingStats]]
):
    """Shard full ``(B, H, T, D)`` inputs over ``world_size`` processes, run the ring, gather.

    ``backend`` defaults to NCCL when q is on CUDA with at least ``world_size`` GPUs, else gloo
    on CPU processes; ``start_method`` as in :func:`run_distributed`. ``method="all_gather"``
    runs :func:`all_gather_attention` instead. Returns the ``(B, H, T, D_v)`` output on q's
    device (and each rank's :class:`RingStats`).

    With ``grad_output`` ``(B, H, T, D_v)`` (the gradient of a loss with respect to the output),
    every rank also runs the backward ring, and the result gains ``(dq, dk, dv)``, gathered to
    the full sequence like q, k, v: ``out, (dq, dk, dv)`` (then the stats). Ring method only.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    world_size = check_int(world_size, "world_size", min=1, max=min(T, S))
    check_bool(causal, "causal")
    check_bool(return_stats, "return_stats")
    check_choice(layout, "layout", LAYOUTS)
    check_choice(method, "method", METHODS)
    if causal and S != T:
        raise ValueError(f"k: causal ring attention is self-attention and needs S == T, got S={S}, T={T}")
    scale = resolve_scale(scale, D)
    if grad_output is not None:
        check_tensor(grad_output, "grad_output", floating=True)
        check_shape(grad_output, "grad_output", (B, H, T, D_v), names="B, H, T, D_v")
        if method != "ring":
            raise ValueError(
                f"grad_output: gradients need method='ring' (the all-gather is forward only), got {method!r}"
            )
    if backend is None:
        enough_gpus = q.is_cuda and dist.is_nccl_available() and torch.cuda.device_count() >= world_size
        backend = "nccl" if enough_gpus else "gloo"
    check_choice(backend, "backend", ("gloo", "nccl"))
    source = (lambda x: x.detach()) if backend == "nccl" else (lambda x: x.detach().cpu())
    shards = [shard_sequence(source(x), world_size, layout=layout) for x in (q, k, v)]
    grad_shards = (
        None if grad_output is None else shard_sequence(source(grad_output), world_size, layout=layout)
    )
    options = {"causal": causal, "scale": scale, "layout": layout}
    results = run_distributed(
        _attention_worker,
        world_size,
        *shards,
        grad_shards,
        method,
        options,
        backend=backend,
        start_method=start_method,
        timeout=timeout,
    )
    out = unshard_sequence([r[0] for r in results], layout=layout).to(q.device)
    outputs: tuple = (out,)
    if grad_output is not None:
        grads = tuple(
            unshard_sequence([r[2][index] for r in results], layout=layout).to(x.device)
            for index, x in enumerate((q, k, v))
        )
        outputs += (grads,)
    if return_stats:
        outputs += ([r[1] for r in results],)
    return outputs[0] if len(outputs) == 1 else outputs
