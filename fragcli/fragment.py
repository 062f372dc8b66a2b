"""Fragments on disk: build (``frag extract``), verify and load (``load_fragment``), find (``--fragment auto``).

Nothing here knows a technique: a fragment is an ordered stack of technique entries (manifest ``techniques``) plus
a generic state-dict delta (``fragment.safetensors``: the tensors changed or added, with their dtypes) and any plan
records the techniques wrote (e.g. ``selection.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fragcli import __version__
from fragcli.errors import FragError
from fragcli.manifest import (
    WEIGHTS,
    Artifact,
    BaseModelRef,
    Costs,
    Manifest,
    Profiling,
    TechniqueEntry,
    WeightDelta,
    read_manifest,
    write_manifest,
)
from fragcli.memory import param_count, weight_bytes
from fragcli.models.hashing import sha256_file
from fragcli.paths import atomic_write_json, fragments_dir, inside, staged_dir
from fragcli.techniques.base import Plan, Technique
from fragcli.techniques.stack import (
    Step,
    apply_stack,
    check_stack,
    rebuild_stack,
    snapshot,
    state_diff,
    steps_from_entries,
)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def plan_steps(plans: list[Plan]) -> list[Step]:
    from fragcli.techniques import REGISTRY

    return [Step(REGISTRY.for_config(p.config), p.config) for p in plans]


def build_fragment(model, context: dict, plans: list[Plan], out: Path, name: str, costs: dict,
                   context_sha256: str | None = None, extra=None) -> Manifest:
    """Apply ``plans`` (checked as a whole first) to ``model`` in place and write the fragment folder ``out``
    (``extra(staging_folder) -> [file names]`` writes more hashed artifacts, e.g. recipe.json)."""
    from safetensors.torch import save_file

    den, prefix = model.denoiser, model.denoiser_name
    before_params, before_bytes = param_count(model.pipe), weight_bytes(model.pipe)
    steps = plan_steps(plans)
    captured = capture_steps(model, context, steps)  # from the whole pipeline, before anything changes
    before = snapshot(den)
    steps = apply_stack(den, steps)
    changed, added, removed = state_diff(before, den)
    state = den.state_dict()
    delta = {f"{prefix}.{k}": state[k].detach().contiguous().cpu() for k in changed + added}
    after_params = param_count(model.pipe)
    with staged_dir(out) as tmp:
        files = []
        if delta:
            save_file(delta, str(tmp / WEIGHTS), metadata={"format": "pt", "frag": __version__})
            files.append(WEIGHTS)
        for tname, tensors in captured.items():
            save_file(tensors, str(tmp / extra_file(tname)), metadata={"format": "pt", "frag": __version__})
            files.append(extra_file(tname))
        for plan in plans:
            if plan.record is not None and plan.file:
                atomic_write_json(inside(tmp, plan.file), plan.record)
                files.append(plan.file)
        if extra is not None:
            files += extra(tmp)
        artifacts = {f: Artifact(sha256=sha256_file(tmp / f), bytes=(tmp / f).stat().st_size) for f in files}
        weights = None
        if delta or removed:
            weights = WeightDelta(file=WEIGHTS if delta else None, changed=[f"{prefix}.{k}" for k in changed],
                                  added=[f"{prefix}.{k}" for k in added], removed=[f"{prefix}.{k}" for k in removed])
        manifest = Manifest(
            frag_version=__version__,
            name=name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            base_model=BaseModelRef(**{k: context["model"][k] for k in ("name", "source", "hash", "dtype", "denoiser")}),
            profiling=Profiling(
                prompt=context["prompt"], negative_prompt=context.get("negative_prompt", ""),
                prompt_embedding_hash=context.get("text_embedding_hash"), seeds=context["seeds"],
                steps=context["steps"], profiled_steps=context["profiled_steps"], guidance=context["guidance"],
                width=context["width"], height=context["height"], context_sha256=context_sha256,
            ),
            techniques=[TechniqueEntry.model_validate(s.entry()) for s in steps],
            weights=weights,
            params={"before": before_params, "after": after_params, "removed": before_params - after_params},
            weight_bytes={"before": before_bytes, "after": weight_bytes(model.pipe)},
            costs=Costs(**costs),
            artifacts=artifacts,
        )
        write_manifest(tmp, manifest)
    return manifest


def extra_file(technique: str) -> str:
    """The file holding a pipeline-level technique's captured tensors (e.g. prompt_embeds.safetensors)."""
    return f"{technique}.safetensors"


def capture_steps(model, context: dict, steps: list[Step]) -> dict[str, dict]:
    """Run every step's ``capture`` on the unchanged pipeline; resolved configs replace the planned ones."""
    from fragcli.generation import resolve_settings

    out: dict[str, dict] = {}
    settings = None
    for step in steps:
        if type(step.technique).capture is Technique.capture:
            continue  # the protocol's default: nothing to capture
        if settings is None:
            settings = resolve_settings(model, context["prompt"], context["steps"], context.get("guidance"),
                                        context.get("width"), context.get("height"), context.get("negative_prompt", ""))
        got = step.technique.capture(model, step.config, settings)
        if got is not None:
            step.config, tensors = got
            if tensors:
                out[step.technique.name] = tensors
    return out


def verify_fragment(folder: Path, model_hash: str | None) -> Manifest:
    """Check the manifest, every artifact's path and hash, and the base model; no weights are touched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FragError(f"fragment folder {folder} does not exist", "pass a folder written by frag extract")
    manifest = read_manifest(folder)
    w = manifest.weights
    if w is not None and w.file and w.file not in manifest.artifacts:
        raise FragError(f"manifest in {folder} lists no artifact for its weights {w.file}",
                        "rebuild the fragment with frag extract")
    for rel, art in manifest.artifacts.items():
        path = inside(folder, rel)
        if not path.is_file():
            raise FragError(f"fragment artifact {rel} is missing from {folder}", "rebuild the fragment with frag extract")
        if path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
            raise FragError(f"fragment artifact {rel} does not match its hash (corrupt or edited)",
                            "rebuild the fragment with frag extract")
    if model_hash is not None and model_hash != manifest.base_model.hash:
        raise FragError(f"fragment {manifest.name} was built for model {manifest.base_model.name} "
                        f"({manifest.base_model.hash[:12]}), not this one ({model_hash[:12]})",
                        "pass the fragment's base model with --model, or rebuild the fragment")
    return manifest


def _model_hash(pipe) -> str | None:
    """The hash frag's loader recorded, else the hash of the local folder diffusers loaded the pipeline from."""
    known = getattr(pipe, "_frag_model_hash", None)
    if known:
        return known
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    if source and Path(source).is_dir():
        from fragcli.models.hashing import hash_model_path

        return hash_model_path(Path(source))
    return None


def _read_delta(folder: Path, manifest: Manifest, device) -> dict:
    from safetensors.torch import load_file

    w = manifest.weights
    if w is None or not w.file:
        return {}
    try:
        delta = load_file(str(inside(folder, w.file)), device=str(device))
    except Exception as exc:  # SafetensorError for a damaged file whose hash was recorded damaged
        raise FragError(f"fragment weights {w.file} cannot be read ({str(exc).splitlines()[0][:100]})",
                        "rebuild the fragment with frag extract") from None
    expected = set(w.changed) | set(w.added)
    if set(delta) != expected:
        diff = sorted(set(delta) ^ expected)[:3]
        raise FragError(f"fragment {manifest.name}: tensors {diff} in {w.file} do not match the manifest",
                        "rebuild the fragment with frag extract")
    return delta


def _compatible(stored, target) -> bool:
    """Float tensors follow the denoiser's float dtype; anything else (int8, fp8) must match exactly."""
    s, t = str(stored).replace("torch.", ""), str(target).replace("torch.", "")
    return s == t or (s in FLOAT_DTYPES and t in FLOAT_DTYPES)


def check_delta(den, meta, manifest: Manifest, delta: dict, prefix: str) -> None:
    """The rebuilt (meta) structure against the delta's keys, shapes and dtypes, and the rest against the base."""
    name = manifest.name
    base = {k: (tuple(t.shape), t.dtype) for k, t in den.state_dict().items()}
    rebuilt = {k: (tuple(t.shape), t.dtype) for k, t in meta.state_dict().items()}
    strip = len(prefix) + 1
    for key in manifest.weights.removed if manifest.weights else []:
        if key[strip:] in rebuilt:
            raise FragError(f"fragment {name}: tensor {key} should be removed but the rebuilt structure has it",
                            "rebuild the fragment with frag extract")
    for key, tensor in delta.items():
        if not key.startswith(prefix + "."):
            raise FragError(f"fragment tensor {key} is not part of the {prefix}", "rebuild the fragment with frag extract")
        want = rebuilt.get(key[strip:])
        if want is None:
            raise FragError(f"fragment tensor {key} has no place in the rebuilt structure",
                            "rebuild the fragment with frag extract")
        if tuple(tensor.shape) != want[0]:
            raise FragError(f"fragment tensor {key} has shape {tuple(tensor.shape)}, the rebuilt structure "
                            f"{want[0]}", "rebuild the fragment with frag extract")
        if not _compatible(tensor.dtype, want[1]):
            raise FragError(f"fragment tensor {key} is {tensor.dtype}, the rebuilt structure expects {want[1]}",
                            "rebuild the fragment with frag extract")
    for key, (shape, dtype) in rebuilt.items():
        if f"{prefix}.{key}" in delta:
            continue
        if base.get(key) != (shape, dtype):
            raise FragError(f"fragment {name}: rebuilt tensor {prefix}.{key} {shape} is neither in the delta nor "
                            "unchanged from the base model", "rebuild the fragment with frag extract")


@dataclass
class CheckedFragment:
    """A fragment that passed every check against one pipeline, ready to apply (``apply_fragment``)."""

    pipe: object
    manifest: Manifest
    steps: list[Step]
    delta: dict
    prefix: str
    extras: dict  # technique name -> its captured tensors (``<name>.safetensors``)


def check_fragment(pipe, folder: str | Path, model_hash: str | None = None) -> CheckedFragment:
    """Every check ``load_fragment`` makes (manifest, hashes, base model, the stack rebuilt on a meta copy against
    the delta's keys, shapes and dtypes), without changing ``pipe``; FragError on the first problem."""
    import torch

    loaded = pipe if hasattr(pipe, "pipe") else None
    if loaded is not None:
        pipe, model_hash = loaded.pipe, model_hash or loaded.hash
    model_hash = model_hash or _model_hash(pipe)
    if model_hash is None:
        raise FragError("cannot tell which model this pipeline is", "load it with fragcli.models.load_model, or pass model_hash=")
    folder = Path(folder)
    manifest = verify_fragment(folder, model_hash)
    prefix = manifest.base_model.denoiser
    den = getattr(pipe, prefix, None)
    if not isinstance(den, torch.nn.Module):
        raise FragError(f"this pipeline has no {prefix} for fragment {manifest.name}", "pass the fragment's base model")
    if getattr(pipe, "_frag_fragment", None):
        raise FragError("this pipeline already has a fragment loaded", "load the base model again first")
    steps = steps_from_entries(manifest.techniques)
    device = next(den.parameters()).device
    delta = _read_delta(folder, manifest, device)
    check_delta(den, check_stack(den, steps), manifest, delta, prefix)
    return CheckedFragment(pipe, manifest, steps, delta, prefix, read_extras(folder, manifest, steps, device))


def read_extras(folder: Path, manifest: Manifest, steps: list[Step], device) -> dict:
    """Every pipeline-level technique's captured tensors (hashes were checked by ``verify_fragment``)."""
    from safetensors.torch import load_file

    out = {}
    for step in steps:
        rel = extra_file(step.technique.name)
        if rel not in manifest.artifacts:
            continue
        try:
            out[step.technique.name] = load_file(str(inside(folder, rel)), device=str(device))
        except Exception as exc:  # SafetensorError
            raise FragError(f"fragment file {rel} cannot be read ({str(exc).splitlines()[0][:100]})",
                            "rebuild the fragment with frag extract") from None
    return out


def apply_fragment(checked: CheckedFragment, *, evict_text_encoders: bool | None = None, reload=None):
    """Rebuild the checked stack on the real denoiser, copy the delta in, and attach the pipeline-level techniques
    (``evict_text_encoders``: None = the fragment's own default; ``reload()`` returns the evicted components when
    a call needs them); returns the pipeline."""
    import torch

    pipe, prefix = checked.pipe, checked.prefix
    if getattr(pipe, "_frag_fragment", None):
        raise FragError("this pipeline already has a fragment loaded", "load the base model again first")
    den = getattr(pipe, prefix)
    pipe._frag_fragment = checked.manifest.name  # from here on the pipeline is modified
    rebuild_stack(den, checked.steps)
    state = den.state_dict()
    with torch.no_grad():
        for key, tensor in checked.delta.items():
            target = state[key[len(prefix) + 1 :]]
            target.copy_(tensor.to(target.dtype) if _compatible(tensor.dtype, target.dtype) else tensor)
    attach_steps(pipe, checked.steps, checked.extras, evict_text_encoders, reload)
    return pipe


def attach_steps(pipe, steps: list[Step], extras: dict, evict: bool | None, reload) -> None:
    for step in steps:
        step.technique.attach(pipe, step.config, extras.get(step.technique.name, {}), evict=evict, reload=reload)


def reloader(loaded=None, pipe=None):
    """A callable returning the pipeline's text encoders freshly loaded on the CPU (None when frag cannot tell where
    they come from): from the model's folder when it has one, else by loading the built-in model again."""
    folder = getattr(loaded, "folder", None)
    if folder is None and pipe is not None:
        source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
        folder = Path(source) if source and Path(source).is_dir() else None
    spec = f"{loaded.name}" if loaded is not None and str(loaded.source).startswith("builtin:") else None
    dtype = getattr(loaded, "dtype", None) or "fp32"
    if folder is None and spec is None:
        return None

    def reload() -> dict:
        from fragcli.models import load_components, load_model

        if folder is not None and Path(folder).is_dir():
            return load_components(Path(folder), "text_encoder", dtype)
        full = load_model(spec, "cpu", dtype)
        return {n: getattr(full.pipe, n) for n in full.pipe.components if n.startswith("text_encoder")}

    return reload


def load_fragment(pipe, folder: str | Path, model_hash: str | None = None, *,
                  evict_text_encoders: bool | None = None):
    """Verify ``folder`` against ``pipe``'s base model, check the rebuilt structure on a meta copy, then rebuild
    the real denoiser and load the delta. A refusal (FragError) leaves the pipeline untouched.

    ``pipe`` is a diffusers pipeline (or a ``LoadedModel``); returns the pipeline, ready to run. Nothing is unpickled:
    weights come from safetensors only. ``evict_text_encoders`` (None: the fragment's default, set by ``frag extract
    --evict-text-encoders``) drops the text encoders when the fragment caches its prompt's embeddings; another
    prompt then loads them on the CPU for one encoding.
    """
    loaded = pipe if hasattr(pipe, "pipe") else None
    checked = check_fragment(pipe, folder, model_hash)
    return apply_fragment(checked, evict_text_encoders=evict_text_encoders,
                          reload=reloader(loaded, checked.pipe))


def find_fragment(model_hash: str, prompt: str, root: Path | None = None) -> Path | None:
    """`--fragment auto`: the newest valid fragment under ``fragments/`` for this model and (normalised) prompt.

    Only finished fragments count: a folder whose manifest cannot be read, or that misses an artifact its manifest
    lists (being deleted, say), is skipped; so are hidden folders (staging folders, the old copy of a swap). A
    fragment hidden by a swap that a crash interrupted is put back first. Another process may write or delete
    fragments meanwhile: nothing it does here raises."""
    from fragcli.paths import recover_swap

    root = Path(root) if root else fragments_dir()
    if not root.is_dir():
        return None
    for old in root.glob(".*.old-*"):
        name = old.name[1:].rsplit(".old-", 1)[0]
        if name and not (root / name).exists():
            note = recover_swap(root / name)  # only an old copy of a dead process, and only if nobody beat us to it
            if note:
                from fragcli.console import warn

                warn(note)
    want = " ".join(prompt.lower().split())
    found = []
    for mf in root.glob("*/manifest.json"):
        folder = mf.parent
        if folder.name.startswith("."):
            continue  # a staging folder or the old copy of a swap, never a finished fragment
        try:
            m = read_manifest(folder)
            if m.base_model.hash != model_hash or " ".join(m.profiling.prompt.lower().split()) != want:
                continue
            if not all(inside(folder, rel).is_file() for rel in m.artifacts):
                continue
        except (FragError, OSError):
            continue  # malformed, or deleted or replaced while we looked
        found.append((m.created, str(folder), folder))
    return max(found)[2] if found else None
