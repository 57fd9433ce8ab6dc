"""Where a model to run comes from: an HF-style checkpoint directory, or a training workdir
(whose run exported its model to ``model/`` and recorded its tokenizer in ``config.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from l2a_jax.config import ConfigError
from l2a_jax.data.tokenizers import QWEN_EOS, Tokenizer, make_tokenizer
from l2a_jax.hf import from_hf
from l2a_jax.model import QwenModel

BYTE_VOCAB = 257

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def default_dtype() -> str:
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def workdir_config(path: str | Path) -> dict | None:
    """The training config saved in a workdir, or None when ``path`` is not a workdir."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return None
    return saved if "train" in saved and "data" in saved else None


def _checkpoint_tokenizer(directory: Path, vocab_size: int) -> str:
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return str(directory)
    if vocab_size > QWEN_EOS:
        return "qwen"  # the Qwen2.5/Qwen3 vocabulary every Qwen checkpoint shares
    if vocab_size == BYTE_VOCAB:
        return "bytes"  # the byte vocabulary of models trained from scratch here
    raise ConfigError(
        f"{directory} holds no tokenizer and its vocabulary ({vocab_size}) is neither Qwen's "
        "nor the byte tokenizer's; "
        "pass the tokenizer (bytes, qwen or a tokenizer directory)"
    )


def load_model(
    source: str | Path,
    *,
    dtype: str | None = None,
    attention_impl: str = "auto",
    tokenizer: str | None = None,
) -> tuple[QwenModel, Tokenizer]:
    """The model and tokenizer of ``source``: an HF-style checkpoint directory or a training
    workdir. ``tokenizer`` (``bytes``, ``qwen`` or a directory) overrides the one found there;
    ``dtype`` defaults to bfloat16 on a GPU and float32 elsewhere."""
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(
            f"{path} does not exist; pass an HF-style checkpoint directory or a training "
            "workdir (python train.py --config configs/tiny.py writes runs/tiny)"
        )
    saved = workdir_config(path)
    if saved is not None:
        checkpoint = path / "model"
        if not (checkpoint / "config.json").is_file():
            raise ConfigError(
                f"workdir {path} has no exported model yet (a run writes {checkpoint} when it "
                f"finishes); finish it by rerunning its train.py command with --workdir {path}"
            )
        tokenizer = tokenizer or saved["data"]["tokenizer"]
    else:
        checkpoint = path
    model = from_hf(checkpoint, dtype=dtype or default_dtype(), attention_impl=attention_impl)
    tokenizer = make_tokenizer(tokenizer or _checkpoint_tokenizer(checkpoint, model.cfg.vocab_size))
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer's vocabulary ({tokenizer.vocab_size}) does not fit the model's "
            f"({model.cfg.vocab_size}); pass the tokenizer the model was trained with"
        )
    return model, tokenizer
