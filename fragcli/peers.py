"""Peers for ``frag bench --peers``: what a user would install instead of building a fragment, run side by side.

Each peer is its maintainers' own package, used as its README says, on its own freshly loaded copy of the full
model (T-GATE rewrites attention forwards and tomesd swaps block classes: sharing the full model's pipeline would
change the baseline), so the full model, the fragment and every peer stay loaded and run interleaved on the same
seeds. Peers are optional extras (``pip install 'fragcli[peers]'``); a peer that is not installed, or that refuses
this pipeline, is reported as such in bench.json (``unavailable``), never faked.

Names: ``deepcache`` (DeepCache, intervals 2 and 3, branch 0: the settings of ../shared/FACTS.md), ``tgate``
(T-GATE, cross-attention gated after 40% of the steps), ``tomesd`` (token merging, ratio 0.5); a name with a
suffix picks one setting (``deepcache-i3``, ``tomesd-r0.3``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fragcli.errors import FragError

EXTRA = "pip install 'fragcli[peers]'"


@dataclass(frozen=True)
class Peer:
    """One peer configuration: a contender of ``frag bench`` (``runs[name]``, ``kind: peer``)."""

    name: str  # e.g. deepcache-i2
    module: str  # the import name of its package
    dist: str  # its pip name
    description: str
    setup: Callable[[Any, Any], Callable[..., Any] | None]  # (pipe, settings) -> the call to use instead of pipe()
    params: dict[str, Any] = field(default_factory=dict)

    def missing(self) -> str | None:
        """Why this peer cannot run here (None: its package is importable)."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.dist} is not installed ({EXTRA})"
        return None


def _deepcache(interval: int):
    def setup(pipe, s):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        pipe._frag_peer = helper  # keeps the helper alive with its pipeline
        return None

    return setup


def _tgate(fraction: float):
    def setup(pipe, s):
        import tgate

        loader = tgate.TgateSDXLLoader if "XL" in type(pipe).__name__ else tgate.TgateSDLoader
        loader(pipe)
        gate = max(1, round(fraction * s.steps))
        return lambda **kw: pipe.tgate(**kw, gate_step=gate)

    return setup


def _tomesd(ratio: float):
    def setup(pipe, s):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio)
        return None

    return setup


def _deepcache_peer(i: int) -> Peer:
    return Peer(f"deepcache-i{i}", "DeepCache", "DeepCache", f"DeepCache, cache interval {i}, branch 0",
                _deepcache(i), {"cache_interval": i, "cache_branch_id": 0})


def _tgate_peer(f: float) -> Peer:
    return Peer(f"tgate-g{round(f * 100)}", "tgate", "tgate", f"T-GATE, cross-attention gated after {f:.0%} of "
                "the steps", _tgate(f), {"gate_fraction": f})


def _tomesd_peer(r: float) -> Peer:
    return Peer(f"tomesd-r{r:g}", "tomesd", "tomesd", f"tomesd token merging, ratio {r:g}", _tomesd(r),
                {"ratio": r})


FAMILIES: dict[str, Callable[[], list[Peer]]] = {
    "deepcache": lambda: [_deepcache_peer(2), _deepcache_peer(3)],
    "tgate": lambda: [_tgate_peer(0.4)],
    "tomesd": lambda: [_tomesd_peer(0.5)],
}
_SUFFIX: dict[str, tuple[str, Callable[[str], Peer]]] = {
    "deepcache": ("i", lambda v: _deepcache_peer(int(v))),
    "tgate": ("g", lambda v: _tgate_peer(int(v) / 100)),
    "tomesd": ("r", lambda v: _tomesd_peer(float(v))),
}


def resolve_peers(spec: str | None) -> list[Peer]:
    """``"deepcache,tgate,tomesd"`` (or names with a setting, ``deepcache-i3``) -> the peers, in order, once each;
    FragError for an unknown name or setting."""
    if not spec:
        return []
    out: dict[str, Peer] = {}
    for raw in (p.strip().lower() for p in spec.split(",")):
        if not raw:
            continue
        family, _, setting = raw.partition("-")
        if family not in FAMILIES:
            raise FragError(f"unknown peer {raw!r}", f"use some of: {', '.join(FAMILIES)} (comma-separated)")
        try:
            peers = FAMILIES[family]() if not setting else [_setting(family, setting)]
        except (ValueError, ZeroDivisionError):
            letter = _SUFFIX[family][0]
            raise FragError(f"peer {raw!r} has an unreadable setting", f"write it as {family}-{letter}N, "
                            f"e.g. {FAMILIES[family]()[0].name}") from None
        for p in peers:
            out.setdefault(p.name, p)
    return list(out.values())


def _setting(family: str, setting: str) -> Peer:
    letter, make = _SUFFIX[family]
    if not setting.startswith(letter):
        raise ValueError(setting)
    peer = make(setting[len(letter):])
    value = next(iter(peer.params.values()))  # the setting itself: an interval >= 1, a fraction or ratio in (0, 1)
    if value <= 0 or (not isinstance(value, int) and value >= 1):
        raise ValueError(setting)
    return peer


class PeerPipe:
    """A pipeline whose call goes to the peer's own entry point (T-GATE's ``pipe.tgate``); everything else is the
    pipeline's."""

    def __init__(self, pipe, call: Callable[..., Any]) -> None:
        self._pipe, self._call = pipe, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)


def load_peer(peer: Peer, spec: str, device: str, dtype: str, settings):
    """(the peer's own full-model pipeline, set up; the pipeline object to call) or FragError when it refuses."""
    from fragcli.models import load_model

    loaded = load_model(spec, device, dtype)
    try:
        call = peer.setup(loaded.pipe, settings)
    except Exception as exc:  # a peer's own error: reported, not raised
        raise FragError(f"peer {peer.name} refused this pipeline ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                        "drop it from --peers") from None
    return loaded, (loaded.pipe if call is None else PeerPipe(loaded.pipe, call))
