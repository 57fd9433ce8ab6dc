"""The JAX model against HF transformers: logits, round trip, and bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import VARIANTS, build_hf_model, save_hf_model
from transformers import AutoModelForCausalLM

from l2a_jax import CheckpointError, ConfigError, from_hf, to_hf
from l2a_jax.safetensors_io import SafetensorsFile, write_safetensors

LENGTHS = (33, 20, 7)  # one padded batch with several sequence lengths


def padded_batch(rng, vocab):
    t = max(LENGTHS)
    ids = rng.integers(0, vocab, (len(LENGTHS), t))
    valid = np.arange(t)[None, :] < np.asarray(LENGTHS)[:, None]
    return ids, valid


def hf_logits(model, ids, valid):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))
        )
    return out.logits.float().numpy()


def jax_logits(model, ids, valid):
    # padding forms its own segment (id 0), so real tokens never attend to it
    return np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(valid.astype(np.int32))))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_logits_match_transformers(variant, tmp_path, rng):
    hf = build_hf_model(variant)
    model = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    ids, valid = padded_batch(rng, hf.config.vocab_size)
    want = hf_logits(hf, ids, valid)
    got = jax_logits(model, ids, valid)
    assert got.shape == (len(LENGTHS), max(LENGTHS), hf.config.vocab_size)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2_linear_gqa2", "qwen3_yarn_headdim"])
def test_round_trip_through_transformers(variant, tmp_path, rng):
    hf = build_hf_model(variant)
    model = from_hf(save_hf_model(hf, tmp_path / "hf"))
    out = to_hf(model, tmp_path / "ours")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    ids, valid = padded_batch(rng, hf.config.vocab_size)
    np.testing.assert_allclose(
        hf_logits(reloaded, ids, valid)[valid], hf_logits(hf, ids, valid)[valid], atol=1e-5, rtol=0
    )
    again = from_hf(out)
    np.testing.assert_allclose(
        jax_logits(again, ids, valid), jax_logits(model, ids, valid), atol=1e-5, rtol=0
    )


def test_round_trip_sharded_output_and_tied_head(tmp_path, rng):
    hf = build_hf_model("qwen3_gqa7_tied_mha")
    model = from_hf(save_hf_model(hf, tmp_path / "hf"))
    out = to_hf(model, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, valid = padded_batch(rng, hf.config.vocab_size)
    np.testing.assert_allclose(
        hf_logits(reloaded, ids, valid)[valid], hf_logits(hf, ids, valid)[valid], atol=1e-5, rtol=0
    )


def test_packed_documents_match_separate_runs(tmp_path, rng):
    hf = build_hf_model("qwen3_yarn_headdim")
    model = from_hf(save_hf_model(hf, tmp_path / "hf"))
    lengths = (11, 17, 5)
    docs = [rng.integers(0, hf.config.vocab_size, n) for n in lengths]
    ids = np.concatenate(docs)[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.asarray(
        model(
            jnp.asarray(ids), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids)
        )
    )
    start = 0
    for doc in docs:
        with torch.no_grad():
            want = hf(input_ids=torch.tensor(doc[None])).logits.numpy()[0]
        np.testing.assert_allclose(packed[0, start : start + len(doc)], want, atol=1e-4, rtol=0)
        start += len(doc)


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_loading(saved_dtype, tmp_path, rng, capsys):
    hf = build_hf_model("qwen2_linear_gqa2")
    path = save_hf_model(hf.to(saved_dtype), tmp_path / "hf")
    model = from_hf(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(jax.tree.map(lambda v: v, model)))
    ids, valid = padded_batch(rng, hf.config.vocab_size)
    want = hf_logits(hf.float(), ids, valid)[valid]
    got = jax_logits(model, ids, valid)[valid]
    err = float(np.abs(got - want).max())
    with capsys.disabled():
        print(
            f"\nbf16 weights (saved as {saved_dtype}): max |logit error| = {err:.3g} "
            f"(max |logit| {np.abs(want).max():.3g})"
        )
    assert np.isfinite(got).all()
    assert err < 0.05 * np.abs(want).max()


# --- bad checkpoints: one error that names every problem -------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    return save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path / "hf")


def edit_config(directory, edit):
    """Applies ``edit(dict)`` to config.json."""
    path = f"{directory}/config.json"
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


def rewrite_weights(directory, edit):
    """Applies ``edit(dict name -> array)`` to model.safetensors."""
    file = f"{directory}/model.safetensors"
    reader = SafetensorsFile(file)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del reader
    edit(tensors)
    write_safetensors(file, tensors.items())


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "empty")


def test_missing_weights_file(checkpoint):
    import os

    os.remove(f"{checkpoint}/model.safetensors")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        from_hf(checkpoint)


def test_every_problem_is_reported_at_once(checkpoint):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]
        t["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)

    rewrite_weights(checkpoint, edit)
    with pytest.raises(CheckpointError) as info:
        from_hf(checkpoint)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight has shape (31, 64), expected (32, 64)" in msg
    assert "unmapped tensor model.layers.0.self_attn.rotary.weight" in msg


def test_duplicate_tensor_across_shards(checkpoint):
    reader = SafetensorsFile(f"{checkpoint}/model.safetensors")
    key = "model.norm.weight"
    write_safetensors(f"{checkpoint}/extra.safetensors", [(key, np.array(reader.get(key)))])
    index = {"weight_map": {k: "model.safetensors" for k in reader.keys()}}
    index["weight_map"]["extra"] = "extra.safetensors"
    with open(f"{checkpoint}/model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="duplicate tensor model.norm.weight"):
        from_hf(checkpoint)


@pytest.mark.parametrize("keep", ["header_only", "most"])
def test_truncated_weights_file(checkpoint, keep):
    import os

    file = f"{checkpoint}/model.safetensors"
    size = 100 if keep == "header_only" else os.path.getsize(file) - 100
    with open(file, "r+b") as f:
        f.truncate(size)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated") as info:
        from_hf(checkpoint)
    assert "missing tensor" not in str(info.value)


def test_unexpected_bias_for_config(checkpoint):
    edit_config(
        checkpoint, lambda c: c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    )
    with pytest.raises(CheckpointError) as info:
        from_hf(checkpoint)
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias" in str(info.value)
    assert "missing tensor model.layers.0.self_attn.q_norm.weight" in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            "architecture 'LlamaForCausalLM' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}},
            "rope type 'longrope' is not supported",
        ),
        ({"use_sliding_window": True}, "sliding-window layers"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_unsupported_config(checkpoint, change, match):
    edit_config(checkpoint, lambda c: c.update(change))
    with pytest.raises(ConfigError, match=match):
        from_hf(checkpoint)


def test_legacy_rope_scaling_keys(tmp_path, rng):
    """Checkpoints saved before transformers 5 spell rope as rope_theta + rope_scaling."""
    hf = build_hf_model("qwen2_linear_gqa2")
    path = save_hf_model(hf, tmp_path / "hf")

    def to_legacy(config):
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = {"type": params.pop("rope_type"), **params}

    edit_config(path, to_legacy)
    model = from_hf(path)
    ids, valid = padded_batch(rng, hf.config.vocab_size)
    np.testing.assert_allclose(
        jax_logits(model, ids, valid)[valid], hf_logits(hf, ids, valid)[valid], atol=1e-4, rtol=0
    )


def test_copied_checkpoint_with_stale_files_is_overwritten(tmp_path):
    hf = build_hf_model("qwen3_gqa7_tied_mha")
    model = from_hf(save_hf_model(hf, tmp_path / "hf"))
    out = to_hf(model, tmp_path / "ours", max_shard_bytes=20_000)
    to_hf(model, out)  # now one file: the old shards and index must not linger
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    shutil.rmtree(out)
