"""Fragments on disk: build (`extract`), verify and load (`load_fragment`), find (`--fragment auto`)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fragcli import __version__
from fragcli.errors import FragError
from fragcli.manifest import (
    Artifact,
    BaseModelRef,
    Generation,
    Manifest,
    Pruning,
    read_manifest,
    write_manifest,
)
from fragcli.memory import param_count, weight_bytes
from fragcli.models.hashing import sha256_file
from fragcli.paths import atomic_write_json, fragments_dir, inside, staged_dir
from fragcli.techniques import HeadPruneConfig, apply_technique
from fragcli.techniques.head_prune import heads_per_module, pruned_tensor_names

WEIGHTS = "fragment.safetensors"
SELECTION = "selection.json"


def build_fragment(model, context: dict, selection: dict, out: Path, name: str, costs: dict) -> Manifest:
    """Prune ``model`` in place by ``selection`` and write the fragment folder ``out`` atomically."""
    from safetensors.torch import save_file

    den = model.denoiser
    before_params, before_bytes = param_count(model.pipe), weight_bytes(model.pipe)
    removed = {m: r for m, r in selection["removed"].items() if r}
    pruned = apply_technique(den, HeadPruneConfig(removed))
    state = den.state_dict()
    prefix = model.denoiser_name
    delta = {f"{prefix}.{k}": state[k].detach().contiguous().cpu() for k in pruned_tensor_names(den, pruned)}
    p = selection["params"]
    with staged_dir(out) as tmp:
        save_file(delta, str(tmp / WEIGHTS), metadata={"format": "pt", "frag": __version__})
        atomic_write_json(tmp / SELECTION, selection)
        artifacts = {f: Artifact(sha256=sha256_file(tmp / f), bytes=(tmp / f).stat().st_size) for f in (WEIGHTS, SELECTION)}
        manifest = Manifest(
            frag_version=__version__,
            name=name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            base_model=BaseModelRef(**{k: context["model"][k] for k in ("name", "source", "hash", "dtype", "denoiser")}),
            generation=Generation(
                prompt=context["prompt"], negative_prompt=context.get("negative_prompt", ""),
                text_embedding_hash=context.get("text_embedding_hash"), seeds=context["seeds"], steps=context["steps"],
                profiled_steps=context["profiled_steps"], guidance=context["guidance"], width=context["width"],
                height=context["height"], profile_dir=context.get("profile_dir"),
            ),
            pruning=Pruning(
                score=p["score"], heads_removed=removed, heads_total=selection["heads_total"],
                heads_kept=selection["heads_total"] - selection["heads_removed"], head_retention=p["head_retention"],
                achieved_retention=selection["achieved_retention"], per_module=p["per_module"],
                safety_margin=p["safety_margin"], stability_threshold=p["stability_threshold"],
            ),
            structure=heads_per_module(den),
            params={"before": before_params, "after": param_count(model.pipe),
                    "removed": before_params - param_count(model.pipe)},
            weight_bytes={"before": before_bytes, "after": weight_bytes(model.pipe)},
            costs=costs,
            artifacts=artifacts,
        )
        write_manifest(tmp, manifest)
    return manifest


def verify_fragment(folder: Path, model_hash: str | None) -> Manifest:
    """Check the manifest, every artifact's path and hash, and the base model; no weights are touched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FragError(f"fragment folder {folder} does not exist", "pass a folder written by frag extract")
    manifest = read_manifest(folder)
    if WEIGHTS not in manifest.artifacts:
        raise FragError(f"manifest in {folder} lists no {WEIGHTS}", "rebuild the fragment with frag extract")
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


def load_fragment(pipe, folder: str | Path, model_hash: str | None = None):
    """Verify ``folder`` against ``pipe``'s base model, rebuild the pruned structure, load the delta strictly.

    ``pipe`` is a diffusers pipeline (or a ``LoadedModel``); returns the pipeline, ready to run. Nothing is unpickled:
    weights come from safetensors only.
    """
    from safetensors.torch import load_file

    loaded = pipe if hasattr(pipe, "pipe") else None
    if loaded is not None:
        pipe, model_hash = loaded.pipe, model_hash or loaded.hash
    model_hash = model_hash or _model_hash(pipe)
    if model_hash is None:
        raise FragError("cannot tell which model this pipeline is", "load it with fragcli.models.load_model, or pass model_hash=")
    folder = Path(folder)
    manifest = verify_fragment(folder, model_hash)
    denoiser_name = manifest.base_model.denoiser
    den = getattr(pipe, denoiser_name)
    if getattr(pipe, "_frag_fragment", None):
        raise FragError("this pipeline already has a fragment loaded", "load the base model again first")
    delta = load_file(str(inside(folder, WEIGHTS)))
    removed = manifest.pruning.heads_removed
    apply_technique(den, HeadPruneConfig(removed))
    pipe._frag_fragment = manifest.name  # from here on the pipeline is modified
    if heads_per_module(den) != manifest.structure:
        raise FragError(f"fragment {manifest.name}: rebuilt structure differs from the manifest", "rebuild the fragment")
    state = den.state_dict()
    expected = {f"{denoiser_name}.{k}" for k in pruned_tensor_names(den, [m for m, r in removed.items() if r])}
    if set(delta) != expected:
        raise FragError(f"fragment {manifest.name}: tensors {sorted(set(delta) ^ expected)[:3]} do not match the structure",
                        "rebuild the fragment with frag extract")
    import torch

    with torch.no_grad():
        for key, tensor in delta.items():
            target = state[key[len(denoiser_name) + 1 :]]
            if target.shape != tensor.shape:
                raise FragError(f"fragment tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}",
                                "rebuild the fragment with frag extract")
            target.copy_(tensor.to(target.dtype))
    return pipe


def find_fragment(model_hash: str, prompt: str, root: Path | None = None) -> Path | None:
    """`--fragment auto`: the newest valid fragment under ``fragments/`` for this model and (normalised) prompt."""
    root = Path(root) if root else fragments_dir()
    if not root.is_dir():
        return None
    want = " ".join(prompt.lower().split())
    found = []
    for mf in root.glob("*/manifest.json"):
        try:
            m = read_manifest(mf.parent)
        except FragError:
            continue
        if m.base_model.hash == model_hash and " ".join(m.generation.prompt.lower().split()) == want:
            found.append((m.created, mf.parent))
    return max(found)[1] if found else None
