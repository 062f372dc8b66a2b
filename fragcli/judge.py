"""The shipped judge: a small CLIP trained on the shapes world, loaded through open_clip's own API.

The judge is independent of the shapes pipeline (different architecture, tokenizer and seed). Its folder
(``fragcli/models/shapes_judge``) holds ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``; it is loaded with ``open_clip.create_model_and_transforms("local-dir:<folder>")``
and ``open_clip.get_tokenizer("local-dir:<folder>")``. Weights only ever come from safetensors (never unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragcli.errors import FragError

JUDGE_NAME = "shapes_judge"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def judge_dir(name: str = JUDGE_NAME) -> Path:
    """The folder of a shipped judge (inside the installed package)."""
    return Path(__file__).resolve().parent / "models" / name


@dataclass
class Judge:
    """An open_clip model with its preprocessing and tokenizer, plus convenience scoring helpers."""

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    weights_path: Path
    device: str = "cpu"

    def _images_tensor(self, images):
        import torch

        return torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)

    def encode_images(self, images, batch_size: int = 256):
        """L2-normalised image embeddings, shape (N, D), float32 on CPU."""
        import torch

        images = list(images)
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                feats = self.model.encode_image(self._images_tensor(images[i : i + batch_size]))
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)

    def encode_texts(self, texts, batch_size: int = 512):
        """L2-normalised text embeddings, shape (N, D), float32 on CPU."""
        import torch

        texts = [str(t) for t in texts]
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
                feats = self.model.encode_text(tokens)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    def score(self, images, texts):
        """Cosine similarity of image i with text i (1-D tensor, length N)."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"score needs as many texts as images ({len(texts)} != {len(images)})")
        return (self.encode_images(images) * self.encode_texts(texts)).sum(-1)

    def similarity(self, images, texts):
        """Cosine similarity matrix (N images x M texts)."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def classify(self, images, class_texts):
        """Index (into ``class_texts``) of the best-matching text for every image (1-D long tensor)."""
        return self.similarity(images, class_texts).argmax(dim=-1)


def load_judge(device: str = "cpu", name: str = JUDGE_NAME, folder: Path | None = None) -> Judge:
    """Load the shipped judge offline through ``open_clip.create_model_and_transforms("local-dir:...")``."""
    folder = Path(folder) if folder else judge_dir(name)
    weights = folder / WEIGHTS_FILE
    if not (folder / CONFIG_FILE).is_file() or not weights.is_file():
        raise FragError(
            f"judge {name!r} not found in {folder}",
            "reinstall fragcli or retrain it with: python tools/train_shapes.py --stage judge",
        )
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):  # random init before the weights load: keep the caller's RNG state
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return Judge(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name, weights_path=weights, device=device)
