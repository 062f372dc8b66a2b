"""DiT peers for ``frag bench --peers``: cache-dit and diffusers' own cache hooks resolve by name, an uninstalled
package is unavailable with the reason, a hook the model does not support is refused with its own error at setup
(one one-step generation), and one that runs leaves PixArt rendering at the size asked."""

import importlib.util

import pytest

from fragcli.errors import FragError
from fragcli.generation import GenSettings, call_options, run_batch
from fragcli.peers import PeerPipe, load_peer, resolve_peers


def test_names_and_settings():
    names = [p.name for p in resolve_peers("cachedit,fbcache,taylorseer,pab,fbcache-t0.3,cachedit-t0.2")]
    assert names == ["cachedit", "cachedit-t0.12", "fbcache-t0.1", "fbcache-t0.2", "taylorseer", "pab",
                     "fbcache-t0.3", "cachedit-t0.2"]
    with pytest.raises(FragError):
        resolve_peers("pab-x2")
    if importlib.util.find_spec("cache_dit") is None:
        assert "cache-dit is not installed" in resolve_peers("cachedit")[0].missing()


def test_a_hook_the_model_cannot_take_is_refused_and_one_that_runs_keeps_the_size(frag_home):
    s = GenSettings("a red circle", 2, 5.0, 64, 64)
    with pytest.raises(FragError) as e:  # diffusers' FirstBlockCache on SD3: its last block returns no context
        load_peer(resolve_peers("fbcache-t0.2")[0], "tiny-sd3", "cpu", "auto", s)
    assert "refused this pipeline" in e.value.problem
    loaded, call = load_peer(resolve_peers("pab")[0], "tiny-pixart", "cpu", "auto", s)
    assert isinstance(call, PeerPipe) and call_options(call) == {"use_resolution_binning": False}
    image = run_batch(call, s, [0], "cpu")[0]
    assert image.size == (64, 64)
