"""Reading schema_version 1 manifests (frag 0.1: head pruning only) as version 2, in memory.

Each registered technique may claim part of a v1 manifest (``Technique.migrate_v1``); the delta's keys come from
the safetensors header (no tensor is read); absolute paths (v1's ``profile_dir``) are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fragcli.errors import FragError

V1_QUALITY = {"clip_delta_rel": "clip_delta_mean", "clip_full_mean": "clip_full_mean",
              "clip_fragment_mean": "clip_fragment_mean", "lpips_mean": "lpips_mean", "ssim_mean": "ssim_mean",
              "phash_mean": "phash_mean", "pass_rate": "pass_rate", "passed": "thresholds_passed",
              "failures": "failures", "unavailable": "unavailable", "seeds": "seeds"}
V1_PERFORMANCE = ("speedup", "weight_reduction", "peak_memory_reduction", "break_even_images", "variants", "device")


def _delta_keys(folder: Path, file: str) -> list[str]:
    from safetensors import safe_open

    from fragcli.paths import inside

    path = inside(folder, file)
    if not path.is_file():
        return []  # verify_fragment reports the missing artifact
    try:
        with safe_open(str(path), framework="pt") as fh:
            return sorted(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise FragError(f"fragment weights {file} are not a readable safetensors file ({str(exc)[:80]})",
                        "rebuild the fragment with frag extract") from None


def migrate_v1(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A v1 manifest dict -> a v2 manifest dict (validated by the caller)."""
    from fragcli.manifest import WEIGHTS
    from fragcli.techniques import REGISTRY

    g = dict(data.get("generation") or {})
    profiling = {k: g[k] for k in ("prompt", "negative_prompt", "seeds", "steps", "profiled_steps", "guidance",
                                    "width", "height") if k in g}
    profiling["prompt_embedding_hash"] = g.get("text_embedding_hash")
    techniques = []
    for technique in REGISTRY:
        entry = technique.migrate_v1(data)
        if entry is not None:
            techniques.append(entry)
    q = data.get("quality") or {}
    quality = {new: q[old] for old, new in V1_QUALITY.items() if old in q} or None
    if quality is not None:
        quality["samples"] = len(q.get("seeds") or [])
    r = data.get("reuse") or {}
    reuse = {"paraphrase_pass_rate": r.get("pass_rate"), "paraphrases_tested": r.get("paraphrases", 0),
             "paraphrases_passed": r.get("passed", 0)} if r else None
    p = data.get("performance") or {}
    performance = {k: p[k] for k in V1_PERFORMANCE if k in p} or None
    artifacts = data.get("artifacts") or {}
    return {
        "_type": data.get("_type"), "schema_version": 2, "frag_version": data.get("frag_version"),
        "name": data.get("name"), "created": data.get("created"), "base_model": data.get("base_model"),
        "profiling": profiling, "techniques": techniques,
        "weights": {"file": WEIGHTS, "changed": _delta_keys(folder, WEIGHTS)} if WEIGHTS in artifacts else None,
        "params": data.get("params"), "weight_bytes": data.get("weight_bytes"),
        "quality": quality, "reuse": reuse, "performance": performance,
        "costs": data.get("costs") or {}, "artifacts": artifacts,
    }
