"""Score the research hypotheses H1..H5 from a run's files (validated records, as their JSON dicts).

Each hypothesis yields ``{id, statement, value, threshold, direction, status, evidence, note}`` with status
``PASS`` | ``WARN`` (the measurement passes but the sample is smaller than the hypothesis asks for) | ``FAIL`` |
``UNAVAILABLE`` (an input is missing; nothing is ever guessed). Thresholds come from ``thresholds.yaml``; the
sample sizes (20 seeds, 32 variants) and H2's quality bound (5%) are part of the hypotheses' statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from fragcli.thresholds import Thresholds
from fragcli.thresholds import finite_number as _num

PASS, WARN, FAIL, UNAVAILABLE = "PASS", "WARN", "FAIL", "UNAVAILABLE"
STATUSES = (PASS, WARN, FAIL, UNAVAILABLE)

H2_QUALITY_LOSS_MAX = 0.05  # "<5% quality loss": relative CLIP-score drop
H2_SEEDS = 20  # "... over 20 seeds"
H3_MIN_PROMPTS = 5  # fewer paraphrases than this give too coarse a pass rate: WARN
H4_VARIANTS = 32  # "... for 32 variants"
H1_UNIT = "attention_heads"  # H1 is a statement about heads: it reads the technique summary with this unit


class Source(NamedTuple):
    """A validated file as its JSON dict, where it came from (``path``, shown as evidence) and its full path."""

    path: str
    data: dict[str, Any]
    file: str = ""


def removed_fractions(data: dict[str, Any] | None) -> dict[str, float]:
    """``{unit: removed_fraction}`` from a record's ``techniques`` summaries (the first technique per unit)."""
    out: dict[str, float] = {}
    for t in (data or {}).get("techniques") or []:
        summary = t.get("summary") if isinstance(t, dict) else None
        unit = summary.get("unit") if isinstance(summary, dict) else None
        value = _num(summary.get("removed_fraction")) if unit else None
        if unit and value is not None:
            out.setdefault(unit, value)
    return out


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def _result(hid: str, statement: str, value: float | None, threshold: float, direction: str, status: str,
            evidence: str, note: str = "") -> dict[str, Any]:
    return {"id": hid, "statement": statement, "value": value, "threshold": threshold, "direction": direction,
            "status": status, "evidence": evidence, "note": note}


def _seeds(validation: dict[str, Any]) -> int:
    seeds = validation.get("seeds")
    if isinstance(seeds, list):
        return len(seeds)
    per = validation.get("per_image")
    return len(per) if isinstance(per, list) else 0


def h1_head_prunable(points: Sequence[Source], th: Thresholds) -> dict[str, Any]:
    """H1: the largest fraction of attention heads removed (the ``attention_heads`` technique summary) whose
    aggregate clip_delta_rel >= -clip_delta_max."""
    gate, tol = th.head_prunable_min, th.clip_delta_max.value
    statement = (f"at least {_pct(gate.value)} of attention heads can be removed with at most "
                 f"{_pct(tol)} CLIP-score drop")

    def done(value, status, evidence, note=""):
        return _result("H1", statement, value, gate.value, gate.direction, status, evidence, note)

    if not points:
        return done(None, UNAVAILABLE, "no validation.json found", "run frag validate (or a sweep of fractions)")
    measured = [(p, removed_fractions(p.data).get(H1_UNIT), _num(_get(p.data, "aggregate", "clip_delta_rel")))
                for p in points]
    if all(f is None for _, f, _ in measured):
        return done(None, UNAVAILABLE, f"{len(points)} validation file(s), none with a technique that removes "
                    f"{H1_UNIT}", f"no technique summary with unit {H1_UNIT}: H1 is about head pruning")
    usable = [(p, f, d) for p, f, d in measured if f is not None and d is not None]
    if not usable:
        reason = _get(points[0].data, "unavailable", "clip") or "no clip_delta_rel"
        return done(None, UNAVAILABLE, f"{len(points)} validation file(s), none with a CLIP delta",
                    f"CLIP unavailable: {reason}")
    passing = [(p, f, d) for p, f, d in usable if d >= -tol]
    tested_max = max(f for _, f, _ in usable)
    if passing:
        best = max(passing, key=lambda x: x[1])
        value = best[1]
        evidence = f"{best[0].path}: {H1_UNIT} removed_fraction {best[1]:.3f}, clip_delta_rel {best[2]:+.4f}"
    else:
        value, evidence = 0.0, f"no tested fraction kept the CLIP drop within {_pct(tol)}"
    evidence += f" ({len(usable)} point(s) tested, up to {tested_max:.3f})"
    if gate.passes(value):
        return done(value, PASS, evidence)
    if len(passing) == len(usable) and tested_max < gate.value:
        return done(value, WARN, evidence, f"every tested fraction passed but none reached {gate.value:g}: "
                    "sweep larger fractions")
    return done(value, FAIL, evidence)


def _reduction(primary: Source | None, bench: Source | None, manifest: Source | None) -> tuple[float | None, str]:
    """The best memory reduction on record and where it came from."""
    found: list[tuple[float, str]] = []
    perf = _get(manifest.data if manifest else None, "performance")  # the manifest's copy of a bench run
    for src, data, prefix in ((bench, bench.data if bench else None, ""), (manifest, perf, "performance.")):
        if found or not isinstance(data, dict):
            continue
        for key in ("weight_reduction", "peak_memory_reduction"):
            v = _num(data.get(key))
            if v is not None:
                found.append((v, f"{src.path}: {prefix}{key} {v:.3f}"))
    if not found:
        for src in (primary, manifest):
            before = _num(_get(src.data if src else None, "weight_bytes", "before"))
            after = _num(_get(src.data if src else None, "weight_bytes", "after"))
            if before and after is not None:
                found.append((1 - after / before, f"{src.path}: weight_bytes {after:.0f}/{before:.0f}"))
                break
    if not found:
        return None, "no bench.json or weight_bytes found"
    return max(found, key=lambda x: x[0])


def h2_memory(primary: Source | None, bench: Source | None, manifest: Source | None, th: Thresholds) -> dict[str, Any]:
    """H2: weight or peak-memory reduction >= vram_reduction_min with < 5% CLIP drop over >= 20 seeds."""
    gate = th.vram_reduction_min
    statement = (f"a fragment needs at least {_pct(gate.value)} less weight or peak memory with less than "
                 f"{_pct(H2_QUALITY_LOSS_MAX)} quality loss over {H2_SEEDS} seeds")
    value, evidence = _reduction(primary, bench, manifest)

    def done(status, note=""):
        return _result("H2", statement, value, gate.value, gate.direction, status, evidence, note)

    if value is None:
        return done(UNAVAILABLE, "run frag bench (or frag validate) to measure memory")
    if not gate.passes(value):
        return done(FAIL, f"reduction {value:.3f} < {gate.value:g}")
    delta = _num(_get(primary.data if primary else None, "aggregate", "clip_delta_rel"))
    if delta is None:
        why = _get(primary.data, "unavailable", "clip") if primary else "no validation.json found"
        return done(UNAVAILABLE, f"memory passes but quality is unmeasured ({why or 'no clip_delta_rel'})")
    evidence += f"; {primary.path}: clip_delta_rel {delta:+.4f}"
    if -delta >= H2_QUALITY_LOSS_MAX:
        return done(FAIL, f"quality loss {-delta:.3f} >= {H2_QUALITY_LOSS_MAX:g}")
    seeds = _seeds(primary.data)
    if seeds < H2_SEEDS:
        return done(WARN, f"only {seeds} seed(s) validated; the hypothesis asks for {H2_SEEDS}")
    return done(PASS, f"{seeds} seeds validated")


def h3_reuse(primary: Source | None, manifest: Source | None, th: Thresholds) -> dict[str, Any]:
    """H3: pass rate on paraphrased prompts (validation.json ``paraphrases``, else the manifest's ``reuse``)
    >= reuse_pass_rate_min."""
    gate = th.reuse_pass_rate_min
    statement = f"a fragment passes on paraphrased prompts at a rate of at least {_pct(gate.value)}"
    value, prompts, evidence = None, None, "no paraphrases in validation.json"
    para = _get(primary.data if primary else None, "paraphrases")
    if isinstance(para, dict) and _num(para.get("pass_rate")) is not None:
        value = _num(para["pass_rate"])
        prompts = len(para.get("prompts") or para.get("per_prompt") or [])
        evidence = f"{primary.path}: paraphrases.pass_rate {value:.3f} over {prompts} prompt(s)"
    elif manifest is not None and _num(_get(manifest.data, "reuse", "paraphrase_pass_rate")) is not None:
        value = _num(manifest.data["reuse"]["paraphrase_pass_rate"])
        prompts = _get(manifest.data, "reuse", "paraphrases_tested")
        evidence = f"{manifest.path}: reuse.paraphrase_pass_rate {value:.3f} over {prompts} paraphrase(s)"

    def done(status, note=""):
        return _result("H3", statement, value, gate.value, gate.direction, status, evidence, note)

    if value is None:
        return done(UNAVAILABLE, "run frag validate with paraphrased prompts")
    if not gate.passes(value):
        return done(FAIL)
    if prompts is not None and prompts < H3_MIN_PROMPTS:
        return done(WARN, f"only {prompts} paraphrase(s); use at least {H3_MIN_PROMPTS} for a meaningful rate")
    return done(PASS)


def h4_throughput(bench: Source | None, th: Thresholds) -> dict[str, Any]:
    """H4: bench.json speedup >= batch_speedup_min with >= 32 variants."""
    gate = th.batch_speedup_min
    statement = f"a fragment gives at least {gate.value:g}x throughput when generating {H4_VARIANTS} prompt variants"
    value = _num(bench.data.get("speedup")) if bench else None
    variants = int(_num(bench.data.get("variants")) or 0) if bench else 0
    evidence = f"{bench.path}: speedup {value:.3f} over {variants} variant(s)" if value is not None else (
        "no bench.json found" if bench is None else f"{bench.path}: no speedup")

    def done(status, note=""):
        return _result("H4", statement, value, gate.value, gate.direction, status, evidence, note)

    if value is None:
        return done(UNAVAILABLE, "run frag bench")
    if not gate.passes(value):
        return done(FAIL)
    if variants < H4_VARIANTS:
        return done(WARN, f"only {variants} variant(s) benchmarked; the hypothesis asks for {H4_VARIANTS}")
    return done(PASS)


def h5_break_even(bench: Source | None, th: Thresholds) -> dict[str, Any]:
    """H5: bench.json break_even_images <= break_even_max_variants (null = the fragment is not faster)."""
    gate = th.break_even_max_variants
    statement = f"profiling + extraction pay for themselves within {gate.value:g} images"
    value = _num(bench.data.get("break_even_images")) if bench else None
    speedup = _num(bench.data.get("speedup")) if bench else None
    evidence = "no bench.json found" if bench is None else f"{bench.path}: break_even_images {value}"
    marginal = _num(bench.data.get("break_even_images_marginal")) if bench else None
    if bench is not None and marginal is not None:
        evidence += (f"; {marginal:.1f} crediting the profile's {bench.data.get('profile_images')} full-model images "
                     "(profile + extract - their full-model time) / seconds saved per image")

    def done(status, note=""):
        return _result("H5", statement, value, gate.value, gate.direction, status, evidence, note)

    if bench is None:
        return done(UNAVAILABLE, "run frag bench")
    if value is None:
        if speedup is not None and speedup <= 1.0:
            return done(FAIL, f"the fragment is not faster (speedup {speedup:.3f}): it never breaks even")
        return done(UNAVAILABLE, "bench.json has no break_even_images (profile/extract costs missing?)")
    return done(PASS if gate.passes(value) else FAIL)


def score_hypotheses(validations: Sequence[Source], primary: Source | None, bench: Source | None,
                     manifest: Source | None, th: Thresholds) -> list[dict[str, Any]]:
    """H1..H5 in order. ``validations``: every validation point (run + sweeps); ``primary``: the run's own."""
    return [
        h1_head_prunable(validations, th),
        h2_memory(primary, bench, manifest, th),
        h3_reuse(primary, manifest, th),
        h4_throughput(bench, th),
        h5_break_even(bench, th),
    ]
