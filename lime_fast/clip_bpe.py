"""The real CLIP tokenizer, built offline from the BPE merges inside the open_clip_torch wheel.

InstructPix2Pix uses OpenAI's CLIP tokenizer (49,408 tokens). Its merges ship inside the
``open_clip_torch`` wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``; installing that wheel with
``pip install --no-deps open_clip_torch`` brings the file without torchvision or timm. We locate the
file through ``importlib`` without importing ``open_clip`` (importing it would pull its dependencies)
and turn it into the ``vocab.json`` / ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (OpenAI's choice; vocabulary = 49,408).
N_MERGES = 49152 - 256 - 2


def find_bpe_file() -> Path:
    """Path of the CLIP BPE merges file shipped in the open_clip_torch wheel (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The CLIP BPE file comes from the open_clip_torch wheel, which is not installed. "
            "Install it without its dependencies: pip install --no-deps open_clip_torch"
        )
    path = Path(spec.origin).parent / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open_clip_torch wheel.")
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in byte order.

    Bytes that are printable Latin-1 characters stand for themselves; the rest are mapped, in order,
    to code points 256, 257, ...
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _printable_order() -> list[str]:
    # CLIP's vocabulary lists the printable bytes first, then the remapped ones.
    symbols = _byte_symbols()
    printable = [s for s in symbols if ord(s) < 256]
    return printable + [s for s in symbols if ord(s) >= 256]


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of the CLIP tokenizer to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(find_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    base = _printable_order()
    vocab_list = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def cache_root() -> Path:
    """lime_fast's cache folder: ``$LIME_FAST_CACHE`` or ``~/.cache/lime_fast``."""
    return Path(os.environ.get("LIME_FAST_CACHE", Path.home() / ".cache" / "lime_fast"))


def clip_tokenizer(cache_dir: str | os.PathLike | None = None, pad_token: str | None = None):
    """The CLIP tokenizer of Stable Diffusion 1.x / InstructPix2Pix, built with no download.

    The files are written once into ``cache_dir`` (default ``$LIME_FAST_CACHE/clip-tokenizer``, where
    ``LIME_FAST_CACHE`` defaults to ``~/.cache/lime_fast``). ``pad_token="!"`` gives SDXL's second
    tokenizer (the same BPE, padded with "!" instead of the end-of-text token).
    """
    from transformers import CLIPTokenizer

    cache = Path(cache_dir) if cache_dir else cache_root() / "clip-tokenizer"
    if not (cache / "merges.txt").is_file():
        write_clip_tokenizer_files(cache)
    return CLIPTokenizer.from_pretrained(str(cache), **({"pad_token": pad_token} if pad_token else {}))
