"""Open a fragment as a ready pipeline without materialising what the fragment replaces (``open_fragment``).

``load_fragment`` applies a fragment to a full pipeline that is already in memory. ``open_fragment`` starts from
the fragment instead: when the base model is a diffusers folder, the denoiser is built on the meta device, the
fragment's stack is rebuilt on it (pruned, factored, quantized structure), and every tensor is then read once, from
the fragment's delta or from the base model's safetensors, in its final shape and dtype. The full-precision weights
of a quantized or removed layer are never read, and components the fragment makes unnecessary (evicted text
encoders) are never loaded. A base model built in memory (``random:sd15``) or a single-file checkpoint is loaded in
full and the fragment applied to it (the same result, a higher load peak).
"""

from __future__ import annotations

import json
from pathlib import Path

from fragcli.errors import FragError


def _weight_files(folder: Path) -> list[Path]:
    """The denoiser's safetensors files (one file, or the shards of an index)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            raise FragError(f"{index[0]} is not a readable safetensors index", "re-save the model folder") from None
        return [folder / n for n in names]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    if not files:
        raise FragError(f"{folder} has no safetensors weights", "frag loads safetensors only; re-save the folder")
    return files


def _stream_denoiser(folder: Path, prefix: str, steps, delta: dict, manifest, torch_dtype):
    """The fragment's denoiser: structure on meta, rebuilt by the stack, tensors from the delta and the base."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    from fragcli.fragment import check_delta
    from fragcli.models import component_class
    from fragcli.techniques.stack import check_stack, rebuild_stack

    cls = component_class(folder, prefix)
    with init_empty_weights(include_buffers=True):
        den = cls.from_config(cls.load_config(folder / prefix))
    check_delta(den, check_stack(den, steps), manifest, delta, prefix)
    rebuild_stack(den, steps)
    wanted = den.state_dict()
    strip = len(prefix) + 1
    state = {}
    for key, tensor in delta.items():
        state[key[strip:]] = tensor.to(torch_dtype) if tensor.is_floating_point() and tensor.dtype.itemsize > 1 \
            else tensor
    need = [k for k in wanted if k not in state]
    for path in _weight_files(folder / prefix):
        with safe_open(str(path), framework="pt") as fh:
            for key in set(need) & set(fh.keys()):
                t = fh.get_tensor(key)
                state[key] = t.to(torch_dtype) if t.is_floating_point() else t
    missing = [k for k in wanted if k not in state]
    if missing:
        raise FragError(f"the base model's {prefix} lacks tensor {missing[0]}", "pass the fragment's base model")
    den.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*den.named_parameters(), *den.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the state dict does not hold: let the ordinary path build it
        raise _NotStreamable(f"{prefix}.{left[0]} has no stored value")
    return den.eval()


class _NotStreamable(Exception):
    pass


def open_fragment(folder: str | Path, *, model: str | None = None, device: str = "auto", dtype: str = "auto",
                  evict_text_encoders: bool | None = None):
    """The fragment's pipeline as a ``LoadedModel``, ready to run; FragError when the fragment is refused.

    ``model`` is the base model (default: the fragment's own); ``evict_text_encoders`` None = the fragment's
    default. Nothing is unpickled: every tensor comes from safetensors.
    """
    from fragcli.fragment import _read_delta, attach_steps, read_extras, reloader, verify_fragment
    from fragcli.models import (
        LoadedModel,
        _quiet_loading,
        load_model,
        resolve_device,
        resolve_dtype,
        resolve_spec,
    )
    from fragcli.models.builtin import read_frag_json
    from fragcli.models.hashing import hash_model_path
    from fragcli.techniques.stack import steps_from_entries

    folder = Path(folder)
    manifest = verify_fragment(folder, None)
    spec = model or manifest.base_model.spec
    base, name, source = resolve_spec(spec)
    if base is None or base.is_file():
        loaded = load_model(spec, device, dtype)
        from fragcli.fragment import load_fragment

        load_fragment(loaded, folder, evict_text_encoders=evict_text_encoders)
        return loaded
    dev = resolve_device(device)
    dtype_name, torch_dtype = resolve_dtype(dtype, dev)
    model_hash = hash_model_path(base)
    manifest = verify_fragment(folder, model_hash)
    prefix = manifest.base_model.denoiser
    steps = steps_from_entries(manifest.techniques)
    delta = _read_delta(folder, manifest, "cpu")
    try:
        with _quiet_loading():
            den = _stream_denoiser(base, prefix, steps, delta, manifest, torch_dtype)
    except _NotStreamable:
        loaded = load_model(spec, device, dtype)
        from fragcli.fragment import load_fragment

        load_fragment(loaded, folder, evict_text_encoders=evict_text_encoders)
        return loaded
    skip = [p for s in steps for p in s.technique.evicts(s.config, evict_text_encoders)]
    index = json.loads((base / "model_index.json").read_text())
    dropped = {n: None for n, e in index.items() if any(n.startswith(p) for p in skip) and isinstance(e, list)}
    from diffusers import DiffusionPipeline

    with _quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch_dtype, use_safetensors=True,
                                                 local_files_only=True, **{prefix: den}, **dropped)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)
    pipe._frag_model_hash = model_hash
    pipe._frag_fragment = manifest.name
    loaded = LoadedModel(pipe, name, source, model_hash, dev, dtype_name, read_frag_json(base), base)
    attach_steps(pipe, steps, read_extras(folder, manifest, steps, dev), evict_text_encoders,
                 reloader(loaded, pipe))
    return loaded
