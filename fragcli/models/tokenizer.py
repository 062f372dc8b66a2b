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


T5_VOCAB = 1000


def _t5_corpus() -> list[str]:
    """A seeded caption corpus for the offline T5-style tokenizer: shapes-world captions plus common prompt words."""
    import random

    from fragcli.shapes import world

    r = random.Random(0)
    lines = [world.random_training_caption(s, r) for s in world.sample_scenes(3000, 0)]
    words = ("a photo of dog cat on jet ski beach city night painting portrait of an astronaut riding horse in space "
             "mountain lake forest sunset oil watercolor detailed high quality cinematic lighting red green blue "
             "with the and at by from under over near two three small large old young man woman car house tree")
    lines += [" ".join(r.sample(words.split(), 8)) for _ in range(2000)]
    return lines


def build_t5_tokenizer(folder: Path | None = None, model_max_length: int = 128):
    """A T5-style (Unigram, ``</s>``-terminated) fast tokenizer trained offline with the ``tokenizers`` library on
    a seeded corpus (deterministic); files cached in ``folder`` (default under FRAG_HOME). For the tiny DiT
    built-ins only: real models ship their own tokenizer."""
    from transformers import T5TokenizerFast

    from fragcli.paths import cache_dir, staged_dir

    folder = Path(folder) if folder else cache_dir() / "tokenizer" / f"t5-unigram-{T5_VOCAB}"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=T5_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
                                          unk_token="<unk>", show_progress=False)
        tok.train_from_iterator(_t5_corpus(), trainer)
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                               extra_ids=0, model_max_length=model_max_length)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with staged_dir(folder) as tmp:
            fast.save_pretrained(str(tmp))
    return T5TokenizerFast.from_pretrained(str(folder), model_max_length=model_max_length)
