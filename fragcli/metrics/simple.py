"""Metrics that are always available: SSIM (scikit-image) and perceptual-hash distance (imagehash)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fragcli.errors import FragError
from fragcli.metrics.base import check_pair, rgb


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Structural similarity of two same-size RGB images (1.0 = identical), scikit-image, 8-bit data range."""
    from skimage.metrics import structural_similarity

    check_pair(a, b)
    x = np.asarray(rgb(a), dtype=np.uint8)
    y = np.asarray(rgb(b), dtype=np.uint8)
    side = min(x.shape[0], x.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise FragError(f"images of {x.shape[1]}x{x.shape[0]} px are too small for SSIM", "use images of >= 3x3 px")
    return float(structural_similarity(x, y, channel_axis=-1, data_range=255, win_size=win))


def phash_distance(a: Image.Image, b: Image.Image) -> int:
    """Hamming distance between the 64-bit perceptual hashes (imagehash.phash); 0 = same hash."""
    import imagehash

    return int(imagehash.phash(rgb(a)) - imagehash.phash(rgb(b)))
