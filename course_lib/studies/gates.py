"""Chapter 07's gates made visible: one write followed through ``S_t = G_t * S_{t-1} + write_t``.

The methods are the catalogue's recurrences that declare their gates
(``catalogue.mechanisms(has="gates")``). For one head of each, :func:`gate_inputs` builds seeded
unit keys and values, log gates of a chosen typical decay shaped by the entry's
:class:`~course_lib.catalogue.Gates` (none, fixed, one data-dependent gate per step, or one per
step and key dimension), and the write strength beta of the delta-rule writes;
:func:`gate_profile` runs the recurrence through the course's one runner
(:func:`course_lib.recurrent.runner.run_recurrence`) and reports how much of the first write is
left after t steps (the decay profile), after how many steps it falls below 1/e (the memory
horizon), and how large the whole state grows under a stream of random writes. Everything is
float64; chapter 07's gate explorer and its figure draw these numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import catalogue
from ..catalogue import Gates
from ..checks import check_choice, check_float, check_int
from ..recurrent.runner import run_recurrence

__all__ = ["GATE_METHODS", "gate_methods", "gates_of", "gate_inputs", "gate_profile"]

F64 = torch.float64


def gate_methods() -> tuple[str, ...]:
    """The catalogue names of the recurrences that declare their gates, in the course's order."""
    return catalogue.names(has="gates")


# The names read from the catalogue (kept as a tuple for one release: the explorer's old list).
GATE_METHODS = gate_methods()


def gates_of(method: str) -> Gates:
    """The :class:`~course_lib.catalogue.Gates` of the catalogue entry ``method``."""
    check_choice(method, "method", gate_methods())
    return catalogue.get(method).gates


def gate_inputs(
    method: str = "gla",
    decay: float = 0.95,
    spread: float = 1.0,
    beta: float = 0.5,
    steps: int = 200,
    head_dim: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Seeded inputs of one head: unit keys (T, D), unit values (T, D), log gates (T, D), beta (T,).

    The forget gate's typical value is ``decay`` (per step), shaped by the entry's ``Gates.forget``:
    "none" (linear attention, DeltaNet, TTT) gives log gates 0; "fixed" (RetNet) ``log(decay)`` at
    every step; "scalar" (Mamba-2, mLSTM, Gated DeltaNet) multiplies it by a log-normal factor of
    width ``spread`` per step (one number for all key dimensions, data dependent); "vector" (GLA,
    RWKV, HGRN, Mamba-1) does so per step *and* per key dimension, each dimension with its own
    typical rate. The multiplier has mean 1, so the mean log gate stays ``log(decay)``. ``beta`` is
    the write strength (the select gate) of the delta-rule writes (``Gates.write == "delta"``); 1
    for the additive ones.
    """
    gates = gates_of(method)
    decay = check_float(decay, "decay", min=0.0, max=1.0, min_open=True, max_open=True)
    spread = check_float(spread, "spread", min=0.0)
    beta = check_float(beta, "beta", min=0.0, max=1.0)
    T = check_int(steps, "steps", min=2)
    D = check_int(head_dim, "head_dim", min=1)
    generator = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(T, D, generator=generator, dtype=F64), dim=-1)
    values = F.normalize(torch.randn(T, D, generator=generator, dtype=F64), dim=-1)
    noise = torch.randn(T, D, generator=generator, dtype=F64)
    per_dim = torch.randn(D, generator=generator, dtype=F64)
    base = math.log(decay)
    if gates.forget == "none":
        log_gates = torch.zeros(T, D, dtype=F64)
    elif gates.forget == "fixed":
        log_gates = torch.full((T, D), base, dtype=F64)
    elif gates.forget == "scalar":
        z = noise[:, :1].expand(T, D)  # one gate per step, shared by every key dimension
        log_gates = base * torch.exp(spread * z - spread**2 / 2)
    else:  # "vector": each dimension its own rate, and data-dependent wobble per step
        z = 0.8 * per_dim + 0.6 * noise
        log_gates = base * torch.exp(spread * z - spread**2 / 2)
    betas = torch.full((T,), beta if gates.write == "delta" else 1.0, dtype=F64)
    return {"keys": keys, "values": values, "log_gates": log_gates, "beta": betas}


def _simulate(inputs: dict[str, torch.Tensor], delta: bool) -> dict[str, torch.Tensor]:
    """Run the recurrence and follow the first write on its own (the recurrence is linear in S).

    The runner carries two states side by side: ``S`` itself, and what is left of the first
    write, which is decayed like ``S`` (from the step after it) and, under the delta rule, erased
    like ``S`` along every later key, but never written again.
    """
    k, v, g, beta = inputs["keys"], inputs["values"], inputs["log_gates"], inputs["beta"]
    T, D = k.shape
    first_write = beta[0] * torch.outer(k[0], v[0])
    first_norm = first_write.norm()

    def decay(t: int, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        S, first = state
        gate = g[t, :, None].exp()
        return gate * S, (gate * first if t > 0 else first)  # no decay at the first write's own step

    def write(t: int, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        S, first = state
        if not delta:
            return beta[t] * torch.outer(k[t], v[t]), torch.zeros_like(first)
        # The delta rule writes the error of what S returns for k_t, which also erases what the
        # first write left along k_t.
        erase = -(beta[t] * torch.outer(k[t], first.T @ k[t])) if t > 0 else torch.zeros_like(first)
        return beta[t] * torch.outer(k[t], v[t] - S.T @ k[t]), erase

    def read(t: int, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        S, first = state
        left = first.norm() / first_norm if first_norm > 0 else first.new_zeros(())
        return torch.stack([left, S.norm()])[None, None]  # (B=1, H=1, 2): what is followed per step

    zero = torch.zeros(D, v.shape[1], dtype=F64)
    reads, (state, _) = run_recurrence(T, (zero, first_write), decay=decay, write=write, read=read)
    return {"profile": reads[0, 0, :, 0], "state_norm": reads[0, 0, :, 1], "final_state": state}


def gate_profile(
    method: str = "gla",
    decay: float = 0.95,
    spread: float = 1.0,
    beta: float = 0.5,
    steps: int = 200,
) -> dict:
    """Decay profile, memory horizon and state norm of one head of ``method`` (see :func:`gate_inputs`).

    Returns ``inputs``, ``profile`` (T,): the Frobenius norm of what is left of the first write,
    relative to the write itself; ``per_dim`` (T, D): ``exp(cumulative log gate)`` per key dimension;
    ``horizon``: the first step at which the profile is below 1/e (None if never within ``steps``);
    ``typical_horizon``: ``-1 / mean log gate`` (``1/(1 - gamma)`` to first order, None without a
    forget gate); ``state_norm`` (T,) and ``final_state`` (D, D).
    """
    inputs = gate_inputs(method, decay, spread, beta, steps)
    result = _simulate(inputs, gates_of(method).write == "delta")
    profile = result["profile"]
    below = (profile < math.exp(-1)).nonzero()
    horizon = int(below[0]) if len(below) else None
    mean_log_gate = inputs["log_gates"].mean().item()
    cumulative = inputs["log_gates"].clone()
    cumulative[0] = 0.0  # the first write is not decayed at its own step
    per_dim = cumulative.cumsum(0).exp()
    return {
        "method": method,
        "inputs": inputs,
        "profile": profile,
        "per_dim": per_dim,
        "horizon": horizon,
        "typical_horizon": -1.0 / mean_log_gate if mean_log_gate < 0 else None,
        "state_norm": result["state_norm"],
        "final_state": result["final_state"],
    }
