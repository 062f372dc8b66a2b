"""Paraphrased prompts for the reuse test (H3): from a file, or, for the shapes model, the prompt's own family."""

from __future__ import annotations

from pathlib import Path

from fragcli.errors import FragError


def read_paraphrases(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FragError(f"paraphrase file {path} not found", "pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FragError(f"paraphrase file {path} is not UTF-8 text", "save it as UTF-8, one prompt per line") from None
    prompts = [" ".join(ln.split()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise FragError(f"paraphrase file {path} has no prompts", "write one prompt per line")
    return prompts


def shapes_family(prompt: str) -> list[str] | None:
    """The other wordings of the shapes scene whose canonical caption is ``prompt`` (None when no scene matches)."""
    from fragcli.shapes import world

    want = " ".join(prompt.lower().split())
    for shape in world.SHAPES:
        for color in world.COLOR_NAMES:
            if color not in want or shape not in want:
                continue
            for size in world.SIZES:
                for pos in world.POSITION_NAMES:
                    for bg in world.COLOR_NAMES:
                        if bg == color:
                            continue
                        scene = world.Scene((world.Obj(shape, color, size, pos),), bg)
                        if world.canonical_caption(scene) == want:
                            return [c for c in world.captions(scene) if c != want]
    return None


def default_paraphrases(model_name: str, prompt: str) -> tuple[list[str] | None, str | None]:
    """(paraphrases, reason-if-none) for a model that ships its own paraphrase families."""
    if model_name not in ("shapes", "shapes-flux"):  # both trained on the shapes world
        return None, "no paraphrases given: pass --paraphrases FILE (one prompt per line)"
    family = shapes_family(prompt)
    if family:
        return family, None
    return None, ("the prompt is not a canonical shapes caption (e.g. 'a large red circle in the center on a blue "
                  "background'): pass --paraphrases FILE")
