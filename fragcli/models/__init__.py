"""Resolve a `--model` spec to a diffusers pipeline: built-ins, local folders, single files, HF cache ids."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fragcli.errors import FragError
from fragcli.models.builtin import BUILDERS, BUILTINS, builtin_folder, read_frag_json

SHIPPED = Path(__file__).resolve().parent / "shapes"
# trained models shipped inside the package: --model name -> folder (tools/train_shapes.py, tools/train_shapes_flux.py)
SHIPPED_MODELS = {"shapes": SHIPPED, "shapes-flux": SHIPPED.with_name("shapes_flux")}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def spec_of(model: dict) -> str:
    """The ``--model`` spec that loads a recorded model ({name, source}): a built-in's name, else its source."""
    return model["name"] if str(model["source"]).startswith("builtin:") else model["source"]


def default_model() -> str:
    """`shapes` once the trained model ships inside the package, else `tiny`."""
    return "shapes" if (SHIPPED / "model_index.json").is_file() else "tiny"


@dataclass
class LoadedModel:
    pipe: Any
    name: str
    source: str
    hash: str
    device: str
    dtype: str
    defaults: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def denoiser_name(self) -> str:
        return "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "hash": self.hash, "device": self.device,
            "dtype": self.dtype, "denoiser": self.denoiser_name,
        }


@contextmanager
def _quiet_loading():
    """diffusers/transformers warn about their own arguments and draw progress bars while loading; silence both,
    and restore the caller's warnings filters, log levels and progress-bar switches afterwards."""
    import warnings

    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    libs = (dlogging, tlogging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        for lib in libs:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, (level, bars) in zip(libs, saved, strict=True):
                lib.set_verbosity(level)
                if bars:
                    lib.enable_progress_bar()


def resolve_device(device: str) -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FragError(f"unknown --device {device!r}", "use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FragError("--device cuda was asked for but no CUDA device is available", "use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise FragError(f"unknown --dtype {dtype!r}", "use auto, fp32, fp16 or bf16")
    return dtype, getattr(torch, DTYPES[dtype])


def _is_hf_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _from_folder(folder: Path, torch_dtype):
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise FragError(f"{folder} is not a diffusers pipeline folder (no model_index.json)",
                        "pass a diffusers folder, a .safetensors checkpoint, or a built-in such as tiny")
    try:
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True,
                                                 local_files_only=True)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:200]
        raise FragError(f"cannot load the pipeline in {folder}: {msg}",
                        "frag loads safetensors weights only; convert .bin weights or re-save the folder") from None


def _from_single_file(path: Path, torch_dtype):
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise FragError(f"{path.name} is not a .safetensors checkpoint",
                        "frag never unpickles .ckpt/.bin files; convert it to safetensors")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise FragError(f"{path} is not a readable safetensors file ({exc})", "check the file") from None
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if any(k.startswith("conditioner.embedders.1") for k in keys) else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), torch_dtype=torch_dtype, local_files_only=True)
    except Exception as exc:  # diffusers raises many types here; the reason is what matters to the user
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FragError(f"cannot load single-file checkpoint {path.name}: {msg}",
                        "single files need their base config in the local HF cache; or pass a diffusers folder") from None


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # huggingface_hub raises LocalEntryNotFoundError and friends
        raise FragError(f"model {repo_id!r} is not in the local Hugging Face cache and this machine is offline",
                        "download it on a connected machine (huggingface-cli download) or pass a local folder") from None


def load_model(spec: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``spec`` (see ``--model``) on ``device`` in ``dtype``; every failure is a one-line FragError.

    Changes no process-wide state: torch threads, warnings filters, library log levels and torch's global RNG are
    as they were (``frag`` sets threads and log levels once, at start-up: ``fragcli.cli.app``).
    """
    with _quiet_loading():
        return _load_model((spec or default_model()).strip(), device, dtype)


def resolve_spec(spec: str) -> tuple[Path | None, str, str]:
    """``spec`` -> (folder or single file on disk, name, source) without loading anything; folder None for a
    built-in that is built in memory."""
    spec = (spec or default_model()).strip()
    if spec in BUILTINS and not BUILTINS[spec].on_disk:
        return None, spec, f"builtin:{spec}"
    if spec in BUILTINS:
        return builtin_folder(spec), spec, f"builtin:{spec}"
    if spec in SHIPPED_MODELS:
        if not (SHIPPED_MODELS[spec] / "model_index.json").is_file():
            raise FragError(f"the {spec} model is not shipped in this installation", "use --model tiny")
        return SHIPPED_MODELS[spec], spec, f"builtin:{spec}"
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return path.resolve(), path.resolve().name, str(path.resolve())
    if spec.endswith((".safetensors", ".ckpt", ".bin")) or spec.startswith((".", "/", "~")):
        raise FragError(f"model path {spec} does not exist", "check the path or use a built-in model (tiny)")
    if _is_hf_id(spec):
        return _hf_snapshot(spec), spec, f"hf:{spec}"
    raise FragError(f"unknown model {spec!r}",
                    "pass a diffusers folder, a .safetensors file, an HF id, or one of: "
                    + ", ".join([*SHIPPED_MODELS, *BUILTINS]))


def _load_model(spec: str, device: str, dtype: str) -> LoadedModel:
    import torch

    from fragcli.models.hashing import hash_model_path, hash_state_dict

    dev = resolve_device(device)
    dtype_name, torch_dtype = resolve_dtype(dtype, dev)
    defaults: dict = {}
    folder, name, source = resolve_spec(spec)
    if folder is None:
        with torch.random.fork_rng(devices=[]):  # the builders seed torch: keep the caller's RNG state
            pipe = BUILDERS[spec]()
        model_hash = _cached_builtin_hash(spec, pipe, hash_state_dict)
        defaults = dict(BUILTINS[spec].defaults)
        pipe = pipe.to(dtype=torch_dtype)
    else:
        if folder.is_file():
            pipe = _from_single_file(folder, torch_dtype)
        else:
            pipe = _from_folder(folder, torch_dtype)
            defaults = read_frag_json(folder)
        model_hash = hash_model_path(folder)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)
    pipe._frag_model_hash = model_hash
    return LoadedModel(pipe, name, source, model_hash, dev, dtype_name, defaults, folder)


def component_class(folder: Path, name: str):
    """The class of pipeline component ``name`` in a diffusers folder (from model_index.json)."""
    import importlib
    import json

    try:
        lib, cls = json.loads((Path(folder) / "model_index.json").read_text())[name]
        return getattr(importlib.import_module(lib), cls)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        raise FragError(f"{folder} has no loadable component {name!r} in model_index.json",
                        "pass a diffusers pipeline folder") from None


def load_components(folder: Path, prefix: str, dtype: str = "fp32", device: str = "cpu") -> dict:
    """Components of a diffusers folder whose names start with ``prefix`` (e.g. the text encoders), loaded alone."""
    import json

    import torch

    index = json.loads((Path(folder) / "model_index.json").read_text())
    torch_dtype = getattr(torch, DTYPES.get(dtype, "float32"))
    out = {}
    with _quiet_loading():
        for name, entry in index.items():
            if name.startswith(prefix) and isinstance(entry, list) and entry[0]:
                cls = component_class(folder, name)
                out[name] = cls.from_pretrained(Path(folder) / name, torch_dtype=torch_dtype, local_files_only=True,
                                                use_safetensors=True).to(device)
    return out


def peek_hash(spec: str | None) -> str | None:
    """The model hash of ``spec`` without loading it (a folder's files; a built-in's cached hash), else None."""
    from fragcli.models.hashing import hash_model_path

    folder, name, _source = resolve_spec(spec or default_model())
    if folder is not None:
        return hash_model_path(folder)
    return _cached_builtin_hash(name, None, None)


def _cached_builtin_hash(spec: str, pipe, hasher) -> str | None:
    """In-memory built-ins are deterministic: hash their weights once per (spec, torch, diffusers) and cache it."""
    import json

    import diffusers
    import torch

    from fragcli import __version__
    from fragcli.paths import atomic_write_json, cache_dir

    key = f"{spec}|{__version__}|{torch.__version__}|{diffusers.__version__}"
    path = cache_dir() / "builtin-hashes.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known and pipe is None:
        return None  # peek_hash: not hashed yet
    if key not in known:
        state = {}
        for comp in ("unet", "vae", "text_encoder"):
            state.update({f"{comp}.{k}": v for k, v in getattr(pipe, comp).state_dict().items()})
        known[key] = hasher(state)
        try:
            atomic_write_json(path, known)
        except (OSError, FragError):
            pass  # a read-only FRAG_HOME only costs a re-hash next time
    return known[key]
