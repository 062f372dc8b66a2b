"""A toy technique in one file, as a new technique would be written: zero one channel of a feed-forward layer.

It plans from the profile (an extract option ``zero_channel`` = "MODULE:INDEX"), changes values only (one input
column of ``ff.net.2``), has a logical mask (a pre-hook zeroing that channel) and a summary. The tests register it,
and save -> verify -> load -> mask -> report must work for it with no change anywhere else.
Also a runtime-only toy: ``count_calls`` changes no tensor and installs a named, reversible patch.
"""

from __future__ import annotations

import contextlib

import torch

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import Applied, Collector, Plan, Technique, TechniqueConfig, TechniqueSummary


class ZeroChannelConfig(TechniqueConfig):
    module: str  # a feed-forward block, e.g. down_blocks.0.attentions.0.transformer_blocks.0.ff
    channel: int


def _out_proj(denoiser, module: str) -> torch.nn.Linear:
    try:
        lin = denoiser.get_submodule(f"{module}.net.2")
    except AttributeError:
        raise FragError(f"{module} is not a feed-forward block of this model", "pick another module") from None
    return lin


class ZeroChannel(Technique):
    name = "toy_zero_channel"
    version = 1
    Config = ZeroChannelConfig
    options = {"zero_channel": None}

    def plan(self, profile, options):
        spec = options.get("zero_channel")
        if not spec:
            return None
        module, _, channel = spec.rpartition(":")
        if channel == "auto":  # the channel this prompt uses least, from this technique's own profile table
            table = profile.table("toy_ffn", ("module", "channel", "energy")).to_pylist()
            rows = [r for r in table if r["module"] == module]
            if not rows:
                raise FragError(f"the profile has no toy_ffn rows for {module}", "profile with the toy registered")
            energy: dict[int, float] = {}
            for r in rows:
                energy[r["channel"]] = energy.get(r["channel"], 0.0) + r["energy"]
            channel = min(energy, key=energy.get)
        return Plan(ZeroChannelConfig(module=module, channel=int(channel)))

    def collectors(self):
        return [Collector("toy_ffn_energy", "toy_ffn", [("module", "string"), ("channel", "int32"), ("seed", "int64"),
                                                         ("step", "int32"), ("energy", "float64")],
                          install_ffn_energy, remove_ffn_energy)]

    def check(self, denoiser, config):
        lin = _out_proj(denoiser, config.module)
        if not 0 <= config.channel < lin.in_features:
            raise FragError(f"channel {config.channel} is out of range for {config.module}", "pick another channel")

    def apply(self, denoiser, config):
        with torch.no_grad():
            _out_proj(denoiser, config.module).weight[:, config.channel] = 0
        return Applied(self.name)

    def rebuild(self, denoiser, config):
        return Applied(self.name)  # values only: the delta brings the zeroed column

    def mask(self, denoiser, config):
        lin = _out_proj(denoiser, config.module)

        def install(patch: Patch) -> None:
            def hook(module, args):
                x = args[0].clone()
                x[..., config.channel] = 0
                return (x,)

            patch.undo.append(lin.register_forward_pre_hook(hook).remove)

        return apply_patch(denoiser, "toy.zero_channel_mask", install)

    def summary(self, config, denoiser):
        lin = _out_proj(denoiser, config.module)
        return TechniqueSummary(unit="ffn_channels", units_total=lin.in_features, units_removed=1,
                                removed_fraction=1 / lin.in_features, details={"module": config.module})


FFN_PATCH = "toy.ffn_energy"


def install_ffn_energy(denoiser, recorder) -> Patch:
    """Per-channel mean |input| of every feed-forward output projection, on profiled steps."""

    def install(patch: Patch) -> None:
        for name, module in denoiser.named_modules():
            if not name.endswith(".ff"):
                continue

            def hook(lin, args, name=name):
                if recorder.active:
                    e = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).mean(0)
                    recorder.add_rows("toy_ffn", {"module": [name] * e.numel(), "channel": list(range(e.numel())),
                                                  "energy": e.tolist()})

            patch.undo.append(module.net[2].register_forward_pre_hook(hook).remove)

    return apply_patch(denoiser, FFN_PATCH, install)


def remove_ffn_energy(denoiser) -> bool:
    return remove_patch(denoiser, FFN_PATCH)


class Int8ScaleConfig(TechniqueConfig):
    module: str  # a Linear whose weight gets an int8 copy stored beside it (a buffer), to test dtypes


class Int8Scale(Technique):
    """Adds an int8 buffer ``qweight`` to one Linear: an *added* key whose dtype must survive save and load."""

    name = "toy_int8"
    version = 1
    Config = Int8ScaleConfig
    options = {"toy_int8": None}

    def plan(self, profile, options):
        return Plan(Int8ScaleConfig(module=options["toy_int8"])) if options.get("toy_int8") else None

    def apply(self, denoiser, config):
        lin = denoiser.get_submodule(config.module)
        w = lin.weight.detach()
        scale = w.abs().amax().clamp_min(1e-12) / 127
        lin.register_buffer("qweight", (w / scale).round().clamp(-127, 127).to(torch.int8))
        return Applied(self.name)

    def rebuild(self, denoiser, config):
        lin = denoiser.get_submodule(config.module)
        lin.register_buffer("qweight", torch.empty(lin.weight.shape, dtype=torch.int8, device=lin.weight.device))
        return Applied(self.name)

    def summary(self, config, denoiser):
        return TechniqueSummary(unit="int8_layers", units_total=None, units_removed=1)


class CountCallsConfig(TechniqueConfig):
    every: int = 1


class CountCalls(Technique):
    """Runtime-only: counts denoiser calls through a named, reversible patch; no tensor changes."""

    name = "toy_count_calls"
    version = 1
    Config = CountCallsConfig
    options = {"count_calls": False}
    PATCH = "toy.count_calls"

    def plan(self, profile, options):
        return Plan(CountCallsConfig()) if options.get("count_calls") else None

    def apply(self, denoiser, config):
        def install(patch: Patch) -> None:
            patch.state = {"calls": 0}

            def pre(module, args, kwargs):
                patch.state["calls"] += 1

            patch.undo.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True).remove)

        return Applied(self.name, apply_patch(denoiser, self.PATCH, install))

    rebuild = apply

    def summary(self, config, denoiser):
        return TechniqueSummary(details={"every": config.every})


@contextlib.contextmanager
def registered(*techniques: Technique):
    """Register the toys for the block's duration (tests' module fixtures), unregistered whatever happens."""
    from fragcli.techniques import REGISTRY

    for t in techniques:
        REGISTRY.register(t)
    try:
        yield list(techniques)
    finally:
        for t in techniques:
            REGISTRY.unregister(t.name)
