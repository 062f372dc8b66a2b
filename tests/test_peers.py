"""Peers beside a fragment in ``frag bench --peers``: names resolved and refused, a peer that is not installed
reported (never faked), and (opt-in, ``pytest -m peers``) the real DeepCache / T-GATE / tomesd run interleaved."""

import json

import pytest

from fragcli import peers as peers_mod
from fragcli.bench import read_bench
from fragcli.errors import FragError
from fragcli.peers import Peer, resolve_peers
from tests.helpers import assert_one_line_error, private_copy, run_cli, tiny_chain

FAST = ("--variants", "2", "--steps", "2", "--no-memory", "--repeats", "1")


def test_names_expand_to_settings_once_each_and_unknown_ones_are_refused():
    assert [p.name for p in resolve_peers("deepcache, tgate,tomesd")] == [
        "deepcache-i2", "deepcache-i3", "tgate-g40", "tomesd-r0.5"]
    assert [p.name for p in resolve_peers("deepcache-i3,deepcache")] == ["deepcache-i3", "deepcache-i2"]
    assert [p.params for p in resolve_peers("tomesd-r0.3")] == [{"ratio": 0.3}]
    assert resolve_peers("") == [] and resolve_peers(None) == []
    with pytest.raises(FragError, match="unknown peer 'deepspeed'"):
        resolve_peers("deepspeed")
    for bad in ("deepcache-x2", "deepcache-i0", "tomesd-rabc"):
        with pytest.raises(FragError, match="unreadable setting"):
            resolve_peers(bad)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory.mktemp("peerchain"), "a red circle on a blue background")


def test_a_peer_that_is_not_installed_is_reported_not_run(chain, tmp_path, monkeypatch):
    fake = Peer("deepcache-i2", "frag_no_such_module", "DeepCache", "DeepCache, cache interval 2, branch 0",
                lambda pipe, s: None)
    monkeypatch.setitem(peers_mod.FAMILIES, "deepcache", lambda: [fake])
    fragment = private_copy(chain[2], tmp_path)
    r = run_cli("bench", fragment, *FAST, "--peers", "deepcache", "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    rec = read_bench(tmp_path / "b" / "bench.json")
    assert set(rec.runs) == {"full", "fragment"} and rec.peers == ["deepcache-i2"]
    assert "not installed" in rec.unavailable["runs.deepcache-i2"] and "fragcli[peers]" in rec.unavailable[
        "runs.deepcache-i2"]
    from fragcli.hypotheses import Source
    from fragcli.report.summary import performance_block

    perf = performance_block(Source(str(tmp_path / "b" / "bench.json"), rec.dump()), None)
    assert set(perf["contenders"]) == {"full", "fragment"}  # the report's bench table
    assert perf["unavailable_contenders"] == {"deepcache-i2": rec.unavailable["runs.deepcache-i2"]}
    assert perf["contenders"]["fragment"]["ssim_mean"] == rec.runs["fragment"].fidelity.ssim_mean


def test_a_peer_that_refuses_the_pipeline_is_reported_and_the_cli_says_why(chain, tmp_path, monkeypatch):
    def refuse(pipe, s):
        raise RuntimeError("this pipeline has no [unet]")

    fake = Peer("tomesd-r0.5", "json", "tomesd", "tomesd token merging, ratio 0.5", refuse, {"ratio": 0.5})
    monkeypatch.setitem(peers_mod.FAMILIES, "tomesd", lambda: [fake])
    missing = Peer("tgate-g40", "frag_no_such_module", "tgate", "T-GATE", lambda pipe, s: None, {"gate_fraction": 0.4})
    monkeypatch.setitem(peers_mod.FAMILIES, "tgate", lambda: [missing])
    fragment = private_copy(chain[2], tmp_path)
    r = run_cli("bench", fragment, *FAST, "--peers", "tomesd,tgate", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    rec = read_bench(tmp_path / "b" / "bench.json")
    assert set(rec.runs) == {"full", "fragment"}
    assert "refused this pipeline (RuntimeError: this pipeline has no [unet])" in rec.unavailable["runs.tomesd-r0.5"]
    text = " ".join(r.output.split())
    assert "tomesd-r0.5: not run" in text and "fragcli[peers]" in text  # printed as written, not as markup


def test_an_unknown_peer_is_refused_before_anything_runs(chain, tmp_path):
    fragment = private_copy(chain[2], tmp_path)
    assert_one_line_error(run_cli("bench", fragment, *FAST, "--peers", "fastercache", "--out", tmp_path / "b"),
                          "unknown peer")
    assert not (tmp_path / "b").exists()


@pytest.mark.peers
def test_the_installed_peers_run_interleaved_with_fidelity(chain, tmp_path):
    pytest.importorskip("DeepCache")
    pytest.importorskip("tgate")
    pytest.importorskip("tomesd")
    fragment = private_copy(chain[2], tmp_path)
    r = run_cli("bench", fragment, "--variants", "2", "--steps", "4", "--no-memory", "--repeats", "1",
                "--peers", "deepcache,tgate,tomesd", "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    rec = read_bench(tmp_path / "b" / "bench.json")
    assert set(rec.runs) == {"full", "fragment", "deepcache-i2", "deepcache-i3", "tgate-g40", "tomesd-r0.5"}
    for name, run in rec.runs.items():
        if name in ("full", "fragment"):
            continue
        assert run.kind == "peer" and run.peer["version"] and run.vs_baseline.speedup > 0
        assert run.fidelity is not None and 0 < run.fidelity.ssim_mean <= 1
    # the peers ran on their own pipelines: the full model's images are the plain ones
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["runs"]["full"]["kind"] == "full"
    assert rec.runs["deepcache-i3"].fidelity.ssim_mean < 1  # DeepCache did change the images (the test can fail)
