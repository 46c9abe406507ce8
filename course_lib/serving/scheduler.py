"""Iteration-level (continuous) batching over the paged cache, and the static batching it replaces.

**Static batching** forms a batch, runs it until its *longest* request is done, then forms the
next one. A request that finishes early idles in its slot; one that arrives meanwhile waits for
the whole batch; memory for every request's worst case is reserved up front.

**Continuous batching** (Orca, Yu et al., 2022; vLLM) schedules per *iteration*: every step
- retires a request as soon as its last token is out, and frees its blocks for the next step;
- gives one decode token to every running request, and the rest of a per-step **token budget**
  to prefill chunks of requests still reading their prompt (chunked prefill piggybacked on the
  decodes, as in Sarathi-Serve: a long prompt no longer stalls everyone's next token);
- admits waiting requests, oldest first, while the budget lasts and blocks are free;
- when the pool runs dry, **preempts** the newest running request: its blocks are freed and it
  goes back to the head of the queue, to be recomputed (its prompt plus what it has generated)
  when blocks are free again.

One number per request drives all of it: how many of its known tokens (prompt plus output) are
not yet in the cache. Prefill, a prefill chunk, a decode and a recompute after preemption are
the same operation with different counts. Because each request's tokens depend only on its own
prompt (greedy, or sampling with its own seeded generator), the outputs are exactly those the
request gets alone, whatever else runs beside it.

Time is counted in engine steps, so a trace replays identically; each step's wall time is
measured too, for throughput in tokens per second.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..checks import check_float, check_hashable, check_int
from ..decoding import sample_next_token
from .paged_cache import PagedModelCache, _attention_of, _token_list
from .runner import paged_forward

__all__ = ["Request", "Scheduler", "StaticScheduler", "serve", "make_trace"]


@dataclass(eq=False)
class Request:
    """One request and its progress. ``arrival`` and the times below are in engine steps."""

    request_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0
    temperature: float = 0.0
    seed: int | None = None
    output: list[int] = field(default_factory=list)
    status: str = "pending"  # pending (not arrived yet), waiting, running, finished, aborted
    num_computed: int = 0  # known tokens whose keys and values are in the cache
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    generator: torch.Generator | None = None

    @property
    def known_tokens(self) -> list[int]:
        """The prompt followed by the tokens generated so far."""
        return self.prompt + self.output

    @property
    def behind(self) -> int:
        """Known tokens not yet in the cache: 1 while decoding, more while (re)filling."""
        return len(self.prompt) + len(self.output) - self.num_computed


class Scheduler:
    """A serving engine with continuous batching for a TinyTransformer ("mha", "gqa" or "mqa").

    Args:
        model: the model; its weights are used as they are (its dtype sets the cache's).
        num_blocks, block_size: the paged cache's pool.
        token_budget: at most this many tokens (decodes plus prefill chunks) per step.
        max_running: at most this many requests in flight (None: only blocks limit it).
        prefix_caching: share cached blocks of identical prompt prefixes.

    Add requests with :meth:`add_request`, then call :meth:`step` or :meth:`run`.
    """

    policy = "continuous"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        token_budget: int,
        max_running: int | None = None,
        prefix_caching: bool = False,
    ) -> None:
        _attention_of(model, "model")
        self.model = model
        self.cache = PagedModelCache.for_model(
            model, num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching
        )
        self.token_budget = token_budget
        self.max_running = None if max_running is None else check_int(max_running, "max_running", min=1)
        self.requests: dict[Hashable, Request] = {}
        self.pending: list[tuple[float, int, Request]] = []  # not arrived yet, by arrival time
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission: the last one is preempted first
        self.time = 0.0  # in steps; jumps ahead over idle gaps
        self.history: list[dict] = []
        self._order = 0

    @property
    def token_budget(self) -> int:
        return self._token_budget

    @token_budget.setter
    def token_budget(self, value: int) -> None:
        self._token_budget = check_int(value, "token_budget", min=1)

    # --- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        request_id: Hashable | None = None,
        arrival: float | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Hashable:
        """Queue a request; it becomes visible at step ``arrival`` (default: now). Returns its id.

        ``temperature=0`` is greedy; with ``temperature > 0`` the request samples with its own
        generator seeded by ``seed``. Everything is checked before anything changes.
        """
        prompt = _token_list(prompt, "prompt")
        vocab_size = self.model.config.vocab_size
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if max(prompt) >= vocab_size:
            raise ValueError(f"prompt must hold tokens in 0 .. vocab_size-1 = {vocab_size - 1}")
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", min=1)
        arrival = self.time if arrival is None else check_float(arrival, "arrival", min=0.0)
        if math.isinf(arrival):
            raise ValueError("arrival must be finite")
        temperature = check_float(temperature, "temperature", min=0.0)
        if temperature > 0 and seed is None:
            raise ValueError("seed must be given when temperature > 0 (each request samples reproducibly)")
        if seed is not None:
            seed = check_int(seed, "seed")
        if request_id is None:
            request_id = self._order
            while request_id in self.requests:
                request_id += 1
        else:
            check_hashable(request_id, "request_id")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already a request of this scheduler")
        # The last generated token is never fed back, so its keys and values are never stored.
        stored = len(prompt) + max_new_tokens - 1
        blocks = self.cache.blocks_for(stored)
        if blocks > self.cache.num_blocks:
            raise ValueError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} needs {blocks} "
                f"blocks of {self.cache.block_size} tokens, more than the whole cache "
                f"(num_blocks={self.cache.num_blocks})"
            )
        if self.model.config.positions == "learned" and stored > self.model.config.max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} reaches position "
                f"{stored}, beyond the model's max_len={self.model.config.max_len}"
            )
        request = Request(request_id, prompt, max_new_tokens, arrival, temperature, seed)
        if temperature > 0:
            request.generator = torch.Generator().manual_seed(seed)
        self.requests[request_id] = request
        bisect.insort(self.pending, (arrival, self._order, request), key=lambda item: item[:2])
        self._order += 1
        return request_id

    def request(self, request_id: Hashable) -> Request:
        """The request named ``request_id`` (its status, output and times)."""
        if not isinstance(request_id, Hashable) or request_id not in self.requests:
            raise ValueError(f"request_id={request_id!r} is not a request of this scheduler")
        return self.requests[request_id]

    def output(self, request_id: Hashable) -> list[int]:
        """The tokens generated so far for ``request_id``."""
        return list(self.request(request_id).output)

    def abort(self, request_id: Hashable) -> None:
        """Drop a request that has not finished; a running one frees its blocks at once."""
        request = self.request(request_id)
        if request.status in ("finished", "aborted"):
            raise ValueError(f"request_id={request_id!r} has already {request.status}")
        if request.status == "running":
            self.running.remove(request)
            self.cache.free(request_id)
        elif request.status == "waiting":
            self.waiting.remove(request)
        else:
            self.pending = [item for item in self.pending if item[2] is not request]
        request.status = "aborted"

    @property
    def done(self) -> bool:
        """No request is pending, waiting or running."""
        return not (self.pending or self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------
    def _arrive(self) -> None:
        while self.pending and self.pending[0][0] <= self.time:
            request = self.pending.pop(0)[2]
            request.status = "waiting"
            self.waiting.append(request)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first, to be recomputed from its known tokens."""
        self.running.remove(request)
        self.cache.free(request.request_id)
        request.status, request.num_computed = "waiting", 0
        request.preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, request: Request) -> None:
        self.waiting.popleft()
        request.num_computed = self.cache.add_sequence(request.request_id, request.known_tokens)
        request.status = "running"
        self.running.append(request)

    def _schedule(self) -> tuple[dict[Request, int], int]:
        """Choose this step's tokens: ``{request: number of its tokens to feed}`` and the preemptions."""
        budget, planned, preempted = self.token_budget, 0, 0
        scheduled: dict[Request, int] = {}
        needs: dict[Request, int] = {}
        # Decodes first (one token each), then running requests still filling, oldest first.
        order = [r for r in self.running if r.behind == 1] + [r for r in self.running if r.behind > 1]
        for request in order:
            if request.status != "running":
                continue  # preempted a moment ago
            if budget == 0:
                break
            count = min(request.behind, budget)
            need = self.cache.blocks_needed(request.request_id, count)
            while need > self.cache.num_free_blocks - planned:
                victim = self.running[-1]  # the newest request makes room
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                    planned -= needs.pop(victim)
                self._preempt(victim)
                preempted += 1
                if victim is request:
                    break
            if request.status == "running":
                scheduled[request], needs[request] = count, need
                planned += need
                budget -= count
        # New requests only when nobody had to leave: admitting would just preempt again.
        while not preempted and self.waiting and budget > 0:
            if self.max_running is not None and len(self.running) >= self.max_running:
                break
            request = self.waiting[0]
            tokens = request.known_tokens
            count = min(len(tokens) - self.cache.cached_prefix_length(tokens), budget)
            if self.cache.blocks_to_add(tokens, count) > self.cache.num_free_blocks - planned:
                break  # first come, first served: nobody overtakes the head of the queue
            self._admit(request)
            need = self.cache.blocks_needed(request.request_id, count)
            scheduled[request], needs[request] = count, need
            planned += need
            budget -= count
        return scheduled, preempted

    def _choose(self, request: Request, logits: torch.Tensor) -> int:
        if request.temperature == 0:
            return int(logits.argmax())
        logits = logits[None].cpu()  # each request's generator lives on the CPU
        token = sample_next_token(logits, generator=request.generator, temperature=request.temperature)
        return int(token)

    def _release(self, request: Request) -> None:
        """A finished request leaves the batch and frees its blocks now."""
        self.running.remove(request)
        self.cache.free(request.request_id)

    def _run(self, scheduled: dict[Request, int]) -> tuple[int, int]:
        """Run the model on the scheduled tokens and emit a token for every request that caught up.

        Returns (decode tokens fed, tokens emitted).
        """
        batch = [
            (r.request_id, r.known_tokens[r.num_computed : r.num_computed + n]) for r, n in scheduled.items()
        ]
        decodes = emitted = 0
        for (request, count), logits in zip(scheduled.items(), paged_forward(self.model, self.cache, batch)):
            decodes += request.behind == 1
            request.num_computed += count
            if request.behind:
                continue  # still filling: its last row predicts a token that is already known
            request.output.append(self._choose(request, logits[-1]))
            emitted += 1
            if request.first_token_time is None:
                request.first_token_time = self.time + 1
            if len(request.output) == request.max_new_tokens:
                request.status, request.finish_time = "finished", self.time + 1
                self._release(request)
        return decodes, emitted

    def reserved_blocks(self) -> int:
        """Blocks set aside for the running requests (continuous batching: exactly those in use)."""
        return self.cache.num_used_blocks

    def step(self) -> dict | None:
        """Run one engine step; returns its record (also appended to ``history``), None when done.

        When nothing is running or waiting, the clock first jumps to the next arrival.
        """
        self._arrive()
        if not self.running and not self.waiting:
            if not self.pending:
                return None
            self.time = max(self.time, self.pending[0][0])
            self._arrive()
        started = time.perf_counter()
        scheduled, preempted = self._schedule()
        if not scheduled:  # cannot happen: a lone request always fits (add_request checks it)
            raise RuntimeError(f"the scheduler made no progress at time {self.time}")
        decodes, emitted = self._run(scheduled)
        seconds = time.perf_counter() - started
        usage = self.cache.usage()
        reserved = self.reserved_blocks()
        tokens = sum(scheduled.values())
        record = {
            "time": self.time,
            "tokens": tokens,
            "decode_tokens": decodes,
            "emitted": emitted,
            "running": sum(1 for r in self.running if r.status == "running"),
            "waiting": len(self.waiting),
            "preempted": preempted,
            "used_blocks": usage["used_blocks"],
            "reserved_blocks": reserved,
            "stored_tokens": usage["stored_tokens"],
            "utilisation": usage["stored_tokens"] / (reserved * self.cache.block_size) if reserved else 1.0,
            "seconds": seconds,
        }
        self.time += 1
        self.history.append(record)
        return record

    def run(self, max_steps: int | None = None) -> dict:
        """Step until every request is done (or ``max_steps`` steps); returns :meth:`metrics`."""
        if max_steps is not None:
            max_steps = check_int(max_steps, "max_steps", min=0)
        steps = 0
        while not self.done and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return self.metrics()

    # --- what it achieved -----------------------------------------------------------------------
    def outputs(self) -> dict[Hashable, list[int]]:
        """Every request's generated tokens, by request id."""
        return {request_id: list(r.output) for request_id, r in self.requests.items()}

    def metrics(self) -> dict:
        """Throughput, latency and cache use of the steps run so far.

        - ``tokens_per_second``: generated tokens / measured seconds of all steps (noisy);
          ``tokens_per_step``: generated tokens / steps (exact, the same on any machine).
        - ``mean_ttft``: time to first token, in steps from arrival; ``mean_tpot``: time per output
          token after the first, in steps; ``*_seconds``: the same at the mean measured step time.
        - ``mean_utilisation``: over steps, stored tokens / slots of the reserved blocks;
          ``mean_reserved_fraction``: reserved blocks / the pool.
        - ``prefix_hit_rate``: prompt tokens found in the cache / prompt tokens looked up
          (``prefill_tokens_saved`` of them), with prefix caching.
        """
        history = self.history
        steps = len(history)
        seconds = sum(h["seconds"] for h in history)
        done = [r for r in self.requests.values() if r.status == "finished"]
        started = [r for r in self.requests.values() if r.first_token_time is not None]
        generated = sum(len(r.output) for r in self.requests.values())
        ttft = [r.first_token_time - r.arrival for r in started]
        tpot = [(r.finish_time - r.first_token_time) / (len(r.output) - 1) for r in done if len(r.output) > 1]
        step_seconds = seconds / steps if steps else 0.0
        stats = self.cache.stats

        def mean(values):
            return sum(values) / len(values) if values else float("nan")

        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "finished": len(done),
            "steps": steps,
            "seconds": seconds,
            "generated_tokens": generated,
            "processed_tokens": sum(h["tokens"] for h in history),
            "tokens_per_second": generated / seconds if seconds else float("nan"),
            "tokens_per_step": generated / steps if steps else float("nan"),
            "mean_ttft": mean(ttft),
            "max_ttft": max(ttft, default=float("nan")),
            "mean_tpot": mean(tpot),
            "mean_ttft_seconds": mean(ttft) * step_seconds,
            "mean_tpot_seconds": mean(tpot) * step_seconds,
            "mean_utilisation": mean([h["utilisation"] for h in history]),
            "mean_reserved_fraction": mean([h["reserved_blocks"] / self.cache.num_blocks for h in history]),
            "preemptions": sum(h["preempted"] for h in history),
            "prefix_hit_rate": stats["hit_tokens"] / stats["queried_tokens"]
            if stats["queried_tokens"]
            else 0.0,
            "prefill_tokens_saved": stats["hit_tokens"],
        }


class StaticScheduler(Scheduler):
    """Static batching on the same engine: a batch forms, runs until its last request ends, then the next.

    A batch takes waiting requests, oldest first (up to ``max_running``), while the blocks of every
    member's worst case (prompt plus all its output) fit, as a server without preemption must
    reserve. It prefills whole prompts in its first step (``token_budget`` does not apply), then
    decodes one token per unfinished member per step. Finished members keep their blocks until the
    batch ends; newcomers wait for the next batch.
    """

    policy = "static"

    def __init__(self, model, *, num_blocks, block_size, token_budget=1, max_running=None) -> None:
        super().__init__(
            model,
            num_blocks=num_blocks,
            block_size=block_size,
            token_budget=token_budget,
            max_running=max_running,
        )
        self._reserved = 0

    def _schedule(self) -> tuple[dict[Request, int], int]:
        if self.running:  # the batch goes on: one token for each member that is not done
            return {r: 1 for r in self.running if r.status == "running"}, 0
        scheduled, free = {}, self.cache.num_free_blocks
        while self.waiting and (self.max_running is None or len(self.running) < self.max_running):
            request = self.waiting[0]
            worst = self.cache.blocks_for(len(request.prompt) + request.max_new_tokens - 1)
            if worst > free:
                break
            free -= worst
            self._admit(request)
            scheduled[request] = request.behind
        self._reserved = self.cache.num_free_blocks - free
        return scheduled, 0

    def _release(self, request: Request) -> None:
        """Blocks come back only when the whole batch is done."""
        if all(r.status == "finished" for r in self.running):
            for member in self.running:
                self.cache.free(member.request_id)
            self.running.clear()
            self._reserved = 0

    def reserved_blocks(self) -> int:
        return self._reserved

    def abort(self, request_id: Hashable) -> None:
        super().abort(request_id)
        if self.running and all(r.status == "finished" for r in self.running):
            self._release(self.running[0])


def serve(
    model: torch.nn.Module,
    trace: Sequence[dict],
    *,
    policy: str = "continuous",
    num_blocks: int,
    block_size: int,
    token_budget: int = 64,
    max_running: int | None = None,
    prefix_caching: bool = False,
) -> Scheduler:
    """Replay ``trace`` (dicts of :meth:`Scheduler.add_request`'s arguments) to the end; returns the engine.

    ``policy`` is "continuous" (:class:`Scheduler`) or "static" (:class:`StaticScheduler`, which
    has no prefix caching). Read the results from ``engine.outputs()``, ``engine.metrics()`` and
    ``engine.history``.
    """
    if policy == "continuous":
        engine = Scheduler(
            model,
            num_blocks=num_blocks,
            block_size=block_size,
            token_budget=token_budget,
            max_running=max_running,
            prefix_caching=prefix_caching,
        )
    elif policy == "static":
        if prefix_caching:
            raise ValueError("prefix_caching is not offered with policy='static'")
        engine = StaticScheduler(
            model,
            num_blocks=num_blocks,
            block_size=block_size,
            token_budget=token_budget,
            max_running=max_running,
        )
    else:
        raise ValueError(f"policy must be one of 'continuous', 'static', got {policy!r}")
    for item in trace:
        engine.add_request(**item)
    engine.run()
    return engine


def make_trace(
    num_requests: int,
    *,
    rate: float,
    vocab_size: int,
    prompt_lengths: tuple[int, int] = (4, 16),
    output_lengths: tuple[int, int] = (4, 16),
    long_fraction: float = 0.0,
    long_output_lengths: tuple[int, int] = (32, 64),
    system_prompts: int = 0,
    system_prompt_length: int = 0,
    source: torch.Tensor | None = None,
    seed: int = 0,
) -> list[dict]:
    """A seeded request trace: Poisson arrivals at ``rate`` requests per step, mixed output lengths.

    Prompt lengths are uniform in ``prompt_lengths`` (inclusive); output lengths are uniform in
    ``output_lengths``, or with probability ``long_fraction`` in ``long_output_lengths``. With
    ``system_prompts > 0`` each prompt starts with one of that many shared prefixes of
    ``system_prompt_length`` tokens (chosen at random), then its own part. Tokens are uniform in
    ``0 .. vocab_size - 1``, or windows of ``source`` (a 1-D long tensor, e.g. an encoded corpus).
    ``rate=math.inf`` makes every request arrive at step 0. Returns dicts for :meth:`Scheduler.add_request`.
    """
    num_requests = check_int(num_requests, "num_requests", min=1)
    rate = check_float(rate, "rate", min=0.0, min_open=True)
    vocab_size = check_int(vocab_size, "vocab_size", min=1)
    for name, (low, high) in (
        ("prompt_lengths", prompt_lengths),
        ("output_lengths", output_lengths),
        ("long_output_lengths", long_output_lengths),
    ):
        check_int(low, name, min=1)
        check_int(high, name, min=low)
    long_fraction = check_float(long_fraction, "long_fraction", min=0.0, max=1.0)
    system_prompts = check_int(system_prompts, "system_prompts", min=0)
    system_prompt_length = check_int(system_prompt_length, "system_prompt_length", min=0)
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))

    def integer(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def tokens(n: int) -> list[int]:
        if source is None:
            return torch.randint(0, vocab_size, (n,), generator=generator).tolist()
        start = integer(0, len(source) - n)
        return source[start : start + n].tolist()

    prefixes = [tokens(system_prompt_length) for _ in range(system_prompts)]
    trace, arrival = [], 0.0
    for index in range(num_requests):
        if index and not math.isinf(rate):
            arrival += float(torch.empty(1).exponential_(rate, generator=generator))
        prefix = prefixes[integer(0, system_prompts - 1)] if prefixes else []
        is_long = float(torch.rand(1, generator=generator)) < long_fraction
        outputs = long_output_lengths if is_long else output_lengths
        trace.append(
            {
                "request_id": index,
                "prompt": prefix + tokens(integer(*prompt_lengths)),
                "max_new_tokens": integer(*outputs),
                "arrival": arrival,
            }
        )
    return trace
