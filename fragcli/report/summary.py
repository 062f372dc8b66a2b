"""Assemble ``metrics_summary.json`` (``_type: frag.report``, ``fragcli.records.ReportSummary``): quality,
performance, memory, hypotheses, gates, notes and provenance, from the (validated) files ``collect`` found.

Nothing here knows a technique: the fragment block lists every technique's summary, and the sweep points carry
the fraction of each unit (attention_heads, ...) the techniques removed."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from fragcli import __version__
from fragcli.hypotheses import FAIL, Source, removed_fractions, score_hypotheses
from fragcli.report.collect import RunFiles
from fragcli.thresholds import IMAGE_GATES, Thresholds
from fragcli.thresholds import finite_number as _num

LIBRARIES = ("torch", "diffusers", "transformers", "open_clip_torch", "lpips", "scikit-image", "imagehash",
             "numpy", "pyarrow", "matplotlib", "pydantic", "typer")
AGGREGATE_KEYS = {"clip_delta_rel": "clip_delta_rel", "lpips": "lpips_mean", "ssim": "ssim_mean",
                  "phash_distance": "phash_mean"}
SUMMARY_KEYS = ("unit", "units_removed", "units_total", "removed_fraction", "params_removed", "bytes_saved")


def _d(src: Source | None, *keys: str) -> Any:
    data: Any = src.data if src else None
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


MANIFEST_QUALITY = {"clip_delta_rel": "clip_delta_mean", "clip_full_mean": "clip_full_mean",
                    "clip_fragment_mean": "clip_fragment_mean", "lpips_mean": "lpips_mean", "ssim_mean": "ssim_mean",
                    "phash_mean": "phash_mean", "pass_rate": "pass_rate"}


def manifest_quality(manifest: Source | None) -> dict[str, Any] | None:
    """The quality block ``frag validate`` wrote into the fragment's manifest, in the report's terms (used when
    the run holds no validation.json: the manifest says what was measured)."""
    q = _d(manifest, "quality")
    if not isinstance(q, dict) or not q.get("samples"):
        return None
    reuse = _d(manifest, "reuse") or {}
    return {
        "source": f"{manifest.path} (quality block)", "mode": "physical", "prompt": _d(manifest, "profiling", "prompt"),
        "seeds": q.get("samples"), "removed_fraction": removed_fractions(manifest.data),
        "aggregate": {k: q.get(m) for k, m in MANIFEST_QUALITY.items()},
        "unavailable": dict(q.get("unavailable") or {}),
        "reuse_pass_rate": _num(reuse.get("paraphrase_pass_rate")), "paraphrases": reuse.get("paraphrases_tested", 0),
        "passed": q.get("thresholds_passed"),
    }


def quality_block(primary: Source | None, manifest: Source | None = None) -> dict[str, Any]:
    """The run's own validation, summarised (else the manifest's quality block, else nothing)."""
    if primary is None:
        return manifest_quality(manifest) or {"source": None}
    v = primary.data
    para = v.get("paraphrases") if isinstance(v.get("paraphrases"), dict) else None
    seeds = v.get("seeds") if isinstance(v.get("seeds"), list) else []
    return {
        "source": primary.path,
        "mode": v.get("mode"),
        "prompt": v.get("prompt"),
        "seeds": len(seeds) or len(v.get("per_image") or []),
        "removed_fraction": removed_fractions(v),
        "aggregate": dict(v.get("aggregate") or {}),
        "unavailable": dict(v.get("unavailable") or {}),
        "reuse_pass_rate": _num(para.get("pass_rate")) if para else None,
        "paraphrases": len(para.get("prompts") or para.get("per_prompt") or []) if para else 0,
        "passed": v.get("passed"),
    }


def _bench_runs(bench: Source | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """bench.json's baseline (the full model) and fragment entries of ``runs``."""
    runs = _d(bench, "runs") or {}
    return runs.get(_d(bench, "baseline") or "full") or {}, runs.get("fragment") or {}


def _contender(run: dict[str, Any]) -> dict[str, Any]:
    vs, fid = run.get("vs_baseline") or {}, run.get("fidelity") or {}
    return {"kind": run.get("kind"), "description": run.get("description") or "",
            "per_image_s": _num(run.get("per_image_s")), "speedup": _num(vs.get("speedup")),
            "speedup_range": vs.get("speedup_range"), "clip_delta_rel": _num(fid.get("clip_delta_rel")),
            "ssim_mean": _num(fid.get("ssim_mean")), "phash_mean": _num(fid.get("phash_mean")),
            "pass_rate": _num(fid.get("pass_rate"))}


def performance_block(bench: Source | None, profile: Source | None) -> dict[str, Any]:
    """Speed from bench.json (and profiling cost from context.json)."""
    out: dict[str, Any] = {"source": bench.path if bench else None}
    if bench is not None:
        b = bench.data
        full, frag = _bench_runs(bench)
        out.update({
            "device": b.get("device"), "variants": b.get("variants"), "steps": b.get("steps"),
            "repeats": b.get("repeats"),
            "full_per_image_s": _num(full.get("per_image_s")),
            "fragment_per_image_s": _num(frag.get("per_image_s")),
            "full_images_per_min": _num(full.get("images_per_min")),
            "fragment_images_per_min": _num(frag.get("images_per_min")),
            "speedup": _num(b.get("speedup")),
            "speedup_range": b.get("speedup_range"),
            "break_even_images": _num(b.get("break_even_images")),
            "break_even_images_marginal": _num(b.get("break_even_images_marginal")),
            "contenders": {name: _contender(r) for name, r in (b.get("runs") or {}).items()},
            "unavailable_contenders": {p: (b.get("unavailable") or {})[f"runs.{p}"] for p in b.get("peers") or []
                                       if f"runs.{p}" in (b.get("unavailable") or {})},
            "profile_cost_s": _num(b.get("profile_cost_s")),
            "extract_cost_s": _num(b.get("extract_cost_s")),
        })
    if profile is not None:
        out["profile_total_s"] = _num(_d(profile, "timings", "total_s"))
        out["profile_overhead_ratio"] = _num(_d(profile, "timings", "overhead_ratio"))
    return out


def memory_block(bench: Source | None, manifest: Source | None, primary: Source | None) -> dict[str, Any]:
    """Weights and peak memory: bench.json first, then the manifest / validation weight counts."""
    out: dict[str, Any] = {"source": None}
    full, frag = _bench_runs(bench)
    if bench is not None and _num(full.get("weight_bytes")) is not None and _num(frag.get("weight_bytes")) is not None:
        out.update(source=bench.path, full_weight_bytes=_num(full["weight_bytes"]),
                   fragment_weight_bytes=_num(frag["weight_bytes"]),
                   weight_reduction=_num(bench.data.get("weight_reduction")),
                   full_params=_num(full.get("params")), fragment_params=_num(frag.get("params")))
    else:
        for src in (manifest, primary):
            before, after = _num(_d(src, "weight_bytes", "before")), _num(_d(src, "weight_bytes", "after"))
            if src is not None and before is not None and after is not None:
                out.update(source=src.path, full_weight_bytes=before, fragment_weight_bytes=after,
                           weight_reduction=1 - after / before if before else None,
                           full_params=_num(_d(src, "params", "before")),
                           fragment_params=_num(_d(src, "params", "after")))
                break
    if bench is not None:
        out.update({
            "full_peak_bytes": _num(full.get("peak_bytes_est")),
            "fragment_peak_bytes": _num(frag.get("peak_bytes_est")),
            "full_cuda_peak_bytes": _num(full.get("cuda_peak_bytes")),
            "fragment_cuda_peak_bytes": _num(frag.get("cuda_peak_bytes")),
            "peak_memory_reduction": _num(bench.data.get("peak_memory_reduction")),
        })
    return out


def key_metrics(quality: dict[str, Any], perf: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """The numbers a later report diffs against (see report.diff.RULES); ``removed_fraction``: unit -> fraction."""
    agg = quality.get("aggregate") or {}
    return {
        "clip_delta_rel": _num(agg.get("clip_delta_rel")),
        "lpips_mean": _num(agg.get("lpips_mean")),
        "ssim_mean": _num(agg.get("ssim_mean")),
        "phash_mean": _num(agg.get("phash_mean")),
        "pass_rate": _num(agg.get("pass_rate")),
        "reuse_pass_rate": _num(quality.get("reuse_pass_rate")),
        "removed_fraction": dict(quality.get("removed_fraction") or {}),
        "speedup": _num(perf.get("speedup")),
        "full_per_image_s": _num(perf.get("full_per_image_s")),
        "fragment_per_image_s": _num(perf.get("fragment_per_image_s")),
        "break_even_images": _num(perf.get("break_even_images")),
        "fragment_weight_bytes": _num(memory.get("fragment_weight_bytes")),
        "weight_reduction": _num(memory.get("weight_reduction")),
        "fragment_peak_bytes": _num(memory.get("fragment_peak_bytes")),
        "fragment_cuda_peak_bytes": _num(memory.get("fragment_cuda_peak_bytes")),
        "peak_memory_reduction": _num(memory.get("peak_memory_reduction")),
    }


def _gate_row(name: str, kind: str, measured: float | None, threshold: float | None, direction: str | None,
              status: str, source: str | None, message: str) -> dict[str, Any]:
    return {"gate": name, "kind": kind, "measured": measured, "threshold": threshold, "direction": direction,
            "status": status, "source": source, "message": message}


def _unmeasured(gate) -> str:
    """A gate that could not be measured: skipped when thresholds.yaml marks it optional, else INVALID."""
    return "UNAVAILABLE" if gate.optional else "INVALID"


def quality_gates(quality: dict[str, Any], th: Thresholds) -> list[dict[str, Any]]:
    """The quality gates on the run's aggregate; an unmeasured metric is INVALID (UNAVAILABLE when optional)."""
    rows = []
    agg = quality.get("aggregate") or {}
    unavailable = quality.get("unavailable") or {}
    for gate_name, (key, sign) in IMAGE_GATES.items():
        gate = th.gate(gate_name)
        value = _num(agg.get(AGGREGATE_KEYS[key]))
        if quality.get("source") is None:
            rows.append(_gate_row(gate_name, "quality", None, gate.value, gate.direction, _unmeasured(gate), None,
                                  "no validation.json in the run and no quality block in its manifest"))
            continue
        if value is None:
            why = unavailable.get(key.split("_")[0]) or f"no {AGGREGATE_KEYS[key]} in validation.json"
            rows.append(_gate_row(gate_name, "quality", None, gate.value, gate.direction, _unmeasured(gate),
                                  quality["source"], why))
            continue
        measured = sign * value
        ok = gate.passes(measured)
        op = "<=" if gate.direction == "max" else ">="
        msg = (f"{gate_name}: {measured:.4g} {op} {gate.value:g}" if ok else
               f"{gate_name}: {measured:.4g} is not {op} {gate.value:g} (off by {abs(gate.margin(measured)):.4g})")
        rows.append(_gate_row(gate_name, "quality", measured, gate.value, gate.direction,
                              "PASS" if ok else "FAIL", quality["source"], msg))
    return rows


def hypothesis_gates(hypotheses: list[dict[str, Any]], th: Thresholds) -> list[dict[str, Any]]:
    """Rows for the hypotheses listed in ``gate_hypotheses``: FAIL fails, UNAVAILABLE is INVALID (WARN passes)."""
    rows = []
    for h in hypotheses:
        if h["id"] not in th.gate_hypotheses:
            continue
        status = "FAIL" if h["status"] == FAIL else ("PASS" if h["status"] in ("PASS", "WARN") else "INVALID")
        msg = f"{h['id']} {h['status']}: value {h['value']}, threshold {h['threshold']:g} ({h['direction']})"
        if h.get("note"):
            msg += f"; {h['note']}"
        rows.append(_gate_row(h["id"], "hypothesis", h["value"], h["threshold"], h["direction"], status,
                              h["evidence"], msg))
    return rows


def regression_gates(diff: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the regression checks that gate: PASS/FAIL, INVALID (a gated metric missing or not finite on a
    side, or no baseline for --compare baseline), UNAVAILABLE (the same, optional); INFO and MISSING rows stay in
    the diff only."""
    rows = []
    source = (diff.get("baseline") or {}).get("path")
    if diff["baseline"] is None and diff["compare"] == "baseline":
        rows.append(_gate_row("regression", "regression", None, None, None, "INVALID", None,
                              f"no baseline to compare with: {diff['note']}"))
    for r in diff["metrics"]:
        if r["status"] in ("INVALID", "UNAVAILABLE"):
            rows.append(_gate_row(f"regression.{r['metric']}", "regression", r["current"], None,
                                  "min" if r["better"] == "higher" else "max", r["status"], source, r["note"]))
            continue
        if r["status"] not in ("PASS", "FAIL"):
            continue
        op = ">=" if r["better"] == "higher" else "<="
        msg = f"{r['metric']}: {r['current']:.4g} vs baseline {r['baseline']:.4g} (limit {op} {r['limit']:.4g})"
        if r["status"] == "FAIL":
            msg = f"{r['metric']} regressed: {r['current']:.4g} vs baseline {r['baseline']:.4g}, " \
                  f"beyond the {r['tolerance_kind']} tolerance {r['tolerance']:g} (limit {op} {r['limit']:.4g})"
        rows.append(_gate_row(f"regression.{r['metric']}", "regression", r["current"], r["limit"],
                              "min" if r["better"] == "higher" else "max", r["status"],
                              (diff.get("baseline") or {}).get("path"), msg))
    return rows


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) >= 40 else None


def provenance(rf: RunFiles) -> dict[str, Any]:
    versions: dict[str, str | None] = {"frag": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "git_commit": _git_commit(),
        "versions": versions,
        "run_versions": _d(rf.profile, "versions"),
        "device": {"run": _d(rf.bench, "device") or _d(rf.profile, "model", "device"),
                   "host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
                   "cpus": os.cpu_count()},
        "inputs": dict(rf.files),
    }


def fragment_block(rf: RunFiles) -> dict[str, Any]:
    """The fragment and every technique's summary (from its manifest, else from the run's validation)."""
    src = rf.manifest or rf.primary
    techniques = []
    for t in _d(src, "techniques") or []:
        summary = t.get("summary") or {}
        techniques.append({"name": t.get("name"), **{k: summary.get(k) for k in SUMMARY_KEYS}})
    m = rf.manifest
    return {"name": _d(m, "name") or _d(rf.primary, "fragment_name"),
            "path": str(Path(m.file).parent) if m else _d(rf.primary, "fragment"),
            "hash": rf.manifest_sha256, "techniques": techniques}


def build_summary(rf: RunFiles, th: Thresholds, created: str) -> dict[str, Any]:
    """Everything but the gates, the regression part (``attach_gates``), report_dir and files (``make_report``)."""
    model = rf.model()
    quality = quality_block(rf.primary, rf.manifest)
    perf = performance_block(rf.bench, rf.profile)
    memory = memory_block(rf.bench, rf.manifest, rf.primary)
    hyps = score_hypotheses(rf.points, rf.primary, rf.bench, rf.manifest, th)
    notes = list(rf.notes)
    for metric, reason in (quality.get("unavailable") or {}).items():
        notes.append(f"{metric} unavailable in validation: {reason}")
    return {
        "_type": "frag.report",
        "schema_version": 2,
        "created": created,
        "run": {"id": rf.root.name, "dir": str(rf.root)},
        "model": model,
        "fragment": fragment_block(rf),
        "hypotheses": hyps,
        "quality": quality,
        "performance": perf,
        "memory": memory,
        "metrics": key_metrics(quality, perf, memory),
        "sweep": [{"source": p.path, "removed_fraction": removed_fractions(p.data),
                   **{k: _num((p.data.get("aggregate") or {}).get(k))
                      for k in ("clip_delta_rel", "lpips_mean", "ssim_mean", "phash_mean", "pass_rate")}}
                  for p in rf.points],
        "thresholds": {**th.flat(), "gate_hypotheses": list(th.gate_hypotheses)},
        "notes": notes,
        "provenance": provenance(rf),
    }


def attach_gates(summary: dict[str, Any], diff: dict[str, Any], th: Thresholds, gating: bool) -> dict[str, Any]:
    """Add the gate rows, the regression summary and the overall verdict to ``summary`` (in place)."""
    quality = quality_gates(summary["quality"], th)
    if not any(r["status"] in ("PASS", "FAIL") for r in quality):  # even when every quality gate is optional
        keys = ", ".join(AGGREGATE_KEYS[key] for key, _ in IMAGE_GATES.values())
        quality.append(_gate_row("quality", "quality", None, None, None, "INVALID", summary["quality"].get("source"),
                                 f"no quality metric was measured ({keys}): a gate never passes on nothing "
                                 "-- run frag validate"))
    rows = quality + hypothesis_gates(summary["hypotheses"], th) + regression_gates(diff)
    failures = [r["message"] for r in rows if r["status"] == "FAIL"]
    invalid = [f"{r['gate']}: {r['message']}" for r in rows if r["status"] == "INVALID"]
    summary["gates"] = rows
    summary["regression"] = {"compare": diff["compare"], "baseline": diff["baseline"], "note": diff["note"],
                             "passed": diff["passed"], "failures": diff["failures"]}
    status = "FAIL" if failures else ("INVALID" if invalid else "PASS")
    summary["gate"] = {"enforced": gating, "passed": status == "PASS", "status": status, "failures": failures,
                       "invalid": invalid}
    if diff["note"]:
        summary["notes"].append(diff["note"])
    return summary
