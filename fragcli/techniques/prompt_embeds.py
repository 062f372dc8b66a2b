"""Cached prompt embeddings: the fragment stores its prompt's text-encoder outputs; the text encoders may be evicted.

A fragment is built for one prompt, so what the text encoders make of it never changes. At extract time
``capture`` runs the pipeline exactly as frag calls it, stops it right after ``encode_prompt`` (no denoising step
runs), and keeps whatever ``encode_prompt`` returned, for every architecture alike: ``(cond, uncond)`` for SD 1.5,
the pooled embeddings too for SDXL, T5 and CLIP outputs for SD3/Flux. A second capture with two prompts tells which
outputs grow with the batch (and proves that repeating the one-prompt rows reproduces them exactly).

At load time ``attach`` installs a named, reversible patch on the pipeline's ``encode_prompt``: a call for the
fragment's prompt (same negative prompt, same other arguments) returns the stored tensors, repeated to the batch;
any other call goes to the original ``encode_prompt``. With ``evict_text_encoders`` the text encoders are dropped
from the pipeline (their memory freed); a call for another wording then loads them on the CPU, encodes once, and
releases them again (the last few such encodings are kept, they are small).

The cached embeddings are the tensors the encoder produced for one image, so a one-image call is bit-identical to
encoding the prompt (in the same dtype; a fragment loaded in another float dtype casts them). A batch gets those rows
repeated; encoding a batch gives the same rows up to float rounding (batched kernels differ in the last bits: the
pooled CLIP embedding of SDXL/SD3 moved by 2.4e-7 between batch 1 and 2), so the capture accepts a batch-of-two
output within ``TOLERANCE`` of the repeated one-image rows (relative to the tensor's largest magnitude) and refuses
anything further apart (an output that truly depends on the batch). ``encode_prompt``'s catch-all keyword arguments
(PixArt's ``**kwargs``) are compared one by one like its named ones.
"""

from __future__ import annotations

import gc
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.generation import denoiser_of
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import Applied, Plan, Technique, TechniqueConfig, TechniqueSummary

PATCH = "frag.prompt_embeds"
TEXT_ENCODER_PREFIX = "text_encoder"
_VARYING = ("prompt", "negative_prompt", "device", "num_images_per_prompt")  # what a cached call may differ in
_SCALARS = (type(None), bool, int, float, str)
_REMEMBER = 8  # encodings of other wordings kept while the encoders are evicted
TOLERANCE = 1e-5  # batch-of-two vs repeated one-image rows, relative to the tensor's largest magnitude


class OutputSpec(BaseModel):
    """One item of ``encode_prompt``'s return value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(description="tensor key in prompt_embeds.safetensors; null when the output is None")
    batched: bool = Field(False, description="the first dimension is the batch (repeated per image at run time)")


class PromptEmbedsConfig(TechniqueConfig):
    """The prompt whose embeddings the fragment stores, how ``encode_prompt`` was called, and what it returned."""

    prompt: str = Field(description="the prompt, as passed to the pipeline")
    negative_prompt: str | None = Field(None, description="the negative prompt as passed (null: none)")
    evict_text_encoders: bool = Field(False, description="default for load_fragment: drop the text encoders")
    arguments: dict[str, Any] = Field(default_factory=dict,
                                      description="encode_prompt's other arguments at capture (must match to reuse)")
    outputs: list[OutputSpec] | None = Field(None, description="encode_prompt's outputs; null until captured")
    single: bool = Field(False, description="encode_prompt returned one tensor rather than a tuple")


def text_encoder_names(pipe) -> list[str]:
    """Components of ``pipe`` that are text encoders (``text_encoder``, ``text_encoder_2``, ...)."""
    comps = getattr(pipe, "components", {}) or {}
    return [n for n in comps if n.startswith(TEXT_ENCODER_PREFIX)]


class _Captured(Exception):
    """Raised by the spy after encode_prompt returned: stops the pipeline before any denoising step."""


def _bound(fn, args, kwargs) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in; a ``**kwargs`` catch-all is flattened into them."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(out.get(name), dict):
            out.update(out.pop(name))
    return out


def _spy_call(pipe, run: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``run()`` (a pipeline call) until ``encode_prompt`` returns; its bound arguments and its result."""
    original = pipe.encode_prompt
    box: dict[str, Any] = {}

    def spy(*args, **kwargs):
        box["args"] = _bound(original, args, kwargs)
        box["out"] = original(*args, **kwargs)
        raise _Captured

    pipe.__dict__["encode_prompt"] = spy
    try:
        run()
    except _Captured:
        pass
    finally:
        pipe.__dict__.pop("encode_prompt", None)
    if "out" not in box:
        raise FragError(f"{type(pipe).__name__} did not call encode_prompt: its prompt embeddings cannot be cached",
                        "extract without --cache-prompt / --evict-text-encoders")
    return box["args"], box["out"]


def _same(a, b) -> bool:
    """Same shape and dtype, and equal up to ``TOLERANCE`` of the largest magnitude (exactly, for integers)."""
    import torch

    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-12)
    return bool(torch.isfinite(a).all() and torch.isfinite(b).all()) and float((a - b).abs().max()) <= TOLERANCE * scale


def _repeat(t, n: int):
    return t.repeat(n, *([1] * (t.dim() - 1)))


def _normal(text) -> str | None:
    return None if text is None else " ".join(str(text).split())


def _as_list(value) -> list | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def capture_embeddings(loaded, settings, prompt: str, negative_prompt: str | None,
                       evict: bool) -> tuple[PromptEmbedsConfig, dict[str, Any]]:
    """Capture ``encode_prompt``'s outputs for ``prompt`` through the pipeline call frag makes (batch 1 and 2)."""
    from fragcli.generation import run_batch

    pipe = loaded.pipe
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise FragError(f"{type(pipe).__name__} has no encode_prompt: its prompt embeddings cannot be cached",
                        "extract without --cache-prompt / --evict-text-encoders")
    if not text_encoder_names(pipe) or all(getattr(pipe, n, None) is None for n in text_encoder_names(pipe)):
        raise FragError("this pipeline has no text encoder loaded to capture the prompt embeddings from",
                        "load the full base model to extract the fragment")
    one = settings.__class__(**{**settings.as_dict(), "steps": 1})
    args1, out1 = _spy_call(pipe, lambda: run_batch(pipe, one, [0], loaded.device, prompt=prompt))
    _args2, out2 = _spy_call(pipe, lambda: run_batch(pipe, one, [0, 1], loaded.device, prompt=prompt))
    single = not isinstance(out1, tuple)
    items1, items2 = ((out1,), (out2,)) if single else (out1, out2)
    outputs, tensors = [], {}
    for i, (a, b) in enumerate(zip(items1, items2, strict=True)):
        if a is None:
            outputs.append(OutputSpec(key=None))
            continue
        batched = a.dim() > 0 and a.shape[0] == 1 and b is not None and b.dim() > 0 and b.shape[0] == 2
        expect = _repeat(a, 2) if batched else a
        if not _same(expect, b):
            raise FragError(f"{type(pipe).__name__}.encode_prompt output {i} differs between the images of a batch "
                            f"by more than {TOLERANCE:g} (relative): it cannot be cached",
                            "extract without --cache-prompt / --evict-text-encoders")
        key = f"output.{i}"
        tensors[key] = a.detach().clone().contiguous().cpu()
        outputs.append(OutputSpec(key=key, batched=batched))
    arguments = {}
    for name, value in args1.items():
        if name in _VARYING:
            continue
        if not isinstance(value, _SCALARS):
            raise FragError(f"encode_prompt was called with a {type(value).__name__} for {name}: it cannot be cached",
                            "extract without --cache-prompt / --evict-text-encoders")
        arguments[name] = value
    negs = _as_list(args1.get("negative_prompt"))
    config = PromptEmbedsConfig(prompt=prompt, negative_prompt=None if negs is None else _normal(negs[0]),
                                evict_text_encoders=evict, arguments=arguments, outputs=outputs, single=single)
    return config, tensors


class _Encoders:
    """Loads a pipeline's evicted text encoders on the CPU for one call, then releases them."""

    def __init__(self, pipe, names: list[str], reload: Callable[[], dict[str, Any]] | None):
        self.pipe, self.names, self.reload = pipe, names, reload
        self.recent: OrderedDict = OrderedDict()

    def encode(self, original, key, args, kwargs):
        import torch

        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        if self.reload is None:
            raise FragError("the text encoders were evicted and frag does not know where to reload them from",
                            "load the fragment with evict_text_encoders=False, or through fragcli.models.load_model")
        modules = self.reload()
        bound = _bound(original, args, kwargs)
        device = bound.get("device")
        bound["device"] = torch.device("cpu")
        try:
            for name in self.names:
                setattr(self.pipe, name, modules[name])
            out = original(**bound)
        finally:
            for name in self.names:
                setattr(self.pipe, name, None)
            del modules  # the last reference: freed now (no gc.collect, which costs more than the encoding)
        out = _to(out, device)
        self.recent[key] = out
        while len(self.recent) > _REMEMBER:
            self.recent.popitem(last=False)
        return out


def _to(out, device):
    if device is None:
        return out
    if isinstance(out, tuple):
        return tuple(_to(x, device) for x in out)
    return out.to(device) if hasattr(out, "to") else out


def _key(bound: dict[str, Any]) -> tuple | None:
    """A hashable key of an encode_prompt call (None when it carries tensors, e.g. precomputed embeddings)."""
    items = []
    for name, value in sorted(bound.items()):
        if name == "device":
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
            value = tuple(value)
        elif not isinstance(value, _SCALARS):
            return None
        items.append((name, value))
    return tuple(items)


def install_cache(pipe, config: PromptEmbedsConfig, tensors: dict[str, Any], evict: bool,
                  reload: Callable[[], dict[str, Any]] | None) -> Patch:
    """The named, reversible patch: cached outputs for the fragment's prompt, the original (or reloaded) encoders
    for anything else; with ``evict`` the text encoders leave the pipeline (``remove_cache`` reloads them)."""
    if config.outputs is None:
        raise FragError("fragment's prompt embeddings were never captured", "rebuild the fragment with frag extract")
    missing = [o.key for o in config.outputs if o.key is not None and o.key not in tensors]
    if missing:
        raise FragError(f"prompt embeddings {missing[:2]} are missing from the fragment", "rebuild the fragment")
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise FragError(f"{type(pipe).__name__} has no encode_prompt for the fragment's cached prompt embeddings",
                        "load the fragment into the pipeline type it was built with")
    names = text_encoder_names(pipe)

    def install(patch: Patch) -> None:
        original = pipe.encode_prompt
        den = denoiser_of(pipe)
        dtype = next(den.parameters()).dtype if den is not None else None
        stored = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t) for k, t in tensors.items()}
        patch.state = {"hits": 0, "misses": 0, "evicted": False}
        encoders = None
        if evict:  # nothing keeps a reference to the encoders, so their memory is freed
            encoders = _Encoders(pipe, names, reload)
            for n in names:
                setattr(pipe, n, None)
            patch.state["evicted"] = True

            def put_back():
                if reload is not None:
                    modules = reload()
                    for n in names:
                        setattr(pipe, n, modules[n])

            patch.undo.append(put_back)
            gc.collect()

        def cached(*args, **kwargs):
            bound = _bound(original, args, kwargs)
            prompts = _as_list(bound.get("prompt"))
            negs = _as_list(bound.get("negative_prompt"))
            same_prompt = bool(prompts) and all(isinstance(p, str) and _normal(p) == _normal(config.prompt)
                                                for p in prompts)
            if config.negative_prompt is None:
                same_neg = negs is None
            else:
                same_neg = negs is not None and all(isinstance(x, str) and _normal(x) == config.negative_prompt
                                                    for x in negs)
            same_args = all(bound.get(k) == v for k, v in config.arguments.items()) and all(
                k in config.arguments or k in _VARYING for k in bound)
            if same_prompt and same_neg and same_args:
                patch.state["hits"] += 1
                n = len(prompts) * int(bound.get("num_images_per_prompt") or 1)
                device = bound.get("device")
                out = []
                for spec in config.outputs:
                    if spec.key is None:
                        out.append(None)
                        continue
                    t = stored[spec.key]
                    t = _repeat(t, n) if spec.batched else t
                    out.append(t.to(device) if device is not None else t)
                return out[0] if config.single else tuple(out)
            patch.state["misses"] += 1
            if encoders is None:
                return original(*args, **kwargs)
            key = _key(bound)
            if key is None:  # precomputed embeddings passed in: the original needs no encoder for them
                return original(*args, **kwargs)
            return encoders.encode(original, key, args, kwargs)

        pipe.__dict__["encode_prompt"] = cached
        patch.undo.append(lambda: pipe.__dict__.pop("encode_prompt", None))

    return apply_patch(pipe, PATCH, install)


def remove_cache(pipe) -> bool:
    """Remove the cache patch (and put evicted text encoders back)."""
    return remove_patch(pipe, PATCH)


class PromptEmbeds(Technique):
    """Store the prompt's text embeddings in the fragment; optionally run without the text encoders at all."""

    name = "prompt_embeds"
    version = 1
    Config = PromptEmbedsConfig
    options = {"cache_prompt": False, "evict_text_encoders": False}

    def plan(self, profile, options: dict) -> Plan | None:
        evict = bool(options.get("evict_text_encoders"))
        if not (options.get("cache_prompt") or evict):
            return None
        ctx = profile.context
        return Plan(PromptEmbedsConfig(prompt=ctx["prompt"], negative_prompt=ctx.get("negative_prompt") or None,
                                       evict_text_encoders=evict))

    def capture(self, loaded, config: PromptEmbedsConfig, settings):
        return capture_embeddings(loaded, settings, config.prompt, config.negative_prompt,
                                  config.evict_text_encoders)

    def attach(self, pipe, config: PromptEmbedsConfig, tensors: dict, *, evict: bool | None = None,
               reload: Callable[[], dict[str, Any]] | None = None) -> Patch:
        return install_cache(pipe, config, tensors, config.evict_text_encoders if evict is None else evict, reload)

    def evicts(self, config: PromptEmbedsConfig, evict: bool | None = None) -> list[str]:
        return [TEXT_ENCODER_PREFIX] if (config.evict_text_encoders if evict is None else evict) else []

    def apply(self, denoiser, config) -> Applied:
        return Applied(self.name)  # nothing in the denoiser changes

    rebuild = apply

    def summary(self, config: PromptEmbedsConfig, denoiser) -> TechniqueSummary:
        return TechniqueSummary(unit="text_encoders_evicted" if config.evict_text_encoders else None,
                                details={"prompt": config.prompt, "negative_prompt": config.negative_prompt,
                                         "outputs": len(config.outputs or []),
                                         "evict_text_encoders": config.evict_text_encoders})
