"""Data: tokenizers, documents (the embedded corpus or text files), generated long-context
tasks and the grain pipeline that packs them into training batches. Nothing here knows the
model."""

from l2a_jax.data.corpus import embedded_corpus, read_text_files
from l2a_jax.data.needles import TaskSample, key_words, make_niah, sentences
from l2a_jax.data.pipeline import NeedleMix, training_batches
from l2a_jax.data.synthetic import make_cwe, make_vt
from l2a_jax.data.tokenizers import Tokenizer, make_tokenizer

__all__ = [
    "NeedleMix",
    "TaskSample",
    "Tokenizer",
    "embedded_corpus",
    "key_words",
    "make_cwe",
    "make_niah",
    "make_tokenizer",
    "make_vt",
    "read_text_files",
    "sentences",
    "training_batches",
]
