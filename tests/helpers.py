"""Shared helpers for the tests (tiny models, the CLI runner)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from fragcli.cli.app import app


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, exactly one `error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    text = result.stderr if hasattr(result, "stderr") else result.output
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def unet_inputs(unet, batch: int = 2, tokens: int = 77, seed: int = 0):
    torch.manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    ctx = torch.randn(batch, tokens, unet.config.cross_attention_dim)
    return x, torch.tensor([500]), ctx


def tiny_chain(root, prompt: str, retention: float = 0.6):
    """profile (seeds 0,1, 3 steps) -> extract on tiny through the CLI; returns (root, profile, fragment)."""
    prof, frag = root / "profile", root / "fragment"
    r = run_cli("profile", prompt, "-m", "tiny", "--seeds", "0,1", "--steps", "3", "--out", prof)
    assert r.exit_code == 0, r.output
    r = run_cli("extract", prof, "--head-retention", str(retention), "--out", frag)
    assert r.exit_code == 0, r.output
    return root, prof, frag


def private_copy(folder, tmp_path):
    """A copy of a shared fixture folder that one test may damage."""
    import shutil

    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst
