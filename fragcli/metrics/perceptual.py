"""LPIPS (AlexNet, v0.1) built offline: the backbone from a local torchvision file, the linear layers from the
lpips package. Without the backbone file the metric is unavailable; it never downloads."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fragcli.errors import FragError
from fragcli.metrics.base import Unavailable, check_pair, check_weights_file, load_state_dict_file, rgb

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1 weights, as cached by torch.hub
LPIPS_MIN_SIDE = 64  # AlexNet's five feature stages need at least ~32 px; smaller images are upscaled to 64


def default_alexnet_path() -> Path:
    """Where torch.hub caches AlexNet: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/...``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


class LpipsMetric:
    """LPIPS (AlexNet, v0.1) built without network: backbone from a local file, linear layers from the package."""

    def __init__(self, net: Any, device: str = "cpu", backbone: Path | None = None):
        self.net = net
        self.device = device
        self.backbone = backbone

    @classmethod
    def load(cls, weights_path: Path | str | None = None, device: str = "cpu") -> LpipsMetric:
        """``weights_path``: torchvision AlexNet weights; default: the torch hub cache. Absent -> ``Unavailable``."""
        if weights_path is None:
            path = default_alexnet_path()
            if not path.is_file():
                raise Unavailable("lpips", f"no AlexNet weights at {path}: pass --lpips-weights PATH ({ALEXNET_FILE})")
        else:
            path = check_weights_file(weights_path, "--lpips-weights")
        import lpips
        import torch

        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # random init, then our weights
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
            net = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        backbone = load_state_dict_file(path)
        try:
            wanted = net.net.state_dict()
            mapped = {}
            for key in wanted:  # "slice2.3.weight" <- torchvision "features.3.weight"
                _, index, param = key.split(".")
                mapped[key] = backbone[f"features.{index}.{param}"]
            net.net.load_state_dict(mapped, strict=True)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise FragError(f"--lpips-weights {path.name} is not torchvision AlexNet ({str(exc).splitlines()[0][:100]})",
                            f"pass torchvision's {ALEXNET_FILE}") from None
        lins = load_state_dict_file(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth")
        result = net.load_state_dict(lins, strict=False)
        not_lins = [k for k in result.missing_keys if not k.startswith(("lins.", "net.", "scaling_layer."))]
        if result.unexpected_keys or not_lins:
            raise FragError("the lpips package's linear layers do not fit its model", "reinstall lpips==0.1.4")
        net.eval().to(device)
        return cls(net, device, path)

    def distances(self, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> list[float]:
        """LPIPS distance of each pair (0 = identical; ~0.1 similar; >0.5 very different)."""
        import torch

        out = []
        with torch.inference_mode():
            for x, y in zip(a, b, strict=True):
                check_pair(x, y)
                tx, ty = self._tensor(x), self._tensor(y)
                out.append(float(self.net(tx, ty).mean()))
        return out

    def distance(self, a: Image.Image, b: Image.Image) -> float:
        return self.distances([a], [b])[0]

    def _tensor(self, image: Image.Image):
        import torch

        image = rgb(image)
        if min(image.size) < LPIPS_MIN_SIDE:
            scale = LPIPS_MIN_SIDE / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(self.device)
