"""Named, reversible, idempotent runtime patches on torch modules.

A patch is installed under a name on a root module; installing the same name again is a no-op that returns the
existing patch, and ``remove`` restores exactly what was there (processors, hooks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ATTR = "_frag_patches"


@dataclass
class Patch:
    name: str
    state: Any = None
    undo: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


def installed(root) -> dict[str, Patch]:
    return root.__dict__.setdefault(_ATTR, {})


def apply_patch(root, name: str, install: Callable[[Patch], None], state: Any = None) -> Patch:
    """Install ``install(patch)`` under ``name`` unless it is already installed; return the patch."""
    patches = installed(root)
    if name in patches:
        return patches[name]
    patch = Patch(name, state)
    try:
        install(patch)
    except BaseException:
        patch.remove()
        raise
    patches[name] = patch
    return patch


def remove_patch(root, name: str) -> bool:
    """Remove the patch ``name``; returns False when it was not installed."""
    patch = installed(root).pop(name, None)
    if patch is None:
        return False
    patch.remove()
    return True


def swap_processors(root, patch: Patch, new: dict) -> None:
    """Set attention processors ``{module_name: processor}`` and register their undo on ``patch``."""
    from diffusers.models.attention_processor import Attention

    modules = {n: m for n, m in root.named_modules() if isinstance(m, Attention)}
    for name, proc in new.items():
        module = modules[name]
        old = module.processor
        module.set_processor(proc)
        patch.undo.append(lambda m=module, o=old: m.set_processor(o))


def second_half(value, n: int):
    """The second half of every tensor of batch size ``n`` in ``value`` (dicts, lists and tuples walked; anything
    else unchanged): the conditional half of a classifier-free-guidance batch ``[uncond, cond]``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[n // 2 :] if value.dim() and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: second_half(v, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(second_half(v, n) for v in value)
    return value
