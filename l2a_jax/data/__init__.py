"""Data: tokenizers, documents (the embedded corpus or text files), generated long-context
tasks and the grain pipeline that packs them into training batches. Nothing here knows the
model."""

from l2a_jax.data.corpus import embedded_corpus, read_text_files
from l2a_jax.data.needles import NeedleTask, key_words, make_needle_task, sentences
from l2a_jax.data.pipeline import NeedleMix, training_batches
from l2a_jax.data.tokenizers import Tokenizer, make_tokenizer

__all__ = [
    "NeedleMix",
    "NeedleTask",
    "Tokenizer",
    "embedded_corpus",
    "key_words",
    "make_needle_task",
    "make_tokenizer",
    "read_text_files",
    "sentences",
    "training_batches",
]
