"""Peers for ``frag bench --peers``: what a user would install instead of building a fragment, run side by side.

Each peer is its maintainers' own package, used as its README says, on its own freshly loaded copy of the full
model (T-GATE rewrites attention forwards and tomesd swaps block classes: sharing the full model's pipeline would
change the baseline), so the full model, the fragment and every peer stay loaded and run interleaved on the same
seeds. Peers are optional extras (``pip install 'fragcli[peers]'``); a peer that is not installed, or that refuses
this pipeline, is reported as such in bench.json (``unavailable``), never faked.

Names: ``deepcache`` (DeepCache, intervals 2 and 3, branch 0: the settings of ../shared/FACTS.md), ``tgate``
(T-GATE, cross-attention gated after 40% of the steps), ``tomesd`` (token merging, ratio 0.5); a name with a
suffix picks one setting (``deepcache-i3``, ``tomesd-r0.3``).

Transformer denoisers (Flux, SD3, PixArt): ``cachedit`` (cache-dit's DBCache at its defaults, and F1B0 at residual
threshold 0.12, the faster setting that runs on small models; ``cachedit-t0.2`` picks F1B0's threshold),
``fbcache`` (diffusers' FirstBlockCache, thresholds 0.1 and 0.2), ``taylorseer`` (diffusers' TaylorSeerCache at
its defaults), ``pab`` (diffusers' PyramidAttentionBroadcast, spatial attention reused every 2nd block call between
timesteps 100 and 800). The diffusers hooks go through ``transformer.enable_cache`` where the model has it (Flux);
elsewhere they are applied with ``diffusers.hooks`` and every pipeline call runs inside a cache context (SD3's and
PixArt's pipelines open none). Each DiT peer runs one one-step generation when it is set up: a peer that fails there
(a model it does not support) is reported unavailable with its own error, never run half-way.
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
    smoke: bool = False  # run one one-step generation at setup (a failure there = the peer refuses this pipeline)

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


def _denoiser(pipe):
    den = getattr(pipe, "transformer", None)
    if den is None:
        raise TypeError(f"{type(pipe).__name__} has no transformer denoiser (this peer caches DiT blocks)")
    return den


def _in_context(pipe, den, call=None):
    """The pipeline's call inside a diffusers cache context (for pipelines that open none themselves)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    run = call or pipe

    def called(*args, **kwargs):
        _set_cache_context(den, CacheContext("cond"))
        try:
            return run(*args, **kwargs)
        finally:
            _set_cache_context(den, None)

    return called


def _diffusers_hook(make_config: Callable[[Any, Any], Any], apply: str):
    """A diffusers cache hook: ``enable_cache`` where the transformer has it (its pipeline opens the context),
    else ``diffusers.hooks.<apply>`` and a context around every call."""

    def setup(pipe, s):
        den = _denoiser(pipe)
        config = make_config(pipe, s)
        if callable(getattr(den, "enable_cache", None)):
            den.enable_cache(config)
            if type(pipe).__name__.startswith("Flux"):
                return None  # FluxPipeline opens cache contexts itself
            return _in_context(pipe, den)
        import diffusers.hooks as hooks

        getattr(hooks, apply)(den, config)
        return _in_context(pipe, den)

    return setup


def _fbcache_peer(t: float) -> Peer:
    def config(pipe, s):
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=t)

    return Peer(f"fbcache-t{t:g}", "diffusers", "diffusers", f"diffusers FirstBlockCache, threshold {t:g}",
                _diffusers_hook(config, "apply_first_block_cache"), {"threshold": t}, smoke=True)


def _taylorseer_peer() -> Peer:
    def config(pipe, s):
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig()

    return Peer("taylorseer", "diffusers", "diffusers", "diffusers TaylorSeerCache, defaults (interval 5, order 1)",
                _diffusers_hook(config, "apply_taylorseer_cache"), {}, smoke=True)


def _timestep_of(pipe):
    """The pipeline's current timestep (0-1000): ``pipe.current_timestep`` where the pipeline keeps it (Flux), else
    the one its denoiser was last called with (a forward pre-hook; SD3 and PixArt)."""
    if hasattr(type(pipe), "current_timestep"):
        return lambda: pipe.current_timestep
    import torch

    seen = {"t": None}

    def pre(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        seen["t"] = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t

    _denoiser(pipe).register_forward_pre_hook(pre, with_kwargs=True)
    return lambda: seen["t"]


def _pab_peer() -> Peer:
    def config(pipe, s):
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=_timestep_of(pipe))

    return Peer("pab", "diffusers", "diffusers", "diffusers PyramidAttentionBroadcast, spatial attention every 2nd "
                "call in timesteps 100-800", _diffusers_hook(config, "apply_pyramid_attention_broadcast"),
                {"spatial_attention_block_skip_range": 2}, smoke=True)


def _cachedit(threshold: float | None):
    def setup(pipe, s):
        import cache_dit

        _denoiser(pipe)
        if threshold is None:
            cache_dit.enable_cache(pipe)
        else:
            from cache_dit import DBCacheConfig

            cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                                    residual_diff_threshold=threshold))
        return None

    return setup


def _cachedit_peer(threshold: float | None) -> Peer:
    if threshold is None:
        return Peer("cachedit", "cache_dit", "cache-dit", "cache-dit DBCache, its defaults", _cachedit(None), {},
                    smoke=True)
    return Peer(f"cachedit-t{threshold:g}", "cache_dit", "cache-dit", f"cache-dit DBCache F1B0, residual threshold "
                f"{threshold:g}", _cachedit(threshold), {"residual_diff_threshold": threshold}, smoke=True)


FAMILIES: dict[str, Callable[[], list[Peer]]] = {
    "cachedit": lambda: [_cachedit_peer(None), _cachedit_peer(0.12)],
    "fbcache": lambda: [_fbcache_peer(0.1), _fbcache_peer(0.2)],
    "taylorseer": lambda: [_taylorseer_peer()],
    "pab": lambda: [_pab_peer()],
    "deepcache": lambda: [_deepcache_peer(2), _deepcache_peer(3)],
    "tgate": lambda: [_tgate_peer(0.4)],
    "tomesd": lambda: [_tomesd_peer(0.5)],
}
_SUFFIX: dict[str, tuple[str, Callable[[str], Peer]]] = {
    "deepcache": ("i", lambda v: _deepcache_peer(int(v))),
    "tgate": ("g", lambda v: _tgate_peer(int(v) / 100)),
    "tomesd": ("r", lambda v: _tomesd_peer(float(v))),
    "cachedit": ("t", lambda v: _cachedit_peer(float(v))),
    "fbcache": ("t", lambda v: _fbcache_peer(float(v))),
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
        if setting and family not in _SUFFIX and family in FAMILIES:
            raise FragError(f"peer {family} takes no setting ({raw!r})", f"write it as {family}")
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
        if peer.smoke:
            _smoke(loaded, call, settings)
    except Exception as exc:  # a peer's own error: reported, not raised
        raise FragError(f"peer {peer.name} refused this pipeline ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                        "drop it from --peers") from None
    return loaded, (loaded.pipe if call is None else PeerPipe(loaded.pipe, call))


def _smoke(loaded, call, settings) -> None:
    """One one-step generation through the peer (raises its error), then its hooks' state is reset."""
    from fragcli.generation import run_batch

    one = settings.__class__(**{**settings.as_dict(), "steps": 1})
    run_batch(loaded.pipe if call is None else PeerPipe(loaded.pipe, call), one, [0], loaded.device)
    den = getattr(loaded.pipe, "transformer", None)
    registry = getattr(den, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "reset_stateful_hooks"):
        registry.reset_stateful_hooks()
