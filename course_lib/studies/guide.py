"""Chapter 08's decision guide: recommendations derived from the stored measurements.

The guide answers "which attention should I use?" for one sequence of a Llama-2-7B-shaped decoder
(:data:`REFERENCE_MODEL`), a memory budget for its KV cache, whether attention must be exact and
whether the workload is decode-heavy. The cache arithmetic picks the branch; every branch's
reason quotes numbers read off the stored results, never typed in:

- :func:`measured_evidence` reads chapter 08's comparison (``results/all_small.json``: time, peak
  memory and KV cache / state bytes per phase) into :class:`Finding` s, each with the measurement
  it comes from;
- :func:`recall_quality` reads the recall study (``results/recall_study.json``, see
  :mod:`course_lib.studies.recall_study`) for quality per state byte: its final runs where the
  summary holds them, else the learning-rate sweep's best run per mixer at T = 64, and says which;
- :func:`recommend` applies the rules to one workload; :func:`rules` lists every rule with the
  findings behind it (the notebook prints them).

The widget ``course_lib.widgets.ch08.decision_guide`` only adds the controls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import catalogue
from ..checks import check_bool, check_float, check_int
from ..measure import Measurement, format_bytes, loglog_slope
from ..recall import RECALL_MIXERS
from ..recall import state_bytes as recall_state_bytes
from ..results import load_payload, load_results
from . import recall_study
from .phases import by_phase, state_bytes

__all__ = [
    "REFERENCE_MODEL",
    "RECALL_STUDY",
    "RECALL_THRESHOLD",
    "Finding",
    "kv_cache_bytes_per_token",
    "measured_evidence",
    "recall_quality",
    "quality_per_state",
    "recall_evidence",
    "evidence",
    "recommend",
    "rules",
]

# A Llama-2-7B-shaped decoder (32 layers, 32 heads of 128) in 16-bit; GQA keeps 8 KV heads.
REFERENCE_MODEL = {"layers": 32, "heads": 32, "kv_heads_gqa": 8, "head_dim": 128, "bytes": 2}
RECALL_STUDY = recall_study.STUDY_PATH
RECALL_THRESHOLD = 0.9  # "recalls": at least this answer accuracy
EXACT = ("attention", "sdpa", "flash_attention")  # the exact mechanisms of the comparison
COMPACT = ("mqa", "gqa", "mla")


@dataclass(frozen=True)
class Finding:
    """One number-backed statement: ``text`` (with the numbers) and ``source`` (which measurement)."""

    key: str
    text: str
    source: str


def kv_cache_bytes_per_token(kv_heads: int) -> int:
    """K and V bytes per token of :data:`REFERENCE_MODEL` with ``kv_heads`` key/value heads."""
    m = REFERENCE_MODEL
    return 2 * m["layers"] * check_int(kv_heads, "kv_heads", min=1) * m["head_dim"] * m["bytes"]


# --- what the comparison measured -----------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _slope(rows: Sequence[Measurement]) -> float | None:
    points = [(r.T, r.seconds) for r in rows if r.seconds]
    return loglog_slope(*zip(*points)) if len(points) >= 2 else None


def measured_evidence(results: Sequence[Measurement] | None = None, *, name: str = "all_small.json") -> dict:
    """The findings the rules cite, from the measurements of ``python -m course_lib.bench all``
    (default: the stored ``results/all_small.json``; ``name`` is how a source is cited). A finding
    whose mechanisms were not measured is left out."""
    results = load_results() if results is None else results
    phases = {
        phase: {
            mechanism: sorted((r for r in rows if r.method == mechanism), key=lambda r: r.T)
            for mechanism in dict.fromkeys(r.method for r in rows)
        }
        for phase, rows in by_phase(results).items()
    }
    found: dict[str, Finding] = {}

    def at(phase: str, mechanism: str, T: int) -> Measurement | None:
        return next((r for r in phases.get(phase, {}).get(mechanism, []) if r.T == T), None)

    # Exact attention: the fused kernel against the naive one and the course's FlashAttention.
    for phase in ("train", "prefill"):
        measured = phases.get(phase, {})
        exact = [m for m in EXACT if m in measured]
        if "sdpa" not in exact or len(exact) < 2:
            continue
        T = max(set.intersection(*({r.T for r in measured[m]} for m in exact)))
        rows = {m: at(phase, m, T) for m in exact}
        fastest = min(rows, key=lambda m: rows[m].seconds)
        others = ", ".join(
            f"{m} {_ms(r.seconds)} ({r.seconds / rows[fastest].seconds:.1f}x), "
            f"peak {format_bytes(r.peak_bytes)}"
            for m, r in rows.items()
            if m != fastest
        )
        found[f"exact_{phase}"] = Finding(
            f"exact_{phase}",
            f"{phase}, T={T}: the fastest exact mechanism was {fastest} ({_ms(rows[fastest].seconds)}, "
            f"peak {format_bytes(rows[fastest].peak_bytes)}); {others}",
            f"{name}: {phase} phase, exact mechanisms at T={T}",
        )

    # Exact decoding reads the whole cache: its step grows with the context.
    decode = phases.get("decode", {})
    if "sdpa" in decode and len(decode["sdpa"]) >= 2:
        first, last = decode["sdpa"][0], decode["sdpa"][-1]
        found["exact_decode"] = Finding(
            "exact_decode",
            f"one exact decoding step (sdpa) took {_ms(first.seconds)} at a context of {first.T} and "
            f"{_ms(last.seconds)} at {last.T} ({last.seconds / first.seconds:.0f}x, slope "
            f"{_slope(decode['sdpa']):.2f}): it reads a KV cache of {format_bytes(_state(last))}",
            f"{name}: decode phase, sdpa at T={first.T} and T={last.T}",
        )

    # The compact caches: fewer key/value heads or a latent, the same exact attention.
    compact = [m for m in COMPACT if m in decode and "attention" in decode]
    if compact:
        T = max(r.T for r in decode["attention"])
        base = at("decode", "attention", T)
        parts = []
        for m in compact:
            r = at("decode", m, T)
            if r is None or base is None:
                continue
            share = _state(r) / _state(base) if _state(base) else float("nan")
            parts.append(
                f"{m} keeps {share:.0%} of multi-head attention's cache ({format_bytes(_state(r))}), "
                f"its step took {r.seconds / base.seconds:.2f}x naive attention's"
            )
        layers = [m for m in compact if catalogue.get(m).layer]
        note = f" ({', '.join(layers)}: a whole layer, projections included)" if layers else ""
        found["compact_cache"] = Finding(
            "compact_cache",
            f"decode at T={T}, H = 4 heads: " + "; ".join(parts) + note,
            f"{name}: decode phase at T={T}, state_bytes of each measurement",
        )

    # Fixed-size states: the decoding step does not grow with the context.
    stateful = [m for m in decode if _decode_kind(m) == "state"]
    slopes = [s for m in stateful if (s := _slope(decode[m])) is not None]
    if slopes and "sdpa" in decode:
        T = max(r.T for r in decode["sdpa"])
        ratios = {
            m: r.seconds / at("decode", "sdpa", T).seconds for m in stateful if (r := at("decode", m, T))
        }
        best = min(ratios, key=ratios.get)
        found["state_decode"] = Finding(
            "state_decode",
            f"the {len(stateful)} recurrent decoding steps grew with slopes {min(slopes):.2f} to "
            f"{max(slopes):.2f} in the context; at T={T} they took {min(ratios.values()):.2f}x to "
            f"{max(ratios.values()):.2f}x sdpa's step (fastest: {best}), from a state of "
            f"{format_bytes(_state(at('decode', best, T)))}",
            f"{name}: decode phase, every decode='state' mechanism and sdpa",
        )
    if "sliding_window" in decode:
        rows = decode["sliding_window"]
        found["window_decode"] = Finding(
            "window_decode",
            f"the sliding window's step took {_ms(rows[0].seconds)} at a context of {rows[0].T} and "
            f"{_ms(rows[-1].seconds)} at {rows[-1].T} (slope {_slope(rows):.2f}), with a cache capped at "
            f"{format_bytes(_state(rows[-1]))}",
            f"{name}: decode phase, sliding_window at T={rows[0].T}..{rows[-1].T}",
        )

    # The chunk forms against the fused exact kernel: where they overtake it.
    for phase in ("prefill", "train"):
        measured = phases.get(phase, {})
        if "sdpa" not in measured:
            continue
        chunked = [m for m in measured if _decode_kind(m) == "state" and "chunk" in catalogue.get(m).forms]
        crossings = {}
        for m in chunked:
            wins = [r.T for r in measured[m] if (s := at(phase, "sdpa", r.T)) and r.seconds < s.seconds]
            if wins:
                crossings[m] = min(wins)
        if crossings:
            earliest = min(crossings.values())
            names = sorted(m for m, T in crossings.items() if T == earliest)
            slopes = [s for m in chunked if (s := _slope(measured[m])) is not None]
            found[f"chunk_{phase}"] = Finding(
                f"chunk_{phase}",
                f"{phase}: {len(crossings)} of {len(chunked)} chunk forms beat sdpa at some T measured, "
                f"the earliest from T={earliest} ({', '.join(names)}); the chunk forms' times grew with "
                f"slopes {min(slopes):.2f} to {max(slopes):.2f}, sdpa's with {_slope(measured['sdpa']):.2f}",
                f"{name}: {phase} phase, chunk forms vs sdpa",
            )
    return found


def _state(r: Measurement | None) -> int | None:
    if r is None:
        return None
    if "state_bytes" in r.extra:
        return r.extra["state_bytes"]
    try:  # an older result without it: the catalogue's number
        return state_bytes(r.method.split(":")[-1], r.T)
    except ValueError:
        return None


def _decode_kind(name: str) -> str | None:
    try:
        return catalogue.get(name).decode
    except ValueError:  # a name the catalogue does not know (a hand-made result)
        return None


# --- the recall results (quality per state byte) ------------------------------------------------
# The recall study's summary may be partial while the study runs (see recall_study.pending): the
# final runs of some mixers only, or the learning-rate sweep only. The guide uses the best measurement
# the summary holds and names it in every finding's source.


def recall_quality(path: str | Path | None = None) -> dict:
    """The recall results for quality per state byte, from the recall study's summary
    (default ``results/recall_study.json``) or the file ``path``.

    Returns ``{"source": file name, "measurement": which runs, "rows": {(mixer, T): {"accuracy",
    "state_bytes", "fixed"}}, "missing": mixers without a row}``. A mixer with final runs in the
    summary has their rows (mean accuracy over seeds at every length); one without (a study still
    running) has the learning-rate sweep's best run at T = 64 (one seed), and ``measurement`` says
    which mixers rest on which. ``fixed``: the decoding state does not grow with T.
    A file of ``python -m course_lib.bench recall`` (the old 600-step grid) is read too, given its path.
    No file: ``FileNotFoundError``.
    """
    if path is None:
        path = RECALL_STUDY
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    payload = json.loads(path.read_text())
    if "sweep" not in payload:  # a bench suite's file: one 600-step run per mixer and length
        rows = _grid_rows(load_payload(path))
        measurement = "one run per mixer and length (bench recall grid)"
    elif payload.get("table"):
        rows = _study_rows(payload)
        seeds = sorted({s for entry in payload["table"].values() for s in entry["seeds"]})
        measurement = f"final runs, mean over seeds {', '.join(map(str, seeds))}"
        swept = {k: v for k, v in _sweep_rows(payload).items() if k[0] not in payload["table"]}
        if swept:
            rows.update(swept)
            measurement += (
                f" ({', '.join(payload['table'])}); learning-rate sweep at T=64, one seed, for "
                f"{', '.join(dict.fromkeys(m for m, _ in swept))}"
            )
    else:
        rows = _sweep_rows(payload)
        measurement = "learning-rate sweep, best of each mixer's learning rates at T=64, one seed"
    present = {mixer for mixer, _ in rows}
    return {
        "source": path.name,
        "measurement": measurement,
        "rows": rows,
        "missing": [m for m in RECALL_MIXERS if m not in present],
    }


def _fixed(mixer: str) -> bool:
    """The recall model's decoding state is the same at the study's shortest and longest lengths."""
    lengths = recall_study.LENGTHS
    return recall_state_bytes(mixer, lengths[-1]) <= recall_state_bytes(mixer, lengths[0])


def _study_rows(payload: dict) -> dict:
    return {
        (mixer, int(T)): {
            "accuracy": cell["mean"],
            "state_bytes": cell["state_bytes"],
            "fixed": _fixed(mixer),
        }
        for mixer, entry in payload["table"].items()
        for T, cell in entry["accuracy"].items()
    }


def _sweep_rows(payload: dict) -> dict:
    return {
        (row["mixer"], 64): {
            "accuracy": row["accuracy"],
            "state_bytes": recall_state_bytes(row["mixer"], 64),
            "fixed": _fixed(row["mixer"]),
        }
        for row in recall_study.sweep_best(payload)
    }


def _grid_rows(payload: dict) -> dict:
    return {
        (r["method"], r["T"]): {"accuracy": r["extra"]["accuracy"], "state_bytes": r["extra"]["state_bytes"]}
        for r in payload["results"]
    }


def quality_per_state(quality: Mapping, T: int | None = None) -> list[dict]:
    """The mixers at length ``T`` (default: the longest), best recall first (ties: smaller state):
    ``mixer``, ``accuracy``, ``state_bytes``, ``fixed`` (the state does not grow with T: the row's
    own flag, else the state at the shortest length against T's) and ``per_kib`` (accuracy per KiB
    of state)."""
    rows = quality["rows"]
    lengths = sorted({t for _, t in rows})
    if not lengths:
        raise ValueError("quality holds no recall result")
    T = lengths[-1] if T is None else check_int(T, "T", min=1)
    if T not in lengths:
        raise ValueError(f"T={T} is not a length of the recall results ({lengths})")
    table = []
    for (mixer, t), row in rows.items():
        if t != T:
            continue
        shortest = rows.get((mixer, lengths[0]), row)["state_bytes"]
        table.append(
            {
                "mixer": mixer,
                "accuracy": row["accuracy"],
                "state_bytes": row["state_bytes"],
                "fixed": row.get("fixed", row["state_bytes"] <= shortest),
                "per_kib": row["accuracy"] / (row["state_bytes"] / 1024),
            }
        )
    return sorted(table, key=lambda r: (-round(r["accuracy"], 2), r["state_bytes"]))


def recall_evidence(quality: Mapping | None = None) -> dict[str, Finding]:
    """The recall findings: at the longest length measured, the best fixed-size state and what a KV
    cache of every token gave (quality per state byte). The source names the measurement (final runs
    or the sweep) and the text the mixers not yet measured. No stored study and no ``quality``: none."""
    if quality is None:
        if not RECALL_STUDY.exists():
            return {}
        quality = recall_quality()
    if not quality["rows"]:
        return {}
    # The longest length at which fixed-state mixers were measured (with a study still running, the
    # sweep's T = 64 may be the only length most mixers have).
    for T in sorted({t for _, t in quality["rows"]}, reverse=True):
        table = quality_per_state(quality, T)
        if any(r["fixed"] for r in table):
            break
    fixed = [r for r in table if r["fixed"]]
    growing = [r for r in table if not r["fixed"]]
    if not fixed:
        return {}
    best = fixed[0]
    recalls = [r["mixer"] for r in fixed if r["accuracy"] >= RECALL_THRESHOLD]
    cache = (
        "; with a cache that grows with T: "
        + ", ".join(f"{r['mixer']} {r['accuracy']:.2f} ({format_bytes(r['state_bytes'])})" for r in growing)
        if growing
        else ""
    )
    missing = quality.get("missing", [])
    not_yet = f" (not yet measured: {', '.join(missing)})" if missing else ""
    text = (
        f"MQAR at T={T}: the best fixed-size state was {best['mixer']} ({best['accuracy']:.2f} with "
        f"{format_bytes(best['state_bytes'])}); fixed states reaching {RECALL_THRESHOLD}: "
        f"{', '.join(recalls) if recalls else 'none'}{cache}{not_yet}"
    )
    measurement = f"{quality['measurement']}; " if quality.get("measurement") else ""
    source = f"{quality['source']}: {measurement}answer accuracy and state bytes at T={T}"
    return {
        "recall": Finding("recall", text, source),
        "_best_fixed_state": Finding("_best_fixed_state", best["mixer"], quality["source"]),
    }


def evidence(results: Sequence[Measurement] | None = None, quality: Mapping | None = None) -> dict:
    """Every finding: :func:`measured_evidence` and :func:`recall_evidence` (stored results by default)."""
    return {**measured_evidence(results), **recall_evidence(quality)}


# --- the rules ------------------------------------------------------------------------------------

# Each rule: the chapter, the recommendation, the reason, and the findings it cites.
_RULES = {
    "fits": (
        "03",
        "exact attention with a fused kernel (SDPA / FlashAttention)",
        "the cache fits: exact attention is affordable; a fused kernel keeps its O(T^2 d) compute but "
        "O(T) extra memory, while naive attention's memory grows as T^2",
        ("exact_train", "exact_prefill"),
    ),
    "compact": (
        "04",
        "exact attention with GQA (or MLA) and a KV cache",
        "decoding is bound by reading the KV cache; fewer key/value heads or a latent shrink it "
        "with exact attention (MQA/GQA/MLA save memory and bandwidth, not attention FLOPs)",
        ("exact_decode", "compact_cache"),
    ),
    "ring": (
        "08",
        "ring attention over several devices (sequence parallelism), GQA cache",
        "exact attention is required but one device's budget cannot hold the cache: split the sequence "
        "(section 4 runs it across processes; zig-zag shards balance the causal work)",
        ("exact_decode",),
    ),
    "hybrid": (
        "08",
        "a hybrid: sliding-window or recurrent layers with a few full-attention layers",
        "a fixed-size state keeps decoding flat in the context, but fixed states recall less as pairs "
        "grow; a few global layers keep exact retrieval",
        ("state_decode", "window_decode", "recall"),
    ),
    "recurrent": (
        "07",
        "a linear recurrence with a fixed-size state ({best}: the best recall per state byte in the "
        "recall results) or a hybrid stack",
        "the cache does not fit and approximation is acceptable: the chunk forms run in O(T) time with "
        "a constant state; pick the state with the best recall per byte",
        ("chunk_prefill", "chunk_train", "state_decode", "recall"),
    ),
}


def _rule(key: str, found: Mapping[str, Finding]) -> dict:
    chapter, recommendation, reason, cited = _RULES[key]
    best = found.get("_best_fixed_state")
    recommendation = recommendation.format(best=best.text if best else "Gated DeltaNet, Mamba-2")
    backed = [found[k] for k in cited if k in found]
    missing = [k for k in cited if k not in found]
    return {
        "rule": key,
        "chapter": chapter,
        "recommendation": recommendation,
        "reason": reason,
        "evidence": [f.text for f in backed],
        "backed_by": [f.source for f in backed],
        "not_measured": missing,
    }


def rules(found: Mapping[str, Finding] | None = None) -> list[dict]:
    """Every rule of the guide with its findings (``evidence``) and their sources (``backed_by``);
    ``not_measured`` names the findings these results could not give."""
    found = evidence() if found is None else found
    return [_rule(key, found) for key in _RULES]


def recommend(
    seq_len: int = 4096,
    memory_gib: float = 8.0,
    exact: bool = True,
    decode_heavy: bool = False,
    *,
    found: Mapping[str, Finding] | None = None,
) -> dict:
    """The recommendation for one sequence of ``seq_len`` tokens of :data:`REFERENCE_MODEL` with a
    KV-cache budget of ``memory_gib`` GiB.

    The multi-head cache fits and decoding is not the bottleneck -> a fused exact kernel; the GQA
    cache fits -> GQA/MLA; neither fits -> ring attention when exactness is required, else a
    hybrid (decode-heavy) or a gated recurrence. Returns the rule's ``recommendation``,
    ``reason``, ``chapter``, ``evidence`` and ``backed_by`` (see :func:`rules`), and the cache
    arithmetic: ``mha_cache``, ``gqa_cache`` (bytes) and ``numbers``.
    """
    T = check_int(seq_len, "seq_len", min=1)
    budget = check_float(memory_gib, "memory_gib", min=0.0, min_open=True) * 2**30
    check_bool(exact, "exact")
    check_bool(decode_heavy, "decode_heavy")
    found = evidence() if found is None else found
    mha = T * kv_cache_bytes_per_token(REFERENCE_MODEL["heads"])
    gqa = T * kv_cache_bytes_per_token(REFERENCE_MODEL["kv_heads_gqa"])
    if mha <= budget and not decode_heavy:
        key = "fits"
    elif gqa <= budget:
        key = "compact"
    elif exact:
        key = "ring"
    elif decode_heavy:
        key = "hybrid"
    else:
        key = "recurrent"
    return {
        **_rule(key, found),
        "mha_cache": mha,
        "gqa_cache": gqa,
        "numbers": (
            f"MHA cache {format_bytes(mha)}, GQA cache {format_bytes(gqa)}, budget {format_bytes(budget)}"
        ),
    }
