"""Generation with KV caches against transformers' ``generate`` and against recomputing the
whole sequence for every new token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import build_hf_model, save_hf_model

from l2a_jax import L2AConfig, convert_to_l2a, from_hf
from l2a_jax.generate import (
    Sampling,
    cache_layout,
    cache_size,
    decode_step,
    generate,
    prefill,
)


def hf_greedy(hf, prompt, new_tokens, eos=None):
    """transformers' greedy continuation of one unpadded prompt."""
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():  # an explicit mask: else a prompt token equal to the pad id is masked
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def recompute_greedy(model, prompt, new_tokens):
    """Greedy decoding without a cache: the whole sequence through the model per token."""
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(np.argmax(np.asarray(model(np.asarray([seq]))[0, -1]))))
    return seq[len(prompt) :]


@pytest.mark.parametrize("variant", ["qwen2_linear_gqa2", "qwen3_yarn_headdim"])
def test_greedy_equals_transformers(variant, tmp_path, rng):
    hf = build_hf_model(variant)
    model = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    # equal lengths as one array, different lengths as a list of id lists
    equal = rng.integers(0, 101, (2, 9))
    got = np.asarray(generate(model, equal, max_new_tokens=12))
    assert got.shape == (2, 12) and got.dtype == np.int32
    for prompt, row in zip(equal, got, strict=True):
        assert row.tolist() == hf_greedy(hf, prompt, 12)
    ragged = [list(rng.integers(0, 101, n)) for n in (5, 17, 1)]
    got = np.asarray(generate(model, ragged, max_new_tokens=12))
    for prompt, row in zip(ragged, got, strict=True):
        assert row.tolist() == hf_greedy(hf, prompt, 12)
    # the same batch right-padded (with ids that are not even in the vocabulary)
    padded = np.full((3, 17), 10_000)
    for i, prompt in enumerate(ragged):
        padded[i, : len(prompt)] = prompt
    again = generate(model, padded, prompt_lengths=[5, 17, 1], max_new_tokens=12)
    np.testing.assert_array_equal(again, got)


def test_eos_ends_a_row_and_pads_it(tmp_path, rng):
    hf = build_hf_model("qwen3_gqa7_tied_mha")
    model = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    prompts = rng.integers(0, 101, (2, 6))
    free = np.asarray(generate(model, prompts, max_new_tokens=10))
    eos = int(free[0, 3])  # a token the first row produces at its fourth step
    got = np.asarray(generate(model, prompts, max_new_tokens=10, eos_token_id=eos, pad_token_id=7))
    for row, prompt, free_row in zip(got, prompts, free, strict=True):
        expected = hf_greedy(hf, prompt, 10, eos=eos)
        assert row[: len(expected)].tolist() == expected
        end = free_row.tolist().index(eos) + 1 if eos in free_row else 10
        assert row[:end].tolist() == free_row[:end].tolist()
        assert (row[end:] == 7).all()


def l2a_model(tmp_path, mode, window, **kw):
    hf = build_hf_model("qwen3_yarn_headdim")
    base = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    model = convert_to_l2a(base, L2AConfig(window=window, mode=mode, **kw))
    if mode == "l2a":  # routers that route some tokens and not others
        key = jax.random.key(3)
        for i, layer in enumerate(model.layers):
            w = jax.random.normal(jax.random.fold_in(key, i), layer.router[...].shape)
            layer.router[...] = 0.3 * w
    return model


@pytest.mark.parametrize(
    "mode, kw", [("l2a", {}), ("full", {}), ("swa", {}), ("static", {"static_global_layers": (1,)})]
)
def test_l2a_decoding_equals_recomputation(mode, kw, tmp_path, rng):
    """Every mode, a window (4) shorter than the prompts: the cached decode gives the tokens
    and logits of running the whole sequence through the model again."""
    model = l2a_model(tmp_path, mode, window=4, **kw)
    prompts = [list(rng.integers(0, 101, n)) for n in (11, 6)]
    got = np.asarray(generate(model, prompts, max_new_tokens=8))
    for prompt, row in zip(prompts, got, strict=True):
        assert row.tolist() == recompute_greedy(model, prompt, 8)
    # logits step by step, against the forward pass over prompt + continuation (causal: its
    # logits at position p are those of the sequence cut after p)
    seqs = [p + r.tolist() for p, r in zip(prompts, got, strict=True)]
    lengths = np.asarray([len(p) for p in prompts])
    forward = [np.asarray(model(np.asarray([seq]))[0]) for seq in seqs]
    logits, cache = prefill(model, prompts, capacity=max(map(len, seqs)))
    for step in range(8):
        for row in range(len(seqs)):
            want = forward[row][lengths[row] + step - 1]
            np.testing.assert_allclose(logits[row], want, rtol=1e-4, atol=1e-4)
        tokens = [seq[lengths[row] + step] for row, seq in enumerate(seqs)]
        logits, cache = decode_step(model, cache, tokens)


def test_full_mode_decodes_like_the_dense_model(tmp_path, rng):
    """Every token routed: the L2A model's global branch is the base attention and its window
    branch adds a second copy of it; with the local branch's output projection zeroed, the L2A
    model computes the base model exactly, and so must its decode."""
    hf = build_hf_model("qwen2_linear_gqa2")
    base = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    model = convert_to_l2a(base, L2AConfig(window=3, mode="full"))
    for layer in model.layers:
        layer.attn.wo[...] = jnp.zeros_like(layer.attn.wo[...])
        layer.attn.bq[...] = layer.attn.bq[...]  # (biases stay: only wo is silenced)
        layer.global_norm.weight[...] = layer.input_norm.weight[...]
    prompts = [list(rng.integers(0, 101, n)) for n in (10, 4)]
    got = np.asarray(generate(model, prompts, max_new_tokens=10))
    for prompt, row in zip(prompts, got, strict=True):
        assert row.tolist() == hf_greedy(hf, prompt, 10)


@pytest.mark.parametrize("mode", ["l2a", "random"])
def test_skipping_global_reads_changes_nothing(mode, tmp_path, rng):
    kw = {"random_densities": (0.5, 0.5)} if mode == "random" else {}
    model = l2a_model(tmp_path, mode, window=3, **kw)
    prompts = [list(rng.integers(0, 101, n)) for n in (9, 5, 7)]
    for seed in (0, 1):
        skipped = generate(model, prompts, max_new_tokens=10, skip=True, seed=seed)
        read = generate(model, prompts, max_new_tokens=10, skip=False, seed=seed)
        np.testing.assert_array_equal(skipped, read)
    logits, cache = prefill(model, prompts, capacity=20)
    _, cache2 = prefill(model, prompts, capacity=20)
    tokens = np.argmax(np.asarray(logits), axis=-1)
    for step in range(4):
        a, cache = decode_step(model, cache, tokens, skip=True, seed=step)
        b, cache2 = decode_step(model, cache2, tokens, skip=False, seed=step)
        np.testing.assert_array_equal(a, b)
        tokens = np.argmax(np.asarray(a), axis=-1)


def test_prefill_on_the_kernels_equals_the_reference(tmp_path, rng):
    """The prefill on the Pallas kernels (interpret mode on the CPU), where routed queries are
    projected and attended as compacted rows (a quarter of the prompt long in the sparse
    layer, all of it in the dense one), against the jnp reference: next-token logits, every
    cache, and the greedy continuation. The model has an output-projection bias, which every
    token gets from the global branch, routed or not."""
    hf = build_hf_model("qwen3_bias_yarn_factor")
    base = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    cfg = L2AConfig(window=5, mode="random", random_densities=(0.1, 0.7))
    ref = convert_to_l2a(base, cfg)
    kernels = convert_to_l2a(base, cfg, attention_impl="pallas")
    prompts = [list(rng.integers(0, 101, n)) for n in (40, 29)]
    (want, want_cache), (got, got_cache) = (
        prefill(m, prompts, capacity=48, seed=2) for m in (ref, kernels)
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(
        generate(kernels, prompts, max_new_tokens=6, seed=2),
        generate(ref, prompts, max_new_tokens=6, seed=2),
    )


@pytest.mark.parametrize("densities, overflows", [((0.1, 0.1), False), ((0.1, 0.7), True)])
def test_prefill_fixes_its_rows_and_runs_again_when_a_layer_overflows(
    densities, overflows, tmp_path, rng
):
    """On the kernels a prefill first compacts each layer's routed queries into rows for a
    quarter of the prompt width, with no run-time choice of size. Where a layer routed more
    (here ~70% of 40 tokens against 10 rows) that first result is wrong, so the prefill runs
    again choosing per layer, and later calls through the same serving model start there;
    logits equal the jnp reference either way."""
    from l2a_jax.generate import _prefill_jit, _prompts, serving_model

    hf = build_hf_model("qwen3_bias_yarn_factor")
    base = from_hf(save_hf_model(hf, tmp_path / "hf"), dtype=jnp.float32)
    cfg = L2AConfig(window=5, mode="random", random_densities=densities)
    ref = convert_to_l2a(base, cfg)
    served = serving_model(convert_to_l2a(base, cfg, attention_impl="pallas"))
    prompts = [list(rng.integers(0, 101, n)) for n in (40, 33)]
    want, _ = prefill(ref, prompts, capacity=40, seed=2)
    got, _ = prefill(served, prompts, capacity=40, seed=2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert bool(served.overflowed) == overflows
    ids, lengths = _prompts(served, prompts, None)
    first, _, _, overflow = _prefill_jit(
        served.graph, served.weights, ids, lengths, np.int32(2), capacity=40,
        fixed_rows=True,
    )  # fmt: skip
    assert bool(overflow) == overflows
    assert np.allclose(first, want, atol=1e-4, rtol=0) != overflows


def test_cache_shapes_and_sizes(tmp_path, rng):
    model = l2a_model(tmp_path, "static", window=4, static_global_layers=(0,))
    cfg = model.cfg
    assert cache_layout(model, 30) == [{"window": 4, "global": 30}, {"window": 4}]
    _, cache = prefill(model, rng.integers(0, 101, (3, 10)), capacity=30)
    size = cache_size(model, 30)
    slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, float32
    assert size.per_token == slot and size.fixed == 2 * 4 * slot
    assert cache.nbytes == 3 * size.total
    base = from_hf(tmp_path / "hf", dtype=jnp.bfloat16)
    assert cache_size(base, 1000).total == 1000 * 2 * 2 * cfg.num_kv_heads * cfg.head_dim * 2


def test_sampling(rng):
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
    greedy = np.argmax(np.asarray(logits), axis=-1)
    key = jax.random.key(0)
    np.testing.assert_array_equal(Sampling()(logits, key), greedy)
    np.testing.assert_array_equal(Sampling(1.0, top_k=1)(logits, key), greedy)
    np.testing.assert_array_equal(Sampling(1.0, top_p=1e-6)(logits, key), greedy)
    draws = np.stack([Sampling(2.0, top_k=3)(logits, jax.random.key(i)) for i in range(200)])
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(set(draws[:, r]) <= set(top3[r]) for r in range(4))
    assert all(len(set(draws[:, r])) > 1 for r in range(4))
    # top_p keeps the smallest set of most likely tokens reaching p
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    draws = np.stack([Sampling(1.0, top_p=0.5)(logits, jax.random.key(i)) for i in range(200)])
    for r in range(4):
        order = np.argsort(-probs[r])
        needed = int(np.searchsorted(np.cumsum(probs[r][order]), 0.5) + 1)
        assert set(draws[:, r]) <= set(order[:needed])


def test_sampled_generation_is_seeded(tmp_path, rng):
    model = from_hf(save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path / "hf"))
    prompts = rng.integers(0, 101, (2, 5))
    a = generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=1)
    b = generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=1)
    c = generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_requests_get_one_clear_error(tmp_path):
    model = from_hf(save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path / "hf"))
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1, 2, 500]], max_new_tokens=2)
    with pytest.raises(ValueError, match="context of 128"):
        generate(model, [[1] * 120], max_new_tokens=9)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            generate(model, [[1, 2]], max_new_tokens=bad)
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        generate(model, [[1, 2, 3]], prompt_lengths=[4], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        generate(model, np.zeros((2, 0), np.int32), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    for bad in (2**40, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer"):
            generate(model, [[1, 2]], max_new_tokens=2, seed=bad)
        with pytest.raises(ValueError, match="seed must be an integer"):
            prefill(model, [[1, 2]], seed=bad)
    assert nnx.state(model)  # the model is untouched and still usable
    assert generate(model, [[1, 2]], max_new_tokens=1).shape == (1, 1)


def test_command_line_from_a_checkpoint_and_a_workdir(tmp_path, capsys):
    """generate.py continues a prompt (text or file) from an HF-style directory and from a
    training workdir; missing sources get one clear error."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate as cli
    from l2a_jax import ModelConfig, QwenModel, to_hf

    cfg = ModelConfig("Qwen3ForCausalLM", 257, 32, 64, 2, 4, 2, 8, qk_norm=True)
    model = convert_to_l2a(QwenModel(cfg, rngs=nnx.Rngs(0)), L2AConfig(window=4))
    to_hf(model, tmp_path / "run" / "model")
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"train": {}, "data": {"tokenizer": "bytes"}})
    )
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):")
    want = generate(model, [list(b"def f(x):")], max_new_tokens=5, eos_token_id=256)
    want = bytes(t for t in np.asarray(want)[0].tolist() if t < 256)
    for argv in (
        ["--model", str(tmp_path / "run"), "--prompt", "def f(x):"],
        # no tokenizer files: a 257-token vocabulary is the byte tokenizer's
        ["--model", str(tmp_path / "run" / "model"), "--prompt-file", str(prompt)],
    ):
        cli.main([*argv, "--max-new-tokens", "5"])
        out, err = capsys.readouterr()
        assert out == want.decode("utf-8", errors="replace") + "\n"
        assert "prompt tokens" in err and "KV cache" in err
    for argv, match in (
        (["--model", str(tmp_path / "nowhere"), "--prompt", "x"], "does not exist"),
        (["--model", str(tmp_path / "run"), "--prompt-file", str(tmp_path / "no")], "no"),
    ):
        with pytest.raises(SystemExit, match=match):
            cli.main(argv)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"train": {}, "data": {}}))
    with pytest.raises(SystemExit, match="no exported model yet"):
        cli.main(["--model", str(tmp_path / "empty"), "--prompt", "x"])


def test_decoding_past_the_capacity_is_refused(tmp_path, rng):
    """Also for a model without global caches, whose ring buffers (window 16 > capacity 12)
    hold exactly the allocated positions and would silently drop older keys past them."""
    from l2a_jax.generate import decode

    model = l2a_model(tmp_path, "swa", window=16)
    prompts = rng.integers(0, 101, (2, 10))
    logits, cache = prefill(model, prompts, capacity=12)
    assert cache.capacity == 12
    tokens = np.argmax(np.asarray(logits), axis=-1)
    for _ in range(2):
        logits, cache = decode_step(model, cache, tokens)
    with pytest.raises(ValueError, match="holds 12 positions, too few for 1 more"):
        decode_step(model, cache, tokens)
    _, cache = prefill(model, prompts, capacity=12)
    new, _ = decode(model, cache, tokens, max_new_tokens=3)  # feeds 2: positions 10 and 11
    assert new.shape == (2, 3)
    _, cache = prefill(model, prompts, capacity=12)
    with pytest.raises(ValueError, match="too few for 3 more"):
        decode(model, cache, tokens, max_new_tokens=4)


def test_prefill_and_generate_route_one_seed_alike(tmp_path, rng):
    """Random routes are drawn from ``seed`` inside the prefill program: ``prefill`` and
    ``generate`` with one seed route the prompts alike (the greedy first tokens agree with the
    prefill's logits), and another seed routes them otherwise."""
    from l2a_jax.generate import serving_model

    model = serving_model(l2a_model(tmp_path, "random", window=3, random_densities=(0.5, 0.5)))
    prompts = [list(rng.integers(0, 101, n)) for n in (9, 5, 7)]
    logits = {s: np.asarray(prefill(model, prompts, seed=s)[0]) for s in (1, 2)}
    assert not np.allclose(logits[1], logits[2])
    for s in (1, 2):
        first = generate(model, prompts, max_new_tokens=1, seed=s)[:, 0]
        np.testing.assert_array_equal(first, np.argmax(logits[s], axis=-1))


def test_a_serving_model_generates_what_the_module_does(tmp_path, rng):
    """``serving_model`` (weights taken out and layers stacked once) gives the same tokens,
    logits and caches as calls with the module, keeps the weights it was made with, and calls
    with the module reuse one compiled program (their layout is equal from call to call)."""
    from l2a_jax.generate import _prefill_jit, serving_model

    model = l2a_model(tmp_path, "random", window=3, random_densities=(0.5, 0.5))
    served = serving_model(model)
    prompts = [list(rng.integers(0, 101, n)) for n in (9, 5, 7)]
    want = generate(model, prompts, max_new_tokens=8, seed=3)
    np.testing.assert_array_equal(generate(served, prompts, max_new_tokens=8, seed=3), want)
    logits, cache = prefill(model, prompts, capacity=16)
    got_logits, got_cache = prefill(served, prompts, capacity=16)
    np.testing.assert_array_equal(got_logits, logits)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(a, b)
    compiled = _prefill_jit._cache_size()
    prefill(model, prompts, capacity=16)
    prefill(served, prompts, capacity=16)
    assert _prefill_jit._cache_size() == compiled
    # a serving model is a snapshot: changing the module afterwards changes the module's output
    for layer in model.layers:
        layer.attn.wo[...] = jnp.zeros_like(layer.attn.wo[...])
    np.testing.assert_array_equal(prefill(served, prompts, capacity=16)[0], logits)
    assert not np.array_equal(prefill(model, prompts, capacity=16)[0], logits)
