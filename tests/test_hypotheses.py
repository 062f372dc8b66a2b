from fragcli.hypotheses import (
    FAIL,
    PASS,
    UNAVAILABLE,
    WARN,
    Source,
    h1_head_prunable,
    h2_memory,
    h3_reuse,
    h4_throughput,
    h5_break_even,
    removed_fractions,
    score_hypotheses,
)
from fragcli.thresholds import default_thresholds

TH = default_thresholds()


def heads(frac, unit="attention_heads"):
    return {"name": "any_name", "version": 1, "summary": {"unit": unit, "units_total": 100,
                                                          "units_removed": round(100 * frac), "removed_fraction": frac}}


def val(frac, delta, seeds=20, paraphrases=None, path="v.json", techniques=None):
    return Source(path, {"_type": "frag.validation", "techniques": [heads(frac)] if techniques is None else techniques,
                         "seeds": list(range(seeds)), "aggregate": {"clip_delta_rel": delta},
                         "paraphrases": paraphrases,
                         "unavailable": {} if delta is not None else {"clip": "no CLIP weights"}})


def bench(**kw):
    data = {"_type": "frag.bench", "variants": 32, "speedup": 2.0, "weight_reduction": 0.3,
            "peak_memory_reduction": 0.1, "break_even_images": 5.0}
    data.update(kw)
    return Source("bench/bench.json", data)


def test_h1_largest_passing_fraction():
    pts = [val(0.1, -0.001), val(0.35, -0.015, path="b.json"), val(0.5, -0.2)]
    r = h1_head_prunable(pts, TH)
    assert r["status"] == PASS and r["value"] == 0.35 and "b.json" in r["evidence"]
    assert set(r) == {"id", "statement", "value", "threshold", "direction", "status", "evidence", "note"}


def test_h1_fail_warn_unavailable():
    assert h1_head_prunable([val(0.1, -0.001), val(0.3, -0.1)], TH)["status"] == FAIL
    warn = h1_head_prunable([val(0.1, -0.001), val(0.2, 0.0)], TH)
    assert warn["status"] == WARN and warn["value"] == 0.2
    assert h1_head_prunable([], TH)["status"] == UNAVAILABLE
    none = h1_head_prunable([val(0.3, None)], TH)
    assert none["status"] == UNAVAILABLE and "no CLIP weights" in none["note"] and none["value"] is None


def test_h1_reads_the_attention_heads_summary_only():
    other = [{"name": "x", "version": 1, "summary": {"unit": "ffn_channels", "removed_fraction": 0.5}}]
    r = h1_head_prunable([val(0.0, -0.001, techniques=other), val(0.0, -0.001, techniques=[])], TH)
    assert r["status"] == UNAVAILABLE and r["value"] is None and "attention_heads" in r["note"]
    both = val(0.0, -0.001, techniques=[*other, heads(0.4)])
    assert removed_fractions(both.data) == {"ffn_channels": 0.5, "attention_heads": 0.4}
    r = h1_head_prunable([both], TH)
    assert r["status"] == PASS and r["value"] == 0.4 and "attention_heads removed_fraction 0.400" in r["evidence"]


def test_h2():
    assert h2_memory(val(0.3, -0.01), bench(), None, TH)["status"] == PASS
    few = h2_memory(val(0.3, -0.01, seeds=4), bench(), None, TH)
    assert few["status"] == WARN and "20" in few["note"]
    assert h2_memory(val(0.3, -0.08), bench(), None, TH)["status"] == FAIL
    assert h2_memory(val(0.3, -0.01), bench(weight_reduction=0.03, peak_memory_reduction=0.05), None,
                     TH)["status"] == FAIL
    assert h2_memory(None, None, None, TH)["status"] == UNAVAILABLE
    assert h2_memory(val(0.3, None), bench(), None, TH)["status"] == UNAVAILABLE
    manifest = Source("fragment/manifest.json", {"weight_bytes": {"before": 100, "after": 70}})
    r = h2_memory(val(0.3, -0.01), None, manifest, TH)
    assert r["status"] == PASS and abs(r["value"] - 0.3) < 1e-9 and "manifest" in r["evidence"]
    benched = Source("fragment/manifest.json", {"weight_bytes": {"before": 100, "after": 90},
                                                "performance": {"weight_reduction": 0.1, "peak_memory_reduction": 0.4}})
    r = h2_memory(val(0.3, -0.01), None, benched, TH)
    assert r["status"] == PASS and r["value"] == 0.4 and "performance.peak_memory_reduction" in r["evidence"]


def test_h3():
    para = {"prompts": [f"p{i}" for i in range(8)], "pass_rate": 0.875}
    assert h3_reuse(val(0.3, 0, paraphrases=para), None, TH)["status"] == PASS
    assert h3_reuse(val(0.3, 0, paraphrases={**para, "pass_rate": 0.5}), None, TH)["status"] == FAIL
    assert h3_reuse(val(0.3, 0, paraphrases={"prompts": ["a", "b"], "pass_rate": 1.0}), None, TH)["status"] == WARN
    assert h3_reuse(val(0.3, 0), None, TH)["status"] == UNAVAILABLE
    manifest = Source("fragment/manifest.json", {"reuse": {"paraphrase_pass_rate": 0.9, "paraphrases_tested": 10,
                                                           "paraphrases_passed": 9}})
    r = h3_reuse(val(0.3, 0), manifest, TH)
    assert r["status"] == PASS and r["value"] == 0.9 and "reuse.paraphrase_pass_rate" in r["evidence"]
    assert h3_reuse(None, None, TH)["status"] == UNAVAILABLE


def test_h4_h5():
    assert h4_throughput(bench(), TH)["status"] == PASS
    assert h4_throughput(bench(variants=8), TH)["status"] == WARN
    assert h4_throughput(bench(speedup=1.2), TH)["status"] == FAIL
    assert h4_throughput(None, TH)["status"] == UNAVAILABLE
    assert h5_break_even(bench(), TH)["status"] == PASS
    assert h5_break_even(bench(break_even_images=40.0), TH)["status"] == FAIL
    slower = h5_break_even(bench(break_even_images=None, speedup=0.9), TH)
    assert slower["status"] == FAIL and "never" in slower["note"]
    assert h5_break_even(bench(break_even_images=None, speedup=1.5), TH)["status"] == UNAVAILABLE
    assert h5_break_even(None, TH)["status"] == UNAVAILABLE


def test_score_all_in_order():
    out = score_hypotheses([val(0.35, -0.01)], val(0.35, -0.01), bench(), None, TH)
    assert [h["id"] for h in out] == ["H1", "H2", "H3", "H4", "H5"]
    assert [h["status"] for h in out] == [PASS, PASS, UNAVAILABLE, PASS, PASS]
