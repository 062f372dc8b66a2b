"""Memory and size measurements: resident weight bytes (in total and component by component), parameter counts,
peak RSS / CUDA peak in a window, the process's RSS high-water mark (Linux: read and reset through /proc), and
the on-disk size of a model folder's weights."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import psutil

TEXT_ENCODER_PREFIX = "text_encoder"  # as fragcli.techniques.prompt_embeds names them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")


def weight_bytes(module) -> int:
    """Bytes of all parameters and buffers of a torch module (or a pipeline's torch components)."""
    total = 0
    for mod in _modules(module):
        total += sum(p.numel() * p.element_size() for p in mod.parameters())
        total += sum(b.numel() * b.element_size() for b in mod.buffers())
    return total


def param_count(module) -> int:
    """Weights, counted as parameters: every Parameter, plus the buffers a module names in ``weight_buffers``
    (a quantized layer stores its weight as an int8/float8 buffer, which is still a weight)."""
    total = 0
    for mod in _modules(module):
        total += sum(p.numel() for p in mod.parameters())
        for sub in mod.modules():
            for name in getattr(sub, "weight_buffers", ()):
                buf = getattr(sub, name, None)
                total += 0 if buf is None else buf.numel()
    return total


def components(pipe) -> dict[str, dict]:
    """Every torch component of a pipeline: name -> ``{class_name, device, dtypes, bytes, params, evicted}``.

    ``bytes`` counts parameters and buffers, as ``weight_bytes`` does, so the table sums to it. A text encoder the
    pipeline holds as None (evicted by the fragment) is listed with 0 bytes and ``evicted: True``; other None
    entries (no safety checker, no image encoder) and non-torch components (tokenizer, scheduler) are left out.
    """
    import torch

    out: dict[str, dict] = {}
    if isinstance(pipe, torch.nn.Module):
        items = [(type(pipe).__name__, pipe)]
    else:
        items = list((getattr(pipe, "components", {}) or {}).items())
    for name, mod in items:
        if mod is None and name.startswith(TEXT_ENCODER_PREFIX):
            out[name] = {"class_name": None, "device": None, "dtypes": [], "bytes": 0, "params": 0, "evicted": True}
        if not isinstance(mod, torch.nn.Module):
            continue
        tensors = [*mod.parameters(), *mod.buffers()]
        devices = sorted({str(t.device) for t in tensors})
        out[name] = {"class_name": type(mod).__name__, "device": "+".join(devices) if devices else None,
                     "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
                     "bytes": weight_bytes(mod), "params": param_count(mod), "evicted": False}
    return out


def disk_weight_bytes(path: Path | None) -> int | None:
    """Bytes of the weight files (safetensors, bin, ckpt, ...) under a model folder, or of a single checkpoint
    file; None for a model without one (built in memory)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


# ------------------------------------------------------------------------ the process's RSS high-water mark

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def proc_status() -> dict[str, int | None]:
    """This process's current RSS (``rss``) and RSS high-water mark (``hwm``) in bytes, from /proc/self/status
    (Linux); elsewhere ``rss`` from psutil and ``hwm`` None (or psutil's peak where it has one)."""
    try:
        text = STATUS.read_text()
    except OSError:
        info = psutil.Process().memory_info()
        return {"rss": int(info.rss), "hwm": getattr(info, "peak_wset", None)}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # kB
    return {"rss": values.get("VmRSS"), "hwm": values.get("VmHWM")}


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux: "5" into /proc/self/clear_refs); False when this
    system does not allow it (the mark then runs from the process's start)."""
    try:
        with open(CLEAR_REFS, "w") as fh:
            fh.write("5")
    except OSError:
        return False
    status = proc_status()
    return status["hwm"] is not None and status["rss"] is not None and status["hwm"] <= status["rss"] + 2**20


def release_memory() -> bool:
    """Free what can be freed before a measurement: ``gc.collect()``, then glibc's ``malloc_trim(0)`` (returns the
    freed heap pages to the system, so RSS drops). True when malloc_trim ran."""
    gc.collect()
    if os.name != "posix":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


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
