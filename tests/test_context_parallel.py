"""Context parallelism on 8 simulated CPU devices: attention over a sequence split along the
mesh's ``seq`` axis against the unsharded jnp reference (forward and backward), the model and
a few training steps against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import build_hf_model, save_hf_model
from sharded_checks import assert_param_grads_match, train_history

from l2a_jax import Batch, L2AConfig, convert_to_l2a, from_hf
from l2a_jax.attention import AttentionBackend
from l2a_jax.context_parallel import halo_hops
from l2a_jax.convert import random_routers
from l2a_jax.sharding import make_mesh
from l2a_jax.training import TrainConfig
from pallas_kernels import reference

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESHES = {
    "seq8": dict(seq=8),
    "data2_seq4": dict(data=2, seq=4),
    "data2_seq2_tensor2": dict(data=2, seq=2, tensor=2),
}


def qkv(rng, b, t, hq=4, hkv=2, d=16):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return normal(b, t, hq, d), normal(b, t, hkv, d), normal(b, t, hkv, d), normal(b, t, hq, d)


def packed_segments(rng, b, t, pieces=3):
    """Each row cut into ``pieces`` documents at random points (shard boundaries ignored)."""
    cuts = np.sort(rng.integers(1, t, (b, pieces - 1)), axis=1)
    return jnp.asarray((np.arange(t)[None, None, :] >= cuts[:, :, None]).sum(1) + 1)


def outputs_and_grads(fn, q, k, v, weight):
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * weight), (0, 1, 2)))(q, k, v)
    return out, grads


def assert_same(got, want, atol):
    (out, grads), (out_ref, grads_ref) = got, want
    np.testing.assert_allclose(out, out_ref, atol=atol, rtol=0)
    for name, g, w in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"d{name}")


def test_halo_hops():
    assert halo_hops(window=5, shard=8, shards=4) == 1
    assert halo_hops(window=9, shard=8, shards=4) == 1  # 8 earlier keys: one shard
    assert halo_hops(window=10, shard=8, shards=4) == 2
    assert halo_hops(window=1000, shard=8, shards=4) == 3  # never more than the shards before
    assert halo_hops(window=1, shard=8, shards=4) == 0


@pytest.mark.parametrize(
    "mesh_name, t", [("seq8", 48), ("data2_seq4", 64), ("data2_seq2_tensor2", 40)]
)
def test_context_parallel_attention_matches_reference(mesh_name, t, rng):
    mesh = make_mesh(**MESHES[mesh_name])
    backend = AttentionBackend("xla", 16, mesh=mesh)
    assert backend.seq_axes == "seq"
    q, k, v, weight = qkv(rng, 2, t)
    segments = packed_segments(rng, 2, t)
    for segment_ids in (None, segments):
        # windows inside one shard, spanning several shards, and longer than the sequence
        for window in (3, 17, t + 5):

            def sharded(q, k, v, window=window, segment_ids=segment_ids):
                return backend.causal(q, k, v, segment_ids=segment_ids, window=window)

            def single(q, k, v, window=window, segment_ids=segment_ids):
                return reference.causal_attention_reference(
                    q, k, v, window=window, segment_ids=segment_ids
                )

            assert_same(
                outputs_and_grads(sharded, q, k, v, weight),
                outputs_and_grads(single, q, k, v, weight),
                atol=1e-5,
            )
        for density in (0.0, 0.3, 1.0):
            route = jnp.asarray(rng.random((2, t)) < density)

            def sharded(q, k, v, route=route, segment_ids=segment_ids):
                return backend.routed(q, k, v, route, segment_ids=segment_ids)

            def single(q, k, v, route=route, segment_ids=segment_ids):
                return reference.conditional_global_attention_reference(
                    q, k, v, route, segment_ids=segment_ids
                )

            assert_same(
                outputs_and_grads(sharded, q, k, v, weight),
                outputs_and_grads(single, q, k, v, weight),
                atol=1e-5,
            )


@pytest.mark.slow
def test_context_parallel_kernels_match_reference(rng):
    """The Pallas kernels (interpret mode here) as each shard's part."""
    mesh = make_mesh(data=2, seq=4)
    backend = AttentionBackend("pallas", 16, mesh=mesh)
    t = 48
    q, k, v, weight = qkv(rng, 2, t)
    segments = packed_segments(rng, 2, t)
    route = jnp.asarray(rng.random((2, t)) < 0.3)
    cases = {
        "window": (
            lambda q, k, v: backend.causal(q, k, v, segment_ids=segments, window=17),
            lambda q, k, v: reference.causal_attention_reference(
                q, k, v, window=17, segment_ids=segments
            ),
        ),
        "routed": (
            lambda q, k, v: backend.routed(q, k, v, route, segment_ids=segments),
            lambda q, k, v: reference.conditional_global_attention_reference(
                q, k, v, route, segment_ids=segments
            ),
        ),
    }
    for name, (sharded, single) in cases.items():
        got = outputs_and_grads(sharded, q, k, v, weight)
        want = outputs_and_grads(single, q, k, v, weight)
        assert_same(got, want, atol=1e-5), name


def test_length_not_divisible_by_shards_is_refused(rng):
    backend = AttentionBackend("xla", 16, mesh=make_mesh(seq=8))
    q, k, v, _ = qkv(rng, 1, 36)
    with pytest.raises(ValueError, match="36 does not split over the mesh's 8 sequence shards"):
        backend.causal(q, k, v, window=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path_factory.mktemp("hf"))


def l2a_model(checkpoint, mesh):
    model = from_hf(checkpoint, mesh=mesh, attention_impl="xla")
    return random_routers(convert_to_l2a(model, L2AConfig(window=6)), seed=1)


def test_l2a_model_with_sequence_axis_matches_one_device(checkpoint, rng):
    sharded = l2a_model(checkpoint, make_mesh(data=2, seq=4))
    single = l2a_model(checkpoint, None)
    ids = jnp.asarray(rng.integers(0, 101, (2, 32)))
    segments = packed_segments(rng, 2, 32)
    got, got_stats = sharded.forward_with_stats(ids, segment_ids=segments)
    want, want_stats = single.forward_with_stats(ids, segment_ids=segments)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_stats.routed_fraction, want_stats.routed_fraction)
    assert 0 < float(want_stats.routed_fraction.mean()) < 1
    assert_param_grads_match(sharded, single, ids, segments, dense_steps=(False, True))


@pytest.mark.slow
def test_train_steps_with_sequence_axis_match_one_device(checkpoint, rng):
    cfg = TrainConfig(
        learning_rate=3e-3, warmup_steps=1, total_steps=20, sparsity_weight=0.05,
        sparsity_warmup_steps=1, dense_step_prob=0.5,
    )  # fmt: skip
    tokens = rng.integers(0, 101, (4, 32))
    segments = np.asarray(packed_segments(rng, 4, 32))
    # positions restart at 0 in every document, as packed training rows have them
    starts = np.asarray([[np.argmax(row == s) for s in row] for row in segments])
    positions = np.arange(32)[None, :] - starts
    histories = []
    for mesh in (make_mesh(data=2, seq=4), None):
        model = l2a_model(checkpoint, mesh)
        batch = Batch.of(tokens, positions, segments, vocab_size=101)
        histories.append(train_history(model, cfg, batch)[0])
    sharded, single = histories
    assert any(h["dense_step"] for h in single)
    for got, want in zip(sharded, single, strict=True):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_training_config_refuses_a_sequence_axis_that_does_not_split_the_rows():
    from l2a_jax.config import ConfigError
    from l2a_jax.training.run_config import default_config, validate

    config = default_config()
    config.model.init = "random"
    config.data.seq_len = 512
    config.mesh.seq = 3
    with pytest.raises(ConfigError, match=r"mesh\.seq.*3 sequence shards do not split .* 512"):
        validate(config, vocab_size=257)
