"""Pruning global branches: exactness for layers that route nothing, HF round trip, cache
sizes, layer choice and the command line."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from l2a_jax import L2AConfig, ModelConfig, QwenModel, Routing, convert_to_l2a, from_hf, to_hf
from l2a_jax.config import ConfigError
from l2a_jax.convert import prune_global_branches
from l2a_jax.data import embedded_corpus
from l2a_jax.generate import cache_size, generate, prefill
from l2a_jax.pruning import choose_layers, measure_routing


def routed_model(silent=(1,)):
    """A 3-layer L2A model (Qwen3 with attention biases, so the global o-proj bias matters)
    whose ``silent`` layers route no token and the others half of them, at random."""
    cfg = ModelConfig(
        "Qwen3ForCausalLM", 257, 32, 64, 3, 4, 2, 8, qk_norm=True, qkv_bias=True, o_bias=True,
        max_position_embeddings=512,
    )  # fmt: skip
    densities = tuple(0.0 if i in silent else 0.5 for i in range(3))
    l2a = L2AConfig(window=8, mode="random", random_densities=densities)
    model = convert_to_l2a(QwenModel(cfg, rngs=nnx.Rngs(0)), l2a)
    for i, layer in enumerate(model.layers):
        bo = layer.global_attn.bo
        bo[...] = 0.1 * jax.random.normal(jax.random.key(10 + i), bo[...].shape)
    return model


ROUTING = Routing(rng=jax.random.key(0))


def test_pruning_a_silent_layer_changes_nothing_but_its_cache(tmp_path, rng):
    model = routed_model()
    ids = rng.integers(0, 257, (2, 40))
    _, stats = model.forward_with_stats(ids, routing=ROUTING)
    assert float(stats.routed_fraction[1]) == 0 and 0 < float(stats.routed_fraction[0]) < 1
    pruned = prune_global_branches(model, [1])
    assert pruned.l2a.pruned_layers == (1,) and model.l2a.pruned_layers == ()
    assert not hasattr(pruned.layers[1], "global_attn") and hasattr(pruned.layers[0], "router")
    np.testing.assert_allclose(
        pruned(ids, routing=ROUTING), model(ids, routing=ROUTING), rtol=1e-5, atol=1e-5
    )
    to_hf(pruned, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["l2a"]["pruned_layers"] == [1]
    loaded = from_hf(tmp_path / "pruned")
    np.testing.assert_array_equal(loaded(ids, routing=ROUTING), pruned(ids, routing=ROUTING))
    np.testing.assert_array_equal(
        generate(loaded, ids[:, :12], max_new_tokens=6),
        generate(model, ids[:, :12], max_new_tokens=6),
    )
    # the cache shrinks by exactly the pruned layer's global K and V
    _, full = prefill(model, ids, capacity=64)
    _, small = prefill(loaded, ids, capacity=64)
    cfg = model.cfg
    assert full.nbytes - small.nbytes == 2 * 2 * 64 * cfg.num_kv_heads * cfg.head_dim * 4
    assert cache_size(model, 64).per_token - cache_size(loaded, 64).per_token == (
        2 * cfg.num_kv_heads * cfg.head_dim * 4
    )
    # pruning a layer that routes changes the output: the tool is exact only where it should be
    cut = prune_global_branches(model, [0])
    assert not np.allclose(cut(ids, routing=ROUTING), model(ids, routing=ROUTING), atol=1e-3)


def test_choosing_layers(rng):
    model = routed_model(silent=(1, 2))
    docs = embedded_corpus("heldout")
    from l2a_jax.data import make_tokenizer

    routed, ppl = measure_routing(model, make_tokenizer("bytes"), docs, length=128, samples=3)
    assert set(routed) == {0, 1, 2} and routed[1] == routed[2] == 0 and routed[0] > 0
    assert 1 < ppl < 1000
    assert choose_layers(model, routed, threshold=0.01) == (1, 2)
    per_layer = cache_size(model, 1).per_token // 3
    assert choose_layers(model, routed, kv_fraction=0.5) == (1, 2)  # 3 -> 1 layer of caches
    assert choose_layers(model, routed, kv_bytes_per_token=2 * per_layer) == (1,)
    assert choose_layers(model, routed, kv_bytes_per_token=0) == (0, 1, 2)
    once = prune_global_branches(model, [1])
    assert choose_layers(once, routed, threshold=0.01) == (2,)  # 1 is gone already
    with pytest.raises(ConfigError, match="exactly one"):
        choose_layers(model, routed, threshold=0.1, kv_fraction=0.5)
    with pytest.raises(ValueError, match="not L2A layers"):
        prune_global_branches(model, [5])
    base = QwenModel(model.cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="only an L2A model"):
        prune_global_branches(base, [0])
    with pytest.raises(ConfigError, match="pruned_layers"):
        L2AConfig(layers=(0, 1), pruned_layers=(2,)).layer_modes(3)


@pytest.mark.slow
def test_command_line_prunes_and_sweeps(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import prune as cli

    to_hf(routed_model(silent=(1, 2)), tmp_path / "run" / "model")
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"train": {}, "data": {"tokenizer": "bytes", "seq_len": 400}})
    )
    cli.main(["--workdir", str(tmp_path / "run"), "--threshold", "0.01", "--samples", "2"])
    line = capsys.readouterr().out
    assert "pruned layers [1, 2]" in line and "67% saved" in line and "niah (likelihood)" in line
    report = json.loads((tmp_path / "run" / "pruned" / "prune_report.json").read_text())
    assert report["pruned_layers"] == [1, 2]
    before, after = report["scores"]["before"], report["scores"]["after"]
    assert list(before["perplexity"]) == ["100", "200", "400"]  # a quarter, half, all
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-5)
    assert after["niah"] == before["niah"]  # silent layers: the same scores
    assert report["model"]["l2a"]["mode"] == "random"
    assert (tmp_path / "run" / "pruned" / "routing.png").stat().st_size > 1000
    assert from_hf(tmp_path / "run" / "pruned").l2a.pruned_layers == (1, 2)
    cli.main(["--workdir", str(tmp_path / "run"), "--sweep", "0.01,0.9", "--samples", "2",
              "--niah-samples", "1", "--out", str(tmp_path / "sweep")])  # fmt: skip
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["pruned_layers"] for r in sweep["rows"]] == [[], [1, 2], [0, 1, 2]]
    assert [round(r["kv_saved"], 2) for r in sweep["rows"]] == [0, 0.67, 1]
    assert (tmp_path / "sweep" / "tradeoff.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["--hf", str(tmp_path / "nothing"), "--threshold", "0.1"])


def test_layers_without_a_global_cache_are_not_candidates(rng):
    """A static model's swa layers hold no global cache: pruning them would save nothing, so
    a KV budget is met by pruning the global layers that do."""
    cfg = ModelConfig("Qwen3ForCausalLM", 257, 32, 64, 3, 4, 2, 8, qk_norm=True)
    l2a = L2AConfig(window=8, mode="static", static_global_layers=(1, 2))
    model = convert_to_l2a(QwenModel(cfg, rngs=nnx.Rngs(0)), l2a)
    routed = {0: 0.0, 1: 1.0, 2: 1.0}  # what a measurement gives for swa and full layers
    assert choose_layers(model, routed, threshold=0.5) == ()
    assert choose_layers(model, routed, kv_fraction=0.5) == (1,)
    assert choose_layers(model, routed, kv_bytes_per_token=0) == (1, 2)
