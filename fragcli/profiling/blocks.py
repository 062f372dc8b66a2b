"""Per-block statistics at every step, through forward hooks: relative update size and step-to-step cosine.

They feed skip detection and step caching: a block whose output barely changes between steps can be cached.
"""

from __future__ import annotations

import torch

from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.profiling.recorder import Recorder

PATCH = "frag.blocks"
_TOP = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


def _block_type(name: str, module) -> str | None:
    parts = name.split(".")
    cls = type(module).__name__
    if len(parts) == 2 and parts[0] in _TOP or name == "mid_block":
        return _TOP[parts[0]]
    if "Resnet" in cls:
        return "resnet"
    if cls in ("Transformer2DModel", "SD3Transformer2DModel"):
        return "transformer"
    if len(parts) == 2 and parts[0] in ("transformer_blocks", "single_transformer_blocks"):
        return "transformer_block"
    return None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "sample"):
        return x.sample
    if isinstance(x, (tuple, list)):  # the first tensor: SD3's last joint block returns (None, hidden_states)
        return next((v for v in x if isinstance(v, torch.Tensor)), None)
    return None


def _input_tensor(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
    return x if isinstance(x, torch.Tensor) else None


def install_block_stats(denoiser, recorder: Recorder) -> Patch:
    """Record (rel_update, cos_prev) for every block at every step; idempotent and removable."""

    def install(patch: Patch) -> None:
        previous: dict[str, torch.Tensor] = {}
        patch.state = previous

        def make(name: str, kind: str):
            def hook(module, args, kwargs, output):
                if not recorder.enabled:
                    return
                out = _first_tensor(output)
                if out is None:
                    return
                with torch.no_grad():
                    o = out.detach().float()
                    x = _input_tensor(args, kwargs)
                    if x is not None and x.shape == o.shape:
                        x = x.detach().float()
                        rel = ((o - x).norm() / x.norm().clamp_min(1e-12)).item()
                    else:
                        rel = o.pow(2).mean().sqrt().item()
                    key = name
                    prev = previous.get(key)
                    cos = float("nan")
                    if prev is not None and prev.shape == o.shape and recorder.step > 0:
                        cos = torch.nn.functional.cosine_similarity(o.flatten(), prev.flatten(), dim=0).item()
                    previous[key] = o.clone()
                recorder.add_block(name, kind, rel, cos)

            return hook

        for name, module in denoiser.named_modules():
            kind = _block_type(name, module)
            if kind:
                handle = module.register_forward_hook(make(name, kind), with_kwargs=True)
                patch.undo.append(handle.remove)
        patch.undo.append(previous.clear)

    return apply_patch(denoiser, PATCH, install, recorder)


def install_context_hook(denoiser, recorder: Recorder) -> Patch:
    """A pre-hook on the denoiser: records the current timestep and the first text context it sees.

    The step index itself is advanced by the pipeline's step-end callback (robust to several calls per step).
    """

    def install(patch: Patch) -> None:
        def pre(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            if isinstance(t, torch.Tensor):
                t = t.flatten()[0].item() if t.numel() else float("nan")
            recorder.timestep = float(t) if t is not None else float("nan")
            ctx = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            if recorder.first_context is None and isinstance(ctx, torch.Tensor):
                recorder.first_context = ctx.detach().float().cpu()

        handle = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
        patch.undo.append(handle.remove)

    return apply_patch(denoiser, "frag.steps", install, recorder)


def remove_block_stats(denoiser) -> None:
    remove_patch(denoiser, PATCH)
    remove_patch(denoiser, "frag.steps")
