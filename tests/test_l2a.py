"""The L2A layer: construction, routing modes, straight-through gradients, kernels, training,
saving and loading."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import build_hf_model, save_hf_model

from l2a_jax import Batch, ConfigError, L2AConfig, Routing, convert_to_l2a, from_hf, to_hf
from l2a_jax.attention import AttentionBackend, SequenceAttention
from l2a_jax.model import ROUTED_ROWS_FRACTION, L2ADecoderLayer
from l2a_jax.rope import rope_cos_sin
from l2a_jax.training import (
    TrainConfig,
    flat_metrics,
    init_state,
    jit_train_step,
    sparsity_loss,
    trained_model,
)

SEQ = 40


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    """Tiny random HF Qwen3 and Qwen2 checkpoints, loaded (head_dim 16 and 8 fit the kernels'
    power-of-two constraint for Qwen3; Qwen2's 16)."""
    out = {}
    for name in ("qwen3_bias_yarn_factor", "qwen2_linear_gqa2"):
        path = save_hf_model(build_hf_model(name), tmp_path_factory.mktemp(name))
        out[name] = from_hf(path, attention_impl="xla")
    return out


@pytest.fixture
def qwen3(base_models):
    return base_models["qwen3_bias_yarn_factor"]


XLA = AttentionBackend("xla", head_dim=16)


def tokens(rng, batch=2, seq=SEQ):
    return jnp.asarray(rng.integers(0, 101, (batch, seq)))


def l2a_layers(model):
    return [layer for layer in model.layers if isinstance(layer, L2ADecoderLayer)]


def layer_inputs(model, rng, seq=SEQ):
    cfg = model.cfg
    x = jnp.asarray(rng.standard_normal((2, seq, cfg.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions)
    return x, cos, sin


def test_zero_router_routes_every_token_and_branches_start_from_base(qwen3, rng):
    model = convert_to_l2a(qwen3, L2AConfig(window=8))
    assert model.l2a_layers == (0, 1)
    for base, layer in zip(qwen3.layers, model.layers, strict=True):
        assert not np.asarray(layer.router[...]).any()
        np.testing.assert_array_equal(layer.global_attn.wq[...], base.attn.wq[...])
        np.testing.assert_array_equal(layer.attn.wo[...], base.attn.wo[...])
        np.testing.assert_array_equal(layer.global_attn.bo[...], base.attn.bo[...])
        np.testing.assert_array_equal(layer.global_norm.weight[...], base.input_norm.weight[...])
    _, stats = model.forward_with_stats(tokens(rng))
    assert stats.routed_fraction.tolist() == [1.0, 1.0]
    # sigma = 0.5 everywhere: the regulariser is 0.25 per token
    np.testing.assert_allclose(sparsity_loss(stats), 0.25 * SEQ, rtol=1e-6)


@pytest.mark.parametrize("name", ["qwen3_bias_yarn_factor", "qwen2_linear_gqa2"])
def test_router_forced_to_skip_equals_swa_only_path(base_models, name, rng):
    base = base_models[name]
    # sigma = 0.5 < threshold 0.9 for every token: the learned router skips them all
    skip_all = convert_to_l2a(base, L2AConfig(window=8, threshold=0.9))
    swa = convert_to_l2a(base, L2AConfig(window=8, mode="swa"))
    ids = tokens(rng)
    logits, stats = skip_all.forward_with_stats(ids)
    assert stats.routed_fraction.tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(logits, swa(ids))
    # and the SWA-only layer is exactly: window branch, (o_proj bias), MLP
    layer = l2a_layers(swa)[0]
    x, cos, sin = layer_inputs(swa, rng)
    q, k, v = layer.attn.project_qkv(layer.input_norm(x), cos, sin)
    from pallas_kernels import sliding_window_attention_reference

    h = x + layer.attn.project_out(sliding_window_attention_reference(q, k, v, window=8))
    if base.cfg.o_bias:
        h = h + layer.global_attn.bo[...]
    want = h + layer.mlp(layer.post_norm(h))
    got, _ = layer(x, cos, sin, SequenceAttention(XLA), routing=Routing())
    np.testing.assert_array_equal(got, want)


def test_full_window_and_all_routed_equals_hand_computed_layer(qwen3, rng):
    """window >= T: the window branch is full causal attention; every token routed."""
    model = convert_to_l2a(qwen3, L2AConfig(window=SEQ + 5))
    layer = l2a_layers(model)[0]
    x, cos, sin = layer_inputs(model, rng)

    def rms(v, w, eps=qwen3.cfg.rms_norm_eps):
        return w * v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)

    def attention(branch, inp):  # by hand: projections, q/k norm, rope, causal softmax
        def proj(w, b):
            return jnp.einsum("btd,dhk->bthk", inp, w[...]) + b[...]

        q = rms(proj(branch.wq, branch.bq), branch.q_norm.weight[...])
        k = rms(proj(branch.wk, branch.bk), branch.k_norm.weight[...])
        v = proj(branch.wv, branch.bv)

        def rope(t):
            half = t.shape[-1] // 2
            rot = jnp.concatenate([-t[..., half:], t[..., :half]], axis=-1)
            return t * cos[:, :, None] + rot * sin[:, :, None]

        q, k = rope(q), rope(k)
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
        causal = np.tril(np.ones((SEQ, SEQ), bool))
        p = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        heads = jnp.einsum("bhij,bjhd->bihd", p, v)
        return jnp.einsum("bthk,hkd->btd", heads, branch.wo[...]) + branch.bo[...]

    h = x + attention(layer.attn, rms(x, layer.input_norm.weight[...]))
    h = h + attention(layer.global_attn, rms(h, layer.global_norm.weight[...]))
    mlp = layer.mlp
    hn = rms(h, layer.post_norm.weight[...])
    want = h + (jax.nn.silu(hn @ mlp.w_gate[...]) * (hn @ mlp.w_up[...])) @ mlp.w_down[...]
    got, stats = layer(x, cos, sin, SequenceAttention(XLA), routing=Routing())
    assert float(stats.routed_fraction) == 1.0
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def random_router(model, rng, scale=3.0):
    """The model with random router weights: roughly half the tokens routed."""
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "router":
            var = var.replace(jnp.asarray(scale * rng.standard_normal(var.shape), var.dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def layer_loss_fn(layer, x, cos, sin, weights, routing, token_mask=None):
    """Loss of one L2A layer as a function of its router weights."""
    graphdef, state = nnx.split(layer)

    def loss(router):
        state["router"] = state["router"].replace(router)
        y, _ = nnx.merge(graphdef, state)(x, cos, sin, SequenceAttention(XLA), routing=routing)
        mask = 1.0 if token_mask is None else token_mask[..., None]
        return jnp.sum(y * weights * mask)

    return loss


def test_straight_through_gradient_matches_finite_difference_of_soft_surrogate(qwen3, rng):
    model = random_router(convert_to_l2a(qwen3, L2AConfig(window=8)), rng)
    layer = l2a_layers(model)[0]
    x, cos, sin = layer_inputs(model, rng)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    w0 = layer.router[...]
    ste = jax.grad(layer_loss_fn(layer, x, cos, sin, weights, Routing(train=True)))(w0)

    # the soft surrogate: the same layer with gate = d0 + sigma(w) - sigma(w0), d0 held fixed
    from pallas_kernels import causal_attention_reference

    h = x + layer.attn.project_out(_window_heads(layer, x, cos, sin))
    s = layer.global_norm(h)
    sigma0 = jax.nn.sigmoid(s @ w0 / layer.l2a.tau)
    d0 = (sigma0 >= 0.5).astype(jnp.float32)
    q, k, v = layer.global_attn.project_qkv(s, cos, sin)
    heads = causal_attention_reference(q, k, v) * d0[..., None, None]  # sparse: 0 if skipped

    assert 0.2 < float(d0.mean()) < 0.8
    # float64, by hand: a float32 central difference carries ~1e-3 rounding error here
    with jax.enable_x64(True):
        f64 = {
            name: jnp.asarray(np.asarray(a), jnp.float64)
            for name, a in dict(
                s=s,
                w0=w0,
                d0=d0,
                sigma0=sigma0,
                heads=heads,
                h=h,
                weights=weights,
                wo=layer.global_attn.wo[...],
                bo=layer.global_attn.bo[...],
                norm=layer.post_norm.weight[...],
                gate=layer.mlp.w_gate[...],
                up=layer.mlp.w_up[...],
                down=layer.mlp.w_down[...],
            ).items()
        }

        def surrogate(w):
            a = f64
            gate = a["d0"] + jax.nn.sigmoid(a["s"] @ w / layer.l2a.tau) - a["sigma0"]
            gated = gate[..., None, None] * a["heads"]
            out = a["h"] + jnp.einsum("bthk,hkd->btd", gated, a["wo"]) + a["bo"]
            eps = qwen3.cfg.rms_norm_eps
            normed = a["norm"] * out / jnp.sqrt(jnp.mean(out * out, -1, keepdims=True) + eps)
            mlp = (jax.nn.silu(normed @ a["gate"]) * (normed @ a["up"])) @ a["down"]
            return jnp.sum((out + mlp) * a["weights"])

        direction = jnp.asarray(rng.standard_normal(w0.shape), jnp.float64)
        step = 1e-5
        fd = (surrogate(f64["w0"] + step * direction) - surrogate(f64["w0"] - step * direction)) / (
            2 * step
        )
        np.testing.assert_allclose(float(jnp.dot(ste, direction)), float(fd), rtol=2e-4)
    assert float(jnp.abs(ste).max()) > 0


def _window_heads(layer, x, cos, sin):
    from pallas_kernels import sliding_window_attention_reference

    q, k, v = layer.attn.project_qkv(layer.input_norm(x), cos, sin)
    return sliding_window_attention_reference(q, k, v, window=layer.l2a.window)


def test_skipped_tokens_get_router_gradient_only_on_dense_steps(qwen3, rng):
    model = random_router(convert_to_l2a(qwen3, L2AConfig(window=8)), rng)
    layer = l2a_layers(model)[0]
    x, cos, sin = layer_inputs(model, rng)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, _, hard, _ = layer.decide(
        layer.global_norm(x + layer.attn.project_out(_window_heads(layer, x, cos, sin))), Routing()
    )
    skipped = (~hard).astype(jnp.float32)
    assert 0 < float(skipped.mean()) < 1
    w0 = layer.router[...]
    for dense, expect_nonzero in (
        (False, False),
        (True, True),
        (jnp.asarray(False), False),
        (jnp.asarray(True), True),
    ):
        routing = Routing(train=True, dense=dense)
        grad = jax.grad(layer_loss_fn(layer, x, cos, sin, weights, routing, skipped))(w0)
        assert bool(jnp.abs(grad).max() > 0) == expect_nonzero, dense
    # routed tokens get a gradient on sparse steps too
    grad = jax.grad(layer_loss_fn(layer, x, cos, sin, weights, Routing(train=True), 1 - skipped))(
        w0
    )
    assert float(jnp.abs(grad).max()) > 0


def test_routing_modes_share_one_forward(qwen3, rng):
    ids = tokens(rng, seq=64)
    cases = {
        L2AConfig(window=8, mode="full"): [1.0, 1.0],
        L2AConfig(window=8, mode="swa"): [0.0, 0.0],
        L2AConfig(window=8, mode="static", static_global_layers=(1,)): [0.0, 1.0],
        L2AConfig(window=8, layers=(1,)): [1.0],
    }
    for cfg, want in cases.items():
        _, stats = convert_to_l2a(qwen3, cfg).forward_with_stats(ids)
        assert stats.routed_fraction.tolist() == want, cfg
    rand = convert_to_l2a(qwen3, L2AConfig(window=8, mode="random", random_densities=(0.2, 0.7)))
    _, stats = rand.forward_with_stats(tokens(rng, 8, 64), routing=Routing(rng=jax.random.key(3)))
    np.testing.assert_allclose(stats.routed_fraction, [0.2, 0.7], atol=0.06)
    with pytest.raises(ValueError, match="needs an rng key"):
        rand(ids)
    # full routing and the static-global layer agree with the learned layer at init (all routed)
    learned = convert_to_l2a(qwen3, L2AConfig(window=8))(ids)
    full = convert_to_l2a(qwen3, L2AConfig(window=8, mode="full"))(ids)
    np.testing.assert_allclose(learned, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="static"), "needs l2a.static_global_layers"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(mode="random"), "needs l2a.random_densities"),
        (dict(mode="nope"), "mode 'nope' is unknown"),
        (dict(tau=0.0), "tau must be > 0"),
        (dict(threshold=1.0), "threshold must be in"),
        (dict(static_global_layers=(0,)), "only used with l2a.mode 'static'"),
    ],
)
def test_invalid_l2a_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        L2AConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=(0, 5)), r"must be distinct indices in \[0, 2\)"),
        (dict(layers=(0,), mode="static", static_global_layers=(1,)), "are not L2A layers"),
        (dict(mode="random", random_densities=(0.1,)), "needs one per L2A layer"),
    ],
)
def test_invalid_layer_choices_for_model(qwen3, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        convert_to_l2a(qwen3, L2AConfig(**kwargs))


@pytest.mark.parametrize("threshold, rows", [(0.5, "all"), (0.999, "quarter")])
def test_kernel_path_matches_reference_path(qwen3, rng, threshold, rows):
    """Pallas kernels (interpret mode on CPU, native on a GPU) against the jnp references:
    logits, and gradients of every trainable parameter on a sparse and on a dense step. In the
    forward the routed queries are projected and attended as compacted rows, a quarter of the
    sequence long when every row's routed count fits (``rows`` "quarter", here in every layer)
    and as long as the sequence otherwise ("all", here in at least one layer); train steps
    keep them in token order, so gradients are checked in the "all" case only."""
    cfg = L2AConfig(window=7, tau=2.0, threshold=threshold)
    ref_model = random_router(convert_to_l2a(qwen3, cfg), rng, scale=1.0)
    graphdef, state = nnx.split(ref_model)
    kernel_graph, _ = nnx.split(convert_to_l2a(qwen3, cfg, attention_impl="pallas"))
    kernel_model = nnx.merge(kernel_graph, state)
    seq = 37
    ids = tokens(rng, seq=seq)
    segment_ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 17], 2, axis=0))
    ref_logits, ref_stats = ref_model.forward_with_stats(ids, segment_ids=segment_ids)
    ker_logits, _ = kernel_model.forward_with_stats(ids, segment_ids=segment_ids)
    routed = np.asarray(ref_stats.routed_fraction) * 2 * seq  # routed tokens of both rows
    assert routed.min() > 0 and routed.max() < 2 * seq
    quarter = -(-seq // ROUTED_ROWS_FRACTION)
    if rows == "quarter":  # no row can hold more than both rows together
        assert routed.max() <= quarter, routed
    else:  # some row holds at least half of both rows' count
        assert routed.max() / 2 > quarter, routed
    np.testing.assert_allclose(ker_logits, ref_logits, atol=1e-4, rtol=0)
    if rows == "quarter":
        return  # train steps keep token order whatever the routed count: checked once below
    for dense in (False, True):

        def loss(model, dense=dense):
            logits = model(ids, segment_ids=segment_ids, routing=Routing(train=True, dense=dense))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        want = nnx.grad(loss)(ref_model)
        got = nnx.grad(loss)(kernel_model)
        for (path, w), (_, g) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
            np.testing.assert_allclose(g[...], w[...], atol=1e-4, rtol=0, err_msg=str(path))


def train(model, batch, *, sparsity, steps=14):
    cfg = TrainConfig(
        learning_rate=3e-3,
        warmup_steps=1,
        total_steps=40,
        sparsity_weight=sparsity,
        sparsity_warmup_steps=2,
    )
    graphdef, state, frozen = init_state(model, cfg)
    step = jit_train_step(graphdef, cfg, state, frozen)
    history = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        history.append(flat_metrics(metrics, model.l2a_layers))
    assert step._cache_size() == 1, "dense and sparse steps must share one program"
    return trained_model(graphdef, state, frozen), history


def routed_fractions(model, cfg: TrainConfig, batch: Batch, steps: int) -> list[float]:
    """The routed fraction of each of ``steps`` train steps on ``batch``, which must all run
    one compiled program."""
    graphdef, state, frozen = init_state(model, cfg)
    step = jit_train_step(graphdef, cfg, state, frozen)
    fractions = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        fractions.append(float(metrics["routed_fraction"]))
    assert step._cache_size() == 1
    return fractions


def test_route_all_steps_route_every_token_first(qwen3, rng):
    model = random_router(convert_to_l2a(qwen3, L2AConfig(window=8)), rng)  # about half routed
    cfg = TrainConfig(
        learning_rate=1e-4, warmup_steps=1, total_steps=10, sparsity_warmup_steps=1,
        dense_step_prob=0.0, route_all_steps=2,
    )  # fmt: skip
    fractions = routed_fractions(model, cfg, Batch.of(tokens(rng, 2, 32)), 3)
    assert fractions[:2] == [1.0, 1.0] and 0 < fractions[2] < 1


def test_route_all_hands_off_to_the_routers_gradually(qwen3, rng):
    model = random_router(convert_to_l2a(qwen3, L2AConfig(window=8)), rng)  # about half routed
    cfg = TrainConfig(
        learning_rate=1e-9, warmup_steps=1, total_steps=20, sparsity_warmup_steps=1,
        dense_step_prob=0.0, route_all_steps=2, route_all_decay_steps=4,
    )  # fmt: skip
    fractions = routed_fractions(model, cfg, Batch.of(tokens(rng, 8, 64)), 8)
    own = fractions[-1]  # the routers alone (the weights barely move at this learning rate)
    assert fractions[:3] == [1.0, 1.0, 1.0] and 0.2 < own < 0.8
    assert fractions[6] == own
    # at probability p a token the router skips is routed anyway: own + (1 - own) p
    for i, p in ((3, 0.75), (4, 0.5), (5, 0.25)):
        assert abs(fractions[i] - (own + (1 - own) * p)) < 0.06, (i, fractions)


def test_forced_routing_draws_its_tokens_from_the_rng():
    from l2a_jax.routing import route_tokens

    z = jnp.full((4, 256), -5.0)  # routers that route nothing
    kw = dict(mode="l2a", density=0.0, tau=1.0, threshold=0.5, layer_index=1)
    rng = jax.random.key(3)
    _, route, _ = route_tokens(z, routing=Routing(route_prob=0.3, rng=rng), **kw)
    _, again, _ = route_tokens(z, routing=Routing(route_prob=0.3, rng=rng), **kw)
    np.testing.assert_array_equal(route, again)
    assert abs(float(jnp.mean(route)) - 0.3) < 0.05
    _, none, _ = route_tokens(z, routing=Routing(route_prob=0.0, rng=rng), **kw)
    assert not bool(jnp.any(none))
    for off in (0, 0.0):  # nothing to draw: no rng needed, whatever the number's type
        _, none, _ = route_tokens(z, routing=Routing(route_prob=off), **kw)
        assert not bool(jnp.any(none))
    with pytest.raises(ValueError, match="rng"):
        route_tokens(z, routing=Routing(route_prob=0.3), **kw)


@pytest.mark.parametrize("name", ["qwen3_bias_yarn_factor", "qwen2_linear_gqa2"])
def test_tiny_l2a_model_trains_and_router_sparsifies(base_models, name, rng):
    model = convert_to_l2a(base_models[name], L2AConfig(window=8))
    batch = Batch.of(tokens(rng, 4, 48))
    trained, history = train(model, batch, sparsity=0.1)
    _, unregularised = train(model, batch, sparsity=0.0)
    assert history[0]["routed_fraction"] == 1.0
    assert history[-1]["cross_entropy"] < history[0]["cross_entropy"] - 0.5
    assert history[-1]["routed_fraction"] < 0.8
    assert history[-1]["routed_fraction"] < unregularised[-1]["routed_fraction"] - 0.1
    assert any(h["dense_step"] for h in history + unregularised)
    assert {"layer0/routed_fraction", "layer1/logit_std", "sparsity_loss"} <= set(history[-1])
    # frozen parts did not move, trainable parts did
    np.testing.assert_array_equal(trained.layers[0].mlp.w_up[...], model.layers[0].mlp.w_up[...])
    np.testing.assert_array_equal(trained.embed[...], model.embed[...])
    assert np.abs(np.asarray(trained.layers[0].router[...])).max() > 0


def test_l2a_model_saves_and_loads_as_an_hf_style_directory(qwen3, tmp_path, rng):
    import json

    model = random_router(convert_to_l2a(qwen3, L2AConfig(layers=(1,), window=8)), rng, scale=1.0)
    out = to_hf(model, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["L2AQwen3ForCausalLM"]
    assert config["l2a"]["window"] == 8
    # how attention runs is chosen where the model is loaded, never saved with the weights
    assert "attention_impl" not in config["l2a"] and "dense_step_prob" not in config["l2a"]
    loaded = from_hf(out, attention_impl="xla")
    assert loaded.l2a == model.l2a and loaded.l2a_layers == (1,)
    assert from_hf(out, attention_impl="pallas").attention_impl == "pallas"
    ids = tokens(rng)
    np.testing.assert_array_equal(loaded(ids), model(ids))
    # the saved parameters keep their logical sharding names
    router = nnx.to_flat_state(nnx.split(loaded)[1])
    assert dict(router)[("layers", 1, "router")].get_metadata()["axes"] == ("embed",)


def test_conversion_keeps_or_replaces_the_attention_implementation(qwen3):
    assert convert_to_l2a(qwen3, L2AConfig(window=8)).attention_impl == "xla"
    pallas = convert_to_l2a(qwen3, L2AConfig(window=8), attention_impl="pallas")
    assert pallas.attention_impl == "pallas"


def test_attention_implementation_is_logged(qwen3, caplog):
    with caplog.at_level("INFO", logger="l2a_jax.model"):
        convert_to_l2a(qwen3, L2AConfig(window=8), attention_impl="pallas")
    assert "attention impl pallas (runs as pallas)" in caplog.text
    assert "2 L2A, mode l2a, window 8" in caplog.text


def test_auto_attention_falls_back_to_reference_where_kernels_cannot_run():
    from l2a_jax.attention import resolve_impl

    on_gpu = jax.default_backend() == "gpu"
    assert resolve_impl("auto", 128) == ("pallas" if on_gpu else "xla")
    assert resolve_impl("auto", 24) == "xla"  # head dims the kernels do not support
    assert resolve_impl("pallas", 24) == "pallas"  # explicit: the kernel raises its own error
    with pytest.raises(ConfigError, match="attention impl 'cuda' is unknown"):
        resolve_impl("cuda", 128)


def test_layers_of_one_structure_run_in_one_scan(rng):
    """Compile time independent of depth: the traced program is the same size for 2 and 12
    layers, with one scan per run of consecutive layers of one structure."""
    from l2a_jax import ModelConfig, QwenModel

    def program(num_layers, l2a):
        cfg = ModelConfig("Qwen3ForCausalLM", 101, 32, 48, num_layers, 4, 2, 8, qk_norm=True)
        model = convert_to_l2a(QwenModel(cfg, attention_impl="xla", rngs=nnx.Rngs(0)), l2a)
        graphdef, params = nnx.split(model)
        ids = jnp.asarray(rng.integers(0, 101, (2, 16)))
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).forward_with_stats(ids))(params)
        return jaxpr.jaxpr

    def count(jaxpr, name=None):
        total = 0
        for eqn in jaxpr.eqns:
            total += name is None or eqn.primitive.name == name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(sub, name)
        return total

    every_layer = L2AConfig(window=4)
    assert count(program(2, every_layer)) == count(program(12, every_layer))
    assert count(program(12, every_layer), "scan") == 1
    # base layer 0, L2A layers 1-2, base layers 3-5: three scans (the lone layer in one of its
    # own), whose program does not grow with depth either
    mixed = program(6, L2AConfig(window=4, layers=(1, 2)))
    assert count(mixed, "scan") == 3
    assert count(mixed) == count(program(9, L2AConfig(window=4, layers=(1, 2))))
