"""frag: prompt-specific fragments of large text-to-image diffusion models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_fragment"]


def __getattr__(name: str):  # lazy: importing fragcli must not import torch
    if name == "load_fragment":
        from fragcli.fragment import load_fragment

        return load_fragment
    raise AttributeError(name)
