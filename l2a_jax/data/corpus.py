"""Where documents come from: the embedded corpus, or the user's text files.

The embedded corpus is real English prose that every Python installation carries: the
language reference topics behind ``help()`` (``pydoc_data.topics``, 79 topics, about 490K
characters). Topics are sorted by name and every tenth (index 9, 19, ...) is held out for
evaluation, so training never sees the held-out text.

Text files: ``.txt`` (each file one document), ``.jsonl`` (one JSON object per line, its
``text`` field a document) and ``.parquet`` (a ``text`` column; needs ``pyarrow``). A
directory stands for the files in it with those endings, in sorted order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from l2a_jax.config import ConfigError

SPLITS = ("train", "heldout")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def embedded_corpus(split: str = "train") -> list[str]:
    """The documents of one split of the embedded corpus, in a fixed order."""
    if split not in SPLITS:
        raise ConfigError(f"corpus split {split!r} is unknown; use one of {SPLITS}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = {name for i, name in enumerate(names) if i % 10 == 9}
    return [topics[n] for n in names if (n in held_out) == (split == "heldout")]


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            if not found:
                raise ConfigError(f"directory {path} holds no {TEXT_SUFFIXES} files")
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise ConfigError(f"{path}: unsupported file type; use one of {TEXT_SUFFIXES}")
            files.append(path)
        else:
            raise ConfigError(f"data file {path} does not exist")
    return files


def read_text_files(paths: list[str]) -> list[str]:
    """The documents in ``paths`` (files or directories), in order; empty documents dropped."""
    docs: list[str] = []
    for file in _files(paths):
        if file.suffix == ".txt":
            docs.append(file.read_text(encoding="utf-8"))
        elif file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    docs.append(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(
                        f"{file}:{number} is not a JSON object with a 'text' field ({e!r})"
                    ) from e
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ConfigError(f"reading {file} needs pyarrow: pip install pyarrow") from e
            table = pq.read_table(file, columns=["text"])
            docs += [t for t in table.column("text").to_pylist() if t]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(f"no text found in {paths}")
    return docs


def token_windows(tokenizer, documents: list[str], length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of ``documents`` (joined by the eos id), taken at
    evenly spaced offsets of the whole stream: held-out text for perplexity and routing."""
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer.encode(doc) + [tokenizer.eos_id]
    if len(stream) < length:
        raise ConfigError(
            f"the text has {len(stream)} tokens, fewer than the length {length}; give more "
            "text (--text) or a shorter length"
        )
    starts = np.linspace(0, len(stream) - length, count).astype(int)
    return [stream[s : s + length] for s in starts]
