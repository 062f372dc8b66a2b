"""Resumable training checkpoints for the shapes recipes: one safetensors file per stage, no pickle.

A checkpoint holds every tensor a training loop needs to continue exactly where it stopped (model, EMA and optimizer
state, torch generator states) plus a JSON blob in the file's metadata (step, loss history, Python ``random`` state,
CPU seconds so far, and the *fingerprint* of the settings that made it). It is written to a temporary file and
renamed, so a kill at any moment leaves either the previous checkpoint or the new one, never half a file.

    ck = Checkpoint(work / "unet_ckpt.safetensors", fingerprint)
    state = ck.load()                       # None: start fresh; raises SystemExit on a settings mismatch
    ...
    ck.save(step, {"unet": unet, "opt": opt}, generators={"g": g}, pyrngs={"r": r}, extra={"losses": losses})
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SEP = "::"


def fingerprint(settings: dict, keys: list[str]) -> str:
    """A short hash of the settings that decide a stage's result (``keys`` of ``settings``)."""
    chosen = {k: settings[k] for k in sorted(keys)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten_optimizer(prefix: str, sd: dict, tensors: dict) -> dict:
    """Tensors of an optimizer state dict go to ``tensors``; the rest (param groups, scalar state) is returned."""
    rest = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        rest["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{SEP}state{SEP}{idx}{SEP}{k}"] = v.detach().clone().contiguous()
                rest["state"][str(idx)][k] = None
            else:
                rest["state"][str(idx)][k] = v
    return rest


def _unflatten_optimizer(prefix: str, rest: dict, tensors: dict) -> dict:
    state = {}
    for idx, st in rest["state"].items():
        state[int(idx)] = {k: (tensors[f"{prefix}{SEP}state{SEP}{idx}{SEP}{k}"] if v is None else v)
                           for k, v in st.items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def _pyrng_to_json(r: random.Random) -> list:
    version, internal, gauss = r.getstate()
    return [version, list(internal), gauss]


def _pyrng_from_json(blob: list) -> tuple:
    return (blob[0], tuple(blob[1]), blob[2])


class Checkpoint:
    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def save(self, step: int, modules: dict, *, generators: dict | None = None, pyrngs: dict | None = None,
             extra: dict | None = None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        optim: dict[str, dict] = {}
        for name, obj in modules.items():
            if isinstance(obj, torch.optim.Optimizer):
                optim[name] = _flatten_optimizer(name, obj.state_dict(), tensors)
            else:
                for k, v in obj.state_dict().items():
                    tensors[f"{name}{SEP}{k}"] = v.detach().clone().contiguous()
        for name, g in (generators or {}).items():
            tensors[f"rng{SEP}{name}"] = g.get_state().clone()
        tensors[f"rng{SEP}torch_global"] = torch.get_rng_state().clone()
        meta = {"step": step, "fingerprint": self.fingerprint, "optimizers": optim,
                "pyrngs": {k: _pyrng_to_json(r) for k, r in (pyrngs or {}).items()},
                "global_random": _pyrng_to_json(random), "extra": extra or {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"frag_checkpoint": json.dumps(meta)})
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
        """The saved meta (``step``, ``extra``, ...) with ``tensors``; None when there is no checkpoint."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as fh:
            meta = json.loads(fh.metadata()["frag_checkpoint"])
        if meta["fingerprint"] != self.fingerprint:
            raise SystemExit(f"{self.path} was made with other settings; rerun with --fresh to start over")
        meta["tensors"] = load_file(str(self.path))
        return meta

    @staticmethod
    def restore(state: dict, modules: dict, *, generators: dict | None = None, pyrngs: dict | None = None,
                global_rngs: bool = True) -> None:
        tensors = state["tensors"]
        for name, obj in modules.items():
            if isinstance(obj, torch.optim.Optimizer):
                obj.load_state_dict(_unflatten_optimizer(name, state["optimizers"][name], tensors))
            else:
                pre = f"{name}{SEP}"
                obj.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
        for name, g in (generators or {}).items():
            g.set_state(tensors[f"rng{SEP}{name}"])
        for name, r in (pyrngs or {}).items():
            r.setstate(_pyrng_from_json(state["pyrngs"][name]))
        if global_rngs:
            torch.set_rng_state(tensors[f"rng{SEP}torch_global"])
            random.setstate(_pyrng_from_json(state["global_random"]))


def save_tensors(path: Path, tensors: dict, meta: dict | None = None) -> None:
    """Tensors (and a JSON blob) to safetensors, atomically: a cache file a stage hands to the next."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    return load_file(str(path)), meta
