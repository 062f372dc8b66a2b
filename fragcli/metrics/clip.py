"""CLIP score: text-image cosine similarity with real CLIP weights (open_clip file, or the shipped judge)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fragcli.errors import FragError
from fragcli.metrics.base import Unavailable, broadcast_texts, check_weights_file, load_state_dict_file, rgb


@dataclass
class ClipScorer:
    """Text-image cosine similarity with a real CLIP model (open_clip, or anything with the same interface)."""

    model: Any
    preprocess: Callable[[Image.Image], Any]
    tokenizer: Callable[[list[str]], Any]
    name: str = "clip"
    device: str = "cpu"
    batch_size: int = 16

    @classmethod
    def from_open_clip(cls, model_name: str, weights_path: Path | str | None, device: str = "cpu") -> ClipScorer:
        """Build open_clip ``model_name`` (a built-in name or a model-config .json) and load local weights.

        No weights -> ``Unavailable``; a bad path, name or file -> ``FragError``. Never downloads anything.
        """
        if weights_path is None:
            raise Unavailable("clip", "no CLIP weights: pass --clip-weights PATH")
        path = check_weights_file(weights_path, "--clip-weights")
        import open_clip

        name = model_name
        if model_name.endswith(".json"):
            cfg = Path(model_name).expanduser()
            if not cfg.is_file():
                raise FragError(f"--clip-model config not found: {cfg}", "pass a built-in open_clip name or a .json")
            open_clip.add_model_config(cfg)
            name = cfg.stem
        if open_clip.get_model_config(name) is None:
            raise FragError(f"unknown open_clip model {model_name!r}",
                            "pass --clip-model a name from open_clip.list_models() or a model-config .json")
        disabled = logging.root.manager.disable  # restored below: a library call leaves logging as it found it
        try:
            logging.disable(max(disabled, logging.WARNING))  # open_clip warns "initialized randomly": weights load next
            import torch

            with torch.random.fork_rng(devices=[]):  # random init, overwritten below: keep the caller's RNG state
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:
            raise FragError(f"cannot build open_clip model {name!r} offline ({type(exc).__name__}: {str(exc)[:120]})",
                            "choose a --clip-model whose text tower needs no download") from None
        finally:
            logging.disable(disabled)
        state = load_state_dict_file(path)  # weights_only loading, before open_clip's format conversions
        try:
            _load_open_clip_state(model, state)
        except Exception as exc:
            raise FragError(f"CLIP weights {path.name} do not fit model {name!r} ({str(exc).splitlines()[0][:160]})",
                            "pass the --clip-model the weights were trained for") from None
        model.eval().to(device)
        return cls(model=model, preprocess=preprocess, tokenizer=tokenizer, name=f"open_clip:{name}", device=device)

    @classmethod
    def from_judge(cls, judge: Any, device: str | None = None) -> ClipScorer:
        """Wrap the shipped shapes judge (or any object with ``model``, ``preprocess``, ``tokenizer``)."""
        missing = [a for a in ("model", "preprocess", "tokenizer") if not hasattr(judge, a)]
        if missing:
            raise FragError(f"the CLIP judge lacks {', '.join(missing)}", "pass a judge from fragcli.judge.load_judge")
        dev = device or str(getattr(judge, "device", None) or _module_device(judge.model))
        return cls(model=judge.model, preprocess=judge.preprocess, tokenizer=judge.tokenizer,
                   name=str(getattr(judge, "name", "judge")), device=dev)

    def encode_images(self, images: Sequence[Image.Image]):
        """L2-normalised image embeddings, shape (n, d)."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(rgb(im)) for im in images[i:i + self.batch_size]])
                out.append(self.model.encode_image(batch.to(self.device)).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def encode_texts(self, texts: Sequence[str]):
        """L2-normalised text embeddings, shape (n, d)."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.batch_size]))
                out.append(self.model.encode_text(tokens.to(self.device)).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of image i with text i (one text is used for every image)."""
        texts = broadcast_texts(texts, len(images))
        if not images:
            return []
        img = self.encode_images(images)
        unique = sorted(set(texts))
        txt = self.encode_texts(unique)
        index = {t: k for k, t in enumerate(unique)}
        return [float(img[i] @ txt[index[t]]) for i, t in enumerate(texts)]


def _module_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except Exception:
        return "cpu"


def _load_open_clip_state(model: Any, state: dict[str, Any]) -> None:
    """open_clip's checkpoint conversions (module. prefix, pos-embed resize, ...) on an already-loaded dict."""
    from open_clip import factory

    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = factory.convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = factory.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        ref = getattr(model, key, None)
        if key in state and ref is not None and ref.ndim != state[key].ndim:
            state[key] = state[key].reshape(ref.shape)
    state.pop("text.transformer.embeddings.position_ids", None)
    factory.resize_pos_embed(state, model)
    factory.resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)
