"""Bad input at the library's boundary: one clear error naming the fix, before any work."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import build_hf_model, save_hf_model

from l2a_jax import Batch, ConfigError, from_hf
from l2a_jax.config import resolve_dtype


@pytest.fixture(scope="module")
def model_and_path(tmp_path_factory):
    path = save_hf_model(build_hf_model("qwen3_bias_yarn_factor"), tmp_path_factory.mktemp("hf"))
    return from_hf(path, attention_impl="xla"), path


@pytest.fixture
def model(model_and_path):
    return model_and_path[0]


def test_config_model_and_loader_import_no_kernel_code():
    kernel_modules = (
        "pallas_kernels.attention",
        "pallas_kernels.flash",
        "pallas_kernels.decode",
        "jax.experimental.pallas",
        "jax._src.pallas.triton",
    )
    for modules in (
        "l2a_jax.config",
        "l2a_jax.model, l2a_jax.hf, l2a_jax.training, l2a_jax.generate",
    ):
        code = (
            f"import sys, {modules}\n"
            f"loaded = [m for m in sys.modules if m.startswith({kernel_modules!r})]\n"
            "assert not loaded, loaded\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


def test_lists_and_numpy_ids_give_the_same_logits(model, rng):
    ids = rng.integers(0, 101, (2, 9))
    want = model(jnp.asarray(ids))
    np.testing.assert_array_equal(model(ids), want)
    np.testing.assert_array_equal(model(ids.tolist()), want)
    np.testing.assert_array_equal(model(ids.astype(np.int64)), want)


@pytest.mark.parametrize("bad", [101, 5000, -1])
def test_out_of_vocabulary_ids_raise_when_concrete(model, bad):
    ids = np.zeros((1, 6), np.int64)
    ids[0, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}, outside .*\[0, 101\).*tokenizer"):
        model(ids)
    with pytest.raises(ValueError, match=rf"token id {bad}"):
        Batch.of(ids, vocab_size=101)


def test_out_of_vocabulary_ids_give_nan_inside_jit(model):
    """Documented in batch.py: under jit an out-of-range id makes its sequence's logits NaN
    (never a silent wrap to another token), so the loss shows it; other rows are untouched."""
    ids = jnp.asarray([[5, 7, -1, 9], [5, 7, 101, 9], [5, 7, 8, 9]])
    logits = np.asarray(jax.jit(lambda ids: model(ids))(ids))
    assert np.isnan(logits[:2, 2:]).all()
    np.testing.assert_allclose(logits[2], np.asarray(model(ids[2:]))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (np.zeros((1, 4), np.float32), TypeError, "integer token ids.*tokenize text first"),
        ([[0.5, 1.0]], TypeError, "integer token ids"),
        (np.zeros((4,), np.int32), ValueError, r"\(batch, seq\).*ids\[None\]"),
        (np.zeros((1, 2, 3), np.int32), ValueError, r"\(batch, seq\); got shape \(1, 2, 3\)"),
    ],
)
def test_ids_of_the_wrong_kind(model, ids, error, match):
    with pytest.raises(error, match=match):
        model(ids)


@pytest.mark.parametrize("name", ["positions", "segment_ids"])
def test_misshaped_positions_and_segments(model, name):
    ids = np.zeros((2, 6), np.int32)
    with pytest.raises(ValueError, match=rf"{name} must have the shape .* \(2, 6\); got \(6,\)"):
        model(ids, **{name: np.arange(6)})
    with pytest.raises(TypeError, match=f"{name} must be integers"):
        model(ids, **{name: np.zeros((2, 6), np.float32)})
    with pytest.raises(ValueError, match=f"{name} must have the shape"):
        Batch.of(ids, **{name: np.zeros((2, 5), np.int32)})


def test_loss_mask_shape_is_checked():
    with pytest.raises(ValueError, match=r"loss_mask must have the shape of input_ids \(2, 6\)"):
        Batch.of(np.zeros((2, 6), np.int32), loss_mask=np.ones((2, 5)))


@pytest.mark.parametrize("name", ["bf16", "bfloat16", "BF16", "float32", "fp32", "float16"])
def test_dtype_names_are_accepted(model_and_path, name, rng):
    model = from_hf(model_and_path[1], dtype=name, attention_impl="xla")
    assert model.embed[...].dtype == resolve_dtype(name)
    assert np.isfinite(np.asarray(model(rng.integers(0, 101, (1, 5))))).all()


@pytest.mark.parametrize(
    "dtype, match",
    [
        ("bf61", r"dtype 'bf61' is unknown; use one of \['bf16', 'bfloat16'"),
        ("int8", "dtype 'int8' is unknown"),
        (jnp.int32, "must be float32, bfloat16 or float16; got int32"),
        (object(), "is not a dtype"),
    ],
)
def test_non_float_dtypes_are_refused_at_load_time(model_and_path, dtype, match):
    with pytest.raises(ConfigError, match=match):
        from_hf(model_and_path[1], dtype=dtype)
