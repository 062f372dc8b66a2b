"""A real CLIP BPE tokenizer built offline from the vocabulary that open_clip ships.

The files match the CLIP tokenizer of Stable Diffusion (49408 entries): the 256 byte-unicode symbols, the same
with ``</w>``, one token per BPE merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # 48894 merges: lines 1..48894 of the vocabulary file


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the CLIP BPE tokenizer) into ``folder``; return the folder."""
    from open_clip.tokenizer import default_bpe

    from fragcli.paths import atomic_write_text

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def build_clip_tokenizer(folder: Path | None = None, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with SD's vocabulary; files cached in ``folder`` (default under FRAG_HOME)."""
    from transformers import CLIPTokenizer

    from fragcli.paths import cache_dir

    folder = Path(folder) if folder else cache_dir() / "tokenizer" / "clip-bpe"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length, pad_token="<|endoftext|>")
