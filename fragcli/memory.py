"""Memory and size measurements: resident weight bytes, parameter counts, peak RSS / CUDA peak in a window."""

from __future__ import annotations

import threading
import time

import psutil


def weight_bytes(module) -> int:
    """Bytes of all parameters and buffers of a torch module (or a pipeline's torch components)."""
    total = 0
    for mod in _modules(module):
        total += sum(p.numel() * p.element_size() for p in mod.parameters())
        total += sum(b.numel() * b.element_size() for b in mod.buffers())
    return total


def param_count(module) -> int:
    return sum(p.numel() for mod in _modules(module) for p in mod.parameters())


def _modules(obj):
    import torch

    if isinstance(obj, torch.nn.Module):
        return [obj]
    comps = getattr(obj, "components", {}) or {}
    return [m for m in comps.values() if isinstance(m, torch.nn.Module)]


class PeakMemory:
    """Peak memory inside a ``with`` block: process RSS sampled every 5 ms, plus CUDA's max allocated bytes."""

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.cuda_peak = int(torch.cuda.max_memory_allocated())
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    def as_dict(self) -> dict:
        return {"peak_rss_bytes": self.peak_rss, "cuda_max_allocated_bytes": self.cuda_peak}
