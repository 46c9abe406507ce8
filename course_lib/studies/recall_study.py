"""Chapter 08's recall study: every token mixer trained on MQAR until it converges, then measured.

Trained as a researcher checking a claim would (Zoology, Arora et al. 2023, reports the best of a
learning-rate sweep), so that "not learned" means "not within this budget", never "too few steps":

1. **Learning-rate sweep** (once per mixer, at T = 64, seed 0): :data:`SWEEP_LRS`, the best kept.
2. **Final runs** (per mixer, :data:`SEEDS`): one model trained on *every* length of the grid at once
   (step s trains on length ``LENGTHS[s % 3]``, ``num_pairs = T / 16``), evaluated per length every
   ``eval_every`` steps on held-out batches. A run stops when every length reaches
   :data:`TARGET` accuracy (converged), when the mean accuracy has not improved for ``patience``
   evaluations (plateau), or at the step cap (``cap``) — each run records which.
3. **State sweep**: a few mixers at several widths, recall against decoding-state bytes (as the
   Zoology and Based papers plot it).

Every run is cached in ``results/recall_runs/`` as one small JSON file named by its settings, so
adding a mechanism retrains only that mechanism, and an interrupted study resumes where it
stopped. ``python -m course_lib.studies.recall_study`` runs what is missing (``--jobs 2``: two
processes of one thread each, the fastest use of a 2-core CPU) with a progress bar and writes the
summary ``results/recall_study.json`` that notebook 08 loads; ``--quick`` runs a small version
(one seed, a low step cap, no sweep) into ``results/recall_study_quick.json`` to check the
pipeline. Each run also records accuracy by key-query distance, and ``--placement power_law``
trains and evaluates on Zoology's power-law query placement.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import check_choice, check_float, check_int
from ..measure import format_bytes
from ..recall import (
    PLACEMENTS,
    RECALL_MIXERS,
    MQARTask,
    accuracy_by_distance,
    answer_accuracy,
    answer_distances,
    mqar_batch,
    recall_loss,
    recall_model,
    state_bytes,
)
from ..results import RESULTS_DIR

__all__ = [
    "LENGTHS",
    "SEEDS",
    "SWEEP_LRS",
    "TARGET",
    "DISTANCE_EDGES",
    "STATE_SWEEP_MIXERS",
    "STATE_SWEEP_WIDTHS",
    "Run",
    "task_at",
    "train_run",
    "plan",
    "run_study",
    "summarise",
    "STUDY_PATH",
    "COMMAND",
    "load_summary",
    "pending",
    "sweep_best",
    "final_rows",
    "distance_rows",
    "state_rows",
    "status_report",
    "sweep_report",
    "final_report",
    "state_report",
    "main",
]

LENGTHS = (64, 128, 256)
SEEDS = (0, 1)
SWEEP_LRS = (1e-3, 3e-3, 1e-2)
TARGET = 0.99
DISTANCE_EDGES = [1, 8, 16, 32, 64, 128, 256]
STATE_SWEEP_MIXERS = ("gla", "mamba2", "deltanet")
STATE_SWEEP_WIDTHS = (32, 64, 128)
# The final and state runs: at most 2400 steps (800 per length), evaluated every 200, stopped after
# 4 evaluations without improvement but not before step 1200 (a model can sit at chance for a long
# time before it finds the lookup). The sweep runs (one length) stop at 1500.
FINAL = {"cap": 2400, "eval_every": 200, "patience": 4, "min_steps": 1200}
RUNS_DIR = RESULTS_DIR / "recall_runs"
STUDY_PATH = RESULTS_DIR / "recall_study.json"
COMMAND = "python -m course_lib.studies.recall_study --jobs 2"


def task_at(T: int, placement: str = "uniform") -> MQARTask:
    """The grid's task at length T: ``num_pairs = T / 16`` (Zoology's (64, 4), (128, 8), (256, 16)),
    64 tokens of vocabulary."""
    T = check_int(T, "T", min=16)
    return MQARTask(vocab_size=64, num_pairs=T // 16, seq_len=T, placement=placement)


@dataclass(frozen=True)
class Run:
    """The settings of one training run; its :meth:`key` names its cache file."""

    mixer: str
    lengths: tuple[int, ...] = LENGTHS
    lr: float = 3e-3
    seed: int = 0
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    batch_size: int = 16
    cap: int = 3000
    eval_every: int = 100
    patience: int = 6
    min_steps: int = 0  # no plateau stop before this step: MQAR often sits at chance, then learns
    placement: str = "uniform"
    kind: str = "final"  # "sweep", "final" or "state"

    def __post_init__(self) -> None:
        check_choice(self.mixer, "mixer", RECALL_MIXERS)
        check_choice(self.placement, "placement", PLACEMENTS)
        check_choice(self.kind, "kind", ("sweep", "final", "state"))
        check_float(self.lr, "lr", min=0.0, min_open=True)
        for name in (
            "seed",
            "d_model",
            "num_layers",
            "num_heads",
            "batch_size",
            "cap",
            "eval_every",
            "patience",
        ):
            check_int(getattr(self, name), name, min=0 if name == "seed" else 1)

    def key(self) -> str:
        lengths = "-".join(str(T) for T in self.lengths)
        return (
            f"{self.kind}_{self.mixer}_T{lengths}_lr{self.lr:g}_s{self.seed}_d{self.d_model}"
            f"_L{self.num_layers}_h{self.num_heads}_b{self.batch_size}_cap{self.cap}_e{self.eval_every}"
            f"_p{self.patience}{f'_m{self.min_steps}' if self.min_steps else ''}_{self.placement}"
        )


@torch.no_grad()
def _evaluate(
    model, tasks: dict[int, MQARTask], batches: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> dict:
    model.eval()
    return {T: answer_accuracy(model(batches[T][0]), batches[T][1]) for T in tasks}


def train_run(run: Run, *, progress: bool = False) -> dict:
    """Train one model as ``run`` says; return its record (JSON-ready, no model).

    The record holds the settings, ``accuracy`` per length (at the best evaluation), ``curve``
    (``(step, {T: accuracy})``), ``steps`` run, ``stop`` ("converged", "plateau" or "cap"),
    ``by_distance`` per length (accuracy per key-query distance bin of :data:`DISTANCE_EDGES`),
    ``state_bytes`` per length, ``parameters`` and ``seconds``.
    """
    started = time.perf_counter()
    tasks = {T: task_at(T, run.placement) for T in run.lengths}
    longest = tasks[max(run.lengths)]
    model = recall_model(
        run.mixer,
        longest,
        d_model=run.d_model,
        num_layers=run.num_layers,
        num_heads=run.num_heads,
        seed=run.seed,
    )
    generator = torch.Generator().manual_seed(run.seed)
    held_out = {T: mqar_batch(task, 128, seed=10_000 + T) for T, task in tasks.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.1)
    warmup = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and two processes share the CPU
    curve, best, best_state, since_best, stop = [], -1.0, None, 0, "cap"
    order = list(run.lengths)
    try:
        bar = tqdm(range(run.cap), desc=f"{run.mixer} {run.kind}", disable=not progress, leave=False)
        for step in bar:
            model.train()
            inputs, targets = mqar_batch(tasks[order[step % len(order)]], run.batch_size, generator=generator)
            loss = recall_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if (step + 1) % run.eval_every and step + 1 != run.cap:
                continue
            accuracy = _evaluate(model, tasks, held_out)
            curve.append((step + 1, accuracy))
            mean = sum(accuracy.values()) / len(accuracy)
            if mean > best + 1e-3:
                best, since_best = mean, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if min(accuracy.values()) >= TARGET:
                stop = "converged"
                break
            if since_best >= run.patience and step + 1 >= run.min_steps:
                stop = "plateau"
                break
        model.load_state_dict(best_state)
        model.eval()
        accuracy, by_distance = {}, {}
        with torch.no_grad():
            for T, task in tasks.items():
                inputs, targets = held_out[T]
                logits = model(inputs)
                accuracy[T] = answer_accuracy(logits, targets)
                distances = answer_distances(inputs, targets, task)
                by_distance[T] = accuracy_by_distance(logits, targets, distances, DISTANCE_EDGES)
    finally:
        torch.set_num_threads(threads)
    return {
        **asdict(run),
        "accuracy": {str(T): a for T, a in accuracy.items()},
        "curve": [(s, {str(T): a for T, a in acc.items()}) for s, acc in curve],
        "steps": curve[-1][0],
        "stop": stop,
        "by_distance": {str(T): bins for T, bins in by_distance.items()},
        "state_bytes": {
            str(T): state_bytes(
                run.mixer, T, d_model=run.d_model, num_layers=run.num_layers, num_heads=run.num_heads
            )
            for T in run.lengths
        },
        "parameters": model.num_parameters(),
        "seconds": time.perf_counter() - started,
    }


# --- the study ----------------------------------------------------------------------------------


def _cached(run: Run, folder: Path) -> dict | None:
    path = folder / f"{run.key()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _train_and_store(args: tuple[Run, str]) -> dict:
    run, folder = args
    torch.set_num_threads(1)
    record = train_run(run)
    path = Path(folder) / f"{run.key()}.json"
    path.write_text(json.dumps(record, indent=1))
    return record


def _run_all(
    runs: Sequence[Run], folder: Path, jobs: int, progress: bool, label: str, train: bool = True
) -> list[dict]:
    """Every run's record: from the cache, or trained now (``jobs`` processes) and cached. With
    ``train=False``, only the cached records (a summary of a study still running or interrupted)."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [run for run in runs if _cached(run, folder) is None]
    if not train:
        return [record for run in runs if (record := _cached(run, folder)) is not None]
    if missing:
        # Longest runs first, so the two processes finish together.
        missing.sort(key=lambda r: r.cap * max(r.lengths) * r.d_model, reverse=True)
        work = [(run, str(folder)) for run in missing]
        bar = tqdm(total=len(work), desc=f"recall study: {label}", disable=not progress)
        if jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
                for record in pool.imap_unordered(_train_and_store, work):
                    bar.set_postfix_str(f"{record['mixer']}: {record['stop']} at {record['steps']}")
                    bar.update()
        else:
            for item in work:
                record = _train_and_store(item)
                bar.set_postfix_str(f"{record['mixer']}: {record['stop']} at {record['steps']}")
                bar.update()
        bar.close()
    return [_cached(run, folder) for run in runs]


def plan(*, quick: bool = False, mixers: Sequence[str] = RECALL_MIXERS, placement: str = "uniform") -> dict:
    """The runs of the study (before the sweep's winners are known, the final runs use ``lr=None``).

    Full: a sweep of :data:`SWEEP_LRS` at T = 64 (cap 1500), final runs at every length for every
    seed (:data:`FINAL`), the state sweep at T = 128. Quick: no sweep (lr 3e-3), one seed, caps of 300.
    """
    for mixer in mixers:
        check_choice(mixer, "mixers", RECALL_MIXERS)
    base = {"placement": placement}
    if quick:
        base.update(cap=300, eval_every=50, patience=3)
        return {
            "sweep": [],
            "final": [Run(m, seed=0, **base) for m in mixers],
            "state": [
                Run(m, lengths=(128,), d_model=w, kind="state", **base)
                for m in STATE_SWEEP_MIXERS
                for w in STATE_SWEEP_WIDTHS
                if m in mixers
            ],
        }
    return {
        "sweep": [
            Run(m, lengths=(64,), lr=lr, cap=1500, kind="sweep", **base) for m in mixers for lr in SWEEP_LRS
        ],
        "final": [Run(m, seed=s, **FINAL, **base) for s in SEEDS for m in mixers],
        "state": [
            Run(m, lengths=(128,), d_model=w, kind="state", **FINAL, **base)
            for m in STATE_SWEEP_MIXERS
            for w in STATE_SWEEP_WIDTHS
            if m in mixers
        ],
    }


def _best_lr(records: list[dict], mixer: str) -> float:
    """The sweep's winner: the highest accuracy at T = 64, ties to the fewer steps."""
    mine = [r for r in records if r["mixer"] == mixer]
    if not mine:
        return 3e-3
    return max(mine, key=lambda r: (round(r["accuracy"]["64"], 3), -r["steps"]))["lr"]


def run_study(
    *,
    quick: bool = False,
    mixers: Sequence[str] = RECALL_MIXERS,
    placement: str = "uniform",
    jobs: int = 2,
    progress: bool = True,
    folder: Path = RUNS_DIR,
    on_progress=None,
    train: bool = True,
) -> dict:
    """Run (or read from the cache) every run of :func:`plan`; return :func:`summarise`'s summary.

    The sweep runs first, then every mixer's final run for the first seed, then for the next, then
    the state sweep; ``on_progress(summary)`` is called after each of these three stages (the command
    stores it). ``train=False`` trains nothing and summarises the runs already cached, listing the
    missing ones under ``"missing"``.
    """
    jobs = check_int(jobs, "jobs", min=1)
    runs = plan(quick=quick, mixers=mixers, placement=placement)
    report = on_progress or (lambda summary: None)
    sweep = _run_all(runs["sweep"], folder, jobs, progress, "learning-rate sweep", train)
    best = {m: (3e-3 if quick else _best_lr(sweep, m)) for m in mixers}
    final_runs = [replace(r, lr=best[r.mixer]) for r in runs["final"]]
    state_runs = [replace(r, lr=best[r.mixer]) for r in runs["state"]]
    report(summarise(sweep, [], [], quick=quick))
    final = _run_all(final_runs, folder, jobs, progress, "final runs", train)
    report(summarise(sweep, final, [], quick=quick))
    state = _run_all(state_runs, folder, jobs, progress, "state sweep", train)
    summary = summarise(sweep, final, state, quick=quick)
    summary["missing"] = [
        {"kind": r.kind, "mixer": r.mixer, "seed": r.seed, "lr": r.lr}
        for r in runs["sweep"] + final_runs + state_runs
        if _cached(r, folder) is None
    ]
    return summary


def summarise(sweep: list[dict], final: list[dict], state: list[dict], *, quick: bool = False) -> dict:
    """The study's summary: per mixer and length, the mean and spread over seeds, how runs stopped."""
    mixers = list(dict.fromkeys(r["mixer"] for r in final))
    table = {}
    for mixer in mixers:
        runs = [r for r in final if r["mixer"] == mixer]
        row = {}
        for T in runs[0]["accuracy"]:
            values = [r["accuracy"][T] for r in runs]
            row[T] = {
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
                "state_bytes": runs[0]["state_bytes"][T],
            }
        table[mixer] = {
            "seeds": [r["seed"] for r in runs],
            "lr": runs[0]["lr"],
            "accuracy": row,
            "stops": [r["stop"] for r in runs],
            "steps": [r["steps"] for r in runs],
            "seconds": sum(r["seconds"] for r in runs),
        }
    return {
        "quick": quick,
        "lengths": list(LENGTHS),
        "target": TARGET,
        "sweep": [{k: r[k] for k in ("mixer", "lr", "accuracy", "steps", "stop")} for r in sweep],
        "table": table,
        "final": final,
        "state": [
            {k: r[k] for k in ("mixer", "d_model", "accuracy", "state_bytes", "steps", "stop")} for r in state
        ],
    }


# --- reading the stored summary -------------------------------------------------------------------
# The notebook and the decision guide read the summary through these functions. A summary may be
# partial (the study stores one after each stage, and ``--summarise`` summarises an interrupted one):
# :func:`pending` lists what the plan holds that the summary does not, so nothing is silently short.


def load_summary(path: str | Path | None = None) -> dict:
    """The stored summary (default :data:`STUDY_PATH`, as :func:`summarise` writes it) with
    ``"path"`` and ``"pending"`` (:func:`pending`) added. Without a file: an empty summary
    (``"stored": False``) in which every run of the plan is pending."""
    if path is None:
        path = STUDY_PATH
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.exists():
        summary = {**json.loads(path.read_text()), "stored": True}
    else:
        summary = {**summarise([], [], []), "stored": False}
    summary["path"] = path.name
    summary["pending"] = pending(summary)
    return summary


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def pending(summary: dict) -> dict:
    """The runs of the plan (:func:`plan`, quick or full as the summary says) that the summary lacks:
    ``{"sweep": {mixer: [lr, ...]}, "final": {mixer: [seed, ...]}, "state": {mixer: [d_model, ...]}}``,
    mixers in :data:`RECALL_MIXERS` order, only those with something missing."""
    runs = plan(quick=summary.get("quick", False))
    have_sweep = [(r["mixer"], r["lr"]) for r in summary.get("sweep", [])]
    have_final = {(r["mixer"], r["seed"]) for r in summary.get("final", [])}
    have_state = {(r["mixer"], r["d_model"]) for r in summary.get("state", [])}
    missing: dict[str, dict] = {"sweep": {}, "final": {}, "state": {}}
    for run in runs["sweep"]:
        if not any(m == run.mixer and _same_lr(lr, run.lr) for m, lr in have_sweep):
            missing["sweep"].setdefault(run.mixer, []).append(run.lr)
    for run in runs["final"]:
        if (run.mixer, run.seed) not in have_final:
            missing["final"].setdefault(run.mixer, []).append(run.seed)
    for run in runs["state"]:
        if (run.mixer, run.d_model) not in have_state:
            missing["state"].setdefault(run.mixer, []).append(run.d_model)
    order = {m: i for i, m in enumerate(RECALL_MIXERS)}
    return {
        kind: {m: sorted(v) for m, v in sorted(found.items(), key=lambda kv: order.get(kv[0], len(order)))}
        for kind, found in missing.items()
    }


def _in_order(mixers) -> list[str]:
    order = {m: i for i, m in enumerate(RECALL_MIXERS)}
    return sorted(dict.fromkeys(mixers), key=lambda m: order.get(m, len(order)))


def sweep_best(summary: dict) -> list[dict]:
    """Per mixer of the sweep (:data:`RECALL_MIXERS` order), the run kept (as :func:`_best_lr` picks it:
    the highest accuracy at T = 64, ties to the fewer steps): ``mixer``, ``lr``, ``accuracy``, ``stop``,
    ``steps``, ``tried`` (``{lr: accuracy}`` of every learning rate run) and ``complete`` (every rate of
    :data:`SWEEP_LRS` was run)."""
    rows = []
    for mixer in _in_order(r["mixer"] for r in summary.get("sweep", [])):
        mine = [r for r in summary["sweep"] if r["mixer"] == mixer]
        best = max(mine, key=lambda r: (round(r["accuracy"]["64"], 3), -r["steps"]))
        rows.append(
            {
                "mixer": mixer,
                "lr": best["lr"],
                "accuracy": best["accuracy"]["64"],
                "stop": best["stop"],
                "steps": best["steps"],
                "tried": {r["lr"]: r["accuracy"]["64"] for r in sorted(mine, key=lambda r: r["lr"])},
                "complete": all(any(_same_lr(r["lr"], lr) for r in mine) for lr in SWEEP_LRS),
            }
        )
    return rows


def final_rows(summary: dict) -> list[dict]:
    """Per mixer with final runs (:data:`RECALL_MIXERS` order): ``mixer``, ``seeds``, ``lr``, ``stops``,
    ``steps`` and ``accuracy`` ``{T: {"mean", "min", "max", "state_bytes"}}`` (T an int)."""
    table = summary.get("table", {})
    return [
        {
            "mixer": mixer,
            **{k: table[mixer][k] for k in ("seeds", "lr", "stops", "steps")},
            "accuracy": {int(T): cell for T, cell in table[mixer]["accuracy"].items()},
        }
        for mixer in _in_order(table)
    ]


def distance_rows(summary: dict) -> dict:
    """Accuracy by key-query distance of the final runs that recorded it:
    ``{mixer: {T: [(low, high, mean over seeds or None), ...]}}``."""
    found: dict[str, dict] = {}
    for mixer in _in_order(r["mixer"] for r in summary.get("final", []) if r.get("by_distance")):
        runs = [r for r in summary["final"] if r["mixer"] == mixer and r.get("by_distance")]
        per_T = {}
        for T in runs[0]["by_distance"]:
            bins = []
            for i, (low, high, _) in enumerate(runs[0]["by_distance"][T]):
                values = [r["by_distance"][T][i][2] for r in runs if r["by_distance"][T][i][2] is not None]
                bins.append((low, high, sum(values) / len(values) if values else None))
            per_T[int(T)] = bins
        found[mixer] = per_T
    return found


def state_rows(summary: dict) -> list[dict]:
    """The state sweep's runs, by mixer then width: ``mixer``, ``d_model``, ``T``, ``accuracy``,
    ``state_bytes``, ``stop``, ``steps``."""
    rows = []
    for r in summary.get("state", []):
        for T, accuracy in r["accuracy"].items():
            rows.append(
                {
                    "mixer": r["mixer"],
                    "d_model": r["d_model"],
                    "T": int(T),
                    "accuracy": accuracy,
                    "state_bytes": r["state_bytes"][T],
                    "stop": r["stop"],
                    "steps": r["steps"],
                }
            )
    order = {m: i for i, m in enumerate(RECALL_MIXERS)}
    return sorted(rows, key=lambda r: (order.get(r["mixer"], len(order)), r["d_model"], r["T"]))


def _lrs(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _names(mixers) -> str:
    return ", ".join(mixers) if mixers else "none"


def _final_todo(todo: dict, mixers: Sequence[str]) -> list[str]:
    """The missing final runs, one phrase per seed ("seed 0: every mixer", "seed 1: gla, mamba2")."""
    by_seed: dict[int, list[str]] = {}
    for mixer, seeds in todo.items():
        for seed in seeds:
            by_seed.setdefault(seed, []).append(mixer)
    return [
        f"final runs of seed {seed} for " + ("every mixer" if set(names) >= set(mixers) else _names(names))
        for seed, names in sorted(by_seed.items())
    ]


def _wrapped(lines: list[str]) -> str:
    return "\n".join(textwrap.fill(line, 110, subsequent_indent="    ") for line in lines)


def status_report(summary: dict) -> str:
    """What the summary holds and what it does not yet (with the command that resumes the study)."""
    runs = plan(quick=summary.get("quick", False))
    todo = summary["pending"] if "pending" in summary else pending(summary)
    counts = {kind: (len(runs[kind]) - sum(map(len, todo[kind].values())), len(runs[kind])) for kind in runs}
    kind = "quick study (one seed, step caps of 300)" if summary.get("quick") else "full study"
    if not summary.get("stored", True):
        lines = [f"no stored summary ({summary.get('path', STUDY_PATH.name)}): nothing has been run yet"]
    else:
        lines = [
            f"stored summary {summary.get('path', STUDY_PATH.name)} ({kind}): learning-rate sweep "
            f"{counts['sweep'][0]} of {counts['sweep'][1]} runs, final runs {counts['final'][0]} of "
            f"{counts['final'][1]}, state sweep {counts['state'][0]} of {counts['state'][1]}"
        ]
    parts = []
    if todo["sweep"]:
        parts.append("sweep of " + "; ".join(f"{m} (lr {_lrs(lrs)})" for m, lrs in todo["sweep"].items()))
    parts += _final_todo(todo["final"], [r.mixer for r in runs["final"]])
    if todo["state"]:
        parts.append(
            "state sweep of " + "; ".join(f"{m} (d_model {_lrs(w)})" for m, w in todo["state"].items())
        )
    if parts:
        lines.append("not yet run: " + "; ".join(parts))
        lines.append(f"resume with `{COMMAND}` (cached runs are kept)")
    else:
        lines.append("every run of the plan is in the summary")
    return _wrapped(lines)


def sweep_report(summary: dict) -> str:
    """The learning-rate sweep at T = 64: per mixer the best accuracy, its learning rate, how the run
    stopped and after how many steps, and every learning rate tried; then the mixers grouped by outcome."""
    rows = sweep_best(summary)
    if not rows:
        return "no learning-rate sweep in the summary" + (
            " (the quick study has none)" if summary.get("quick") else ""
        )
    cap = (
        max(r["steps"] for r in rows if r["stop"] == "cap") if any(r["stop"] == "cap" for r in rows) else None
    )
    lines = [f"learning-rate sweep, T = 64 (4 pairs), one seed: the best of {_lrs(SWEEP_LRS)}"]
    lines.append(f"{'mixer':>16}  {'best':>5}  {'lr':>6}  {'stopped':>9}  {'steps':>5}   accuracy per lr")
    for r in rows:
        tried = "  ".join(f"{lr:g}: {a:.2f}" for lr, a in r["tried"].items())
        tried += "" if r["complete"] else "  (sweep incomplete)"
        lines.append(
            f"{r['mixer']:>16}  {r['accuracy']:>5.2f}  {r['lr']:>6g}  {r['stop']:>9}  "
            f"{r['steps']:>5}   {tried}"
        )
    target = summary.get("target", TARGET)
    converged = [r["mixer"] for r in rows if r["stop"] == "converged"]
    capped = [r for r in rows if r["stop"] == "cap"]
    plateau = [r for r in rows if r["stop"] == "plateau"]
    lines.append(f"reached {target} (converged): {_names(converged)}")
    if capped:
        lines.append(
            f"did not reach {target} within the step cap ({cap}): "
            + ", ".join(f"{r['mixer']} {r['accuracy']:.2f}" for r in capped)
        )
    if plateau:
        lines.append(
            "stopped on a plateau (no gain over its last evaluations) below "
            f"{target}: " + ", ".join(f"{r['mixer']} {r['accuracy']:.2f}" for r in plateau)
        )
    return _wrapped(lines)


def final_report(summary: dict) -> str:
    """The final runs: per mixer and length the mean accuracy over seeds with its min-max, how each
    seed's run stopped and its steps, and the decoding state at the longest length; then the mixers
    and seeds not yet trained."""
    rows = final_rows(summary)
    lengths = summary.get("lengths", list(LENGTHS))
    lines = []
    if rows:
        lines.append(
            "final runs, trained on every length at once (num_pairs = T/16), mean [min-max] over seeds:"
        )
        header = "  ".join(f"{f'T={T}':^17}" for T in lengths)
        lines.append(
            f"{'mixer':>16}  {header}  {'seeds':>5}  stopped (steps)        state at T={lengths[-1]}"
        )
        for r in rows:
            cells = []
            for T in lengths:
                c = r["accuracy"].get(T)
                cells.append(f"{c['mean']:.2f} [{c['min']:.2f}-{c['max']:.2f}]" if c else f"{'-':^17}")
            stops = ", ".join(f"{s} ({n})" for s, n in zip(r["stops"], r["steps"]))
            state = r["accuracy"].get(lengths[-1], {}).get("state_bytes")
            lines.append(
                f"{r['mixer']:>16}  {'  '.join(cells)}  {len(r['seeds']):>5}  {stops:<22} "
                f"{format_bytes(state) if state else '-':>10}"
            )
        target = summary.get("target", TARGET)
        everywhere = [r["mixer"] for r in rows if all(c["min"] >= 0.95 for c in r["accuracy"].values())]
        capped = [r["mixer"] for r in rows if "cap" in r["stops"]]
        lines.append(f"every seed at least 0.95 at every length: {_names(everywhere)}")
        if capped:
            lines.append(
                f"a seed stopped at the step cap before reaching {target} at every length "
                f"(not learned within this budget): {_names(capped)}"
            )
    else:
        lines.append("no final runs in the summary yet")
    todo = (summary["pending"] if "pending" in summary else pending(summary))["final"]
    if todo:
        mixers = [r.mixer for r in plan(quick=summary.get("quick", False))["final"]]
        lines.append("not yet run: " + "; ".join(_final_todo(todo, mixers)))
        lines.append(f"resume with `{COMMAND}`")
    return _wrapped(lines)


def state_report(summary: dict) -> str:
    """The state sweep: accuracy against decoding-state bytes per mixer and width."""
    rows = state_rows(summary)
    lines = []
    if rows:
        lines.append(f"state sweep at T = {rows[0]['T']}: accuracy against the decoding state (bytes)")
        for r in rows:
            lines.append(
                f"{r['mixer']:>16}  d_model {r['d_model']:>4}  state {format_bytes(r['state_bytes']):>10}  "
                f"accuracy {r['accuracy']:.2f}  ({r['stop']}, {r['steps']} steps)"
            )
    else:
        lines.append("no state sweep in the summary yet")
    todo = (summary["pending"] if "pending" in summary else pending(summary))["state"]
    if todo:
        lines.append("not yet run: " + "; ".join(f"{m} (d_model {_lrs(w)})" for m, w in todo.items()))
        lines.append(f"resume with `{COMMAND}`")
    return _wrapped(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.studies.recall_study",
        description="Train every token mixer on MQAR until it converges (cached, resumable).",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, step caps of 300, no sweep (~15 min)")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one thread each (default 2)")
    parser.add_argument("--mixers", nargs="+", default=list(RECALL_MIXERS), choices=RECALL_MIXERS)
    parser.add_argument("--placement", default="uniform", choices=PLACEMENTS)
    parser.add_argument("--out", type=Path, help="summary JSON (default results/recall_study[_quick].json)")
    parser.add_argument(
        "--summarise", action="store_true", help="train nothing: summarise the runs cached so far"
    )
    args = parser.parse_args(argv)
    out = args.out or (RESULTS_DIR / ("recall_study_quick.json" if args.quick else "recall_study.json"))

    def store(summary: dict) -> None:
        out.write_text(json.dumps(summary, indent=1))

    summary = run_study(
        quick=args.quick,
        mixers=args.mixers,
        placement=args.placement,
        jobs=args.jobs,
        on_progress=store,
        train=not args.summarise,
    )
    store(summary)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
