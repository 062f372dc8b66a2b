"""Image-quality metrics comparing a fragment's images with the full model's.

Every metric returns a number or is *unavailable* with a reason (``Unavailable``); nothing here ever reports a
number computed with random or missing weights. SSIM (scikit-image) and perceptual-hash distance (imagehash)
are always available; CLIP score needs real CLIP weights (a local file, or the shipped shapes judge); LPIPS
needs torchvision's AlexNet backbone as a local file (the small linear layers ship inside the lpips package).
torch, open_clip and lpips are imported only when a metric that needs them is built.
"""

from fragcli.metrics.base import Unavailable, load_state_dict_file
from fragcli.metrics.clip import ClipScorer
from fragcli.metrics.compare import (
    Comparison,
    MetricSet,
    aggregate,
    clip_delta_rel,
    compare_images,
    load_metrics,
    side_by_side_grid,
)
from fragcli.metrics.perceptual import ALEXNET_FILE, LpipsMetric, default_alexnet_path
from fragcli.metrics.simple import phash_distance, ssim

__all__ = [
    "ALEXNET_FILE", "ClipScorer", "Comparison", "LpipsMetric", "MetricSet", "Unavailable", "aggregate",
    "clip_delta_rel", "compare_images", "default_alexnet_path", "load_metrics", "load_state_dict_file",
    "phash_distance", "side_by_side_grid", "ssim",
]
