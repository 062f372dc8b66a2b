"""Shared pieces of the metrics: the ``Unavailable`` signal, image checks and safe weight loading."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fragcli.errors import FragError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class Unavailable(Exception):
    """A metric that cannot be computed here, with the reason (e.g. ``no CLIP weights: pass --clip-weights PATH``)."""

    def __init__(self, metric: str, reason: str):
        self.metric = metric
        self.reason = reason
        super().__init__(f"{metric} unavailable: {reason}")


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def check_pair(a: Image.Image, b: Image.Image) -> None:
    if a.size != b.size:
        raise FragError(f"image sizes differ ({a.size[0]}x{a.size[1]} vs {b.size[0]}x{b.size[1]})",
                        "generate the full and fragment images at the same --width/--height")


def check_weights_file(path: Path | str, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FragError(f"{flag} file not found: {path}", f"pass {flag} the path of a local weights file")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise FragError(f"{flag} {path.name} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})",
                        f"pass {flag} a .safetensors file (preferred) or a .pt/.pth/.bin state dict")
    return path


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Load a state dict from .safetensors, or from .pt/.pth/.bin with ``torch.load(weights_only=True)`` only."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a checkpoint at all
        raise FragError(f"cannot load weights {path.name} ({type(exc).__name__}: {str(exc)[:120]})",
                        "pass a .safetensors file or a plain state-dict .pt (no pickled code)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise FragError(f"weights file {path.name} holds no state dict", "pass the model's state-dict file")
    return state


def broadcast_texts(texts: Sequence[str], n: int) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) == 1:
        return texts * n
    if len(texts) != n:
        raise FragError(f"{len(texts)} prompts for {n} images", "pass one prompt, or one per image")
    return texts
