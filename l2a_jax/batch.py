"""The one batch type that data, training and evaluation share, and the checks at the
boundary where token ids enter the library.

Every field is (batch, seq): ``input_ids`` int32 token ids; ``positions`` int32 rotary
positions (restarting per packed document); ``segment_ids`` int32 document ids of packed
sequences (a token attends only to earlier tokens with the same id); ``loss_mask`` float32,
1 where the token is a prediction target. Only ``input_ids`` is required.

Ids are checked against the vocabulary whenever they are concrete (eager calls, data, prompts).
Inside ``jax.jit`` they cannot be: there an id outside [0, vocab) reads a NaN embedding, which
makes the logits of its sequence NaN (never a silent wrap to another token, and other
sequences of the batch are untouched), so a bad batch shows up in the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def as_token_ids(input_ids, vocab_size: int | None = None, *, name: str = "input_ids"):
    """``input_ids`` (a list, NumPy or JAX array of ints) as an int32 (batch, seq) array;
    concrete ids are checked to lie in [0, ``vocab_size``)."""
    if not hasattr(input_ids, "dtype"):
        input_ids = np.asarray(input_ids)
    _check_type_and_shape(input_ids, name)
    if vocab_size is not None and _is_concrete(input_ids) and input_ids.size:
        _check_vocabulary(np.asarray(input_ids), vocab_size, name)
    return jnp.asarray(input_ids, jnp.int32)


def host_token_ids(input_ids, vocab_size: int | None = None, *, name: str = "input_ids"):
    """``as_token_ids`` on the host: the same checks, a NumPy int32 array (no device work,
    for a caller that hands the ids to a jitted program itself)."""
    host = np.asarray(input_ids)
    _check_type_and_shape(host, name)
    if vocab_size is not None and host.size:
        _check_vocabulary(host, vocab_size, name)
    return host.astype(np.int32)


def _check_type_and_shape(input_ids, name: str) -> None:
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(
            f"{name} must hold integer token ids; got dtype {input_ids.dtype} "
            "(tokenize text first, or cast with .astype('int32'))"
        )
    if input_ids.ndim != 2:
        raise ValueError(
            f"{name} must be (batch, seq); got shape {tuple(input_ids.shape)} "
            "(add a batch axis with ids[None] for a single sequence)"
        )


def _check_vocabulary(host: np.ndarray, vocab_size: int, name: str) -> None:
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}); "
            "tokenize with the model's own tokenizer"
        )


def check_per_token(x, shape: tuple[int, int], name: str):
    """A (batch, seq) integer array such as ``positions`` or ``segment_ids`` as int32, or None."""
    if x is None:
        return None
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of input_ids (batch, seq) = {tuple(shape)}; "
            f"got {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers; got dtype {x.dtype}")
    return jnp.asarray(x, jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """A (batch, seq) batch; optional fields may be None. Build with ``Batch.of``."""

    input_ids: jax.Array
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    loss_mask: jax.Array | None = None

    @classmethod
    def of(
        cls,
        input_ids,
        positions=None,
        segment_ids=None,
        loss_mask=None,
        *,
        vocab_size: int | None = None,
    ) -> Batch:
        """A checked batch: ids in [0, ``vocab_size``) when given, every field (batch, seq)."""
        ids = as_token_ids(input_ids, vocab_size)
        if loss_mask is not None:
            if tuple(np.shape(loss_mask)) != tuple(ids.shape):
                raise ValueError(
                    f"loss_mask must have the shape of input_ids {tuple(ids.shape)}; "
                    f"got {tuple(np.shape(loss_mask))}"
                )
            loss_mask = jnp.asarray(loss_mask, jnp.float32)
        return cls(
            ids,
            check_per_token(positions, ids.shape, "positions"),
            check_per_token(segment_ids, ids.shape, "segment_ids"),
            loss_mask,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.input_ids.shape))
