"""Qwen2/Qwen2.5 and Qwen3 decoders in Flax NNX.

Every weight is an ``nnx.Param`` whose ``axes`` metadata names its logical axes; the sharding
module maps those names to mesh axes. Weights are stored in einsum layout (``embed`` first for
input projections), so no transpose happens at run time.

Two ways to run a model:
- stateful: ``logits = model(input_ids)``;
- functional: ``graphdef, params = split_model(model)`` then
  ``forward(graphdef, params, input_ids, ...)`` under ``jax.jit`` with explicit shardings.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from l2a_jax.attention import Attend, AttentionBackend, SequenceAttention, swiglu
from l2a_jax.batch import as_token_ids, check_per_token
from l2a_jax.config import L2AConfig, ModelConfig, resolve_dtype
from l2a_jax.layer_scan import run_layers
from l2a_jax.rope import apply_rope, rope_cos_sin
from l2a_jax.routing import RouterStats, Routing, route_tokens
from l2a_jax.sharding import ShardingRules

_INIT_STD = 0.02
# routed queries are compacted into rows for 1 / this of the sequence when they fit (the
# learned routers' usual ~20%), else into rows for all of it
ROUTED_ROWS_FRACTION = 4
# what a layer's backward keeps from its forward: everything (``none``), only its inputs
# (``full``: the layer is recomputed), or the matmul outputs (``dots``)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
logger = logging.getLogger(__name__)


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, scale: float | None = _INIT_STD, value=None):
    if value is None:
        if scale is None:
            value = jnp.ones(shape, dtype)
        else:
            value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight, computed in float32 as HF Qwen does."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, (dim,), ("norm",), dtype, scale=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, hq, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = _param(rngs, (d, hq, dh), ("embed", "q_heads", "head_dim"), dtype)
        self.wk = _param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv = _param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, (hq, dh, d), ("q_heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.bq = _param(rngs, (hq, dh), ("q_heads", "head_dim"), dtype)
            self.bk = _param(rngs, (hkv, dh), ("kv_heads", "head_dim"), dtype)
            self.bv = _param(rngs, (hkv, dh), ("kv_heads", "head_dim"), dtype)
        if cfg.o_bias:
            self.bo = _param(rngs, (d,), ("embed",), dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def project_qkv(self, x, cos, sin):
        """x (b, t, embed) -> rotated q (b, t, hq, dh), k and v (b, t, hkv, dh)."""
        return (self.project_q(x, cos, sin), *self.project_kv(x, cos, sin))

    def project_q(self, x, cos, sin):
        """x (b, t, embed) -> rotated q (b, t, hq, dh); cos/sin (b, t, dh) of x's positions."""
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        if self.cfg.qkv_bias:
            q = q + self.bq[...]
        if self.cfg.qk_norm:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def project_kv(self, x, cos, sin):
        """x (b, t, embed) -> rotated k and v (b, t, hkv, dh)."""
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        if self.cfg.qkv_bias:
            k, v = k + self.bk[...], v + self.bv[...]
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def project_out(self, heads: jax.Array, *, bias: bool = True) -> jax.Array:
        out = jnp.einsum("bthk,hkd->btd", heads, self.wo[...])
        if bias and self.cfg.o_bias:
            out = out + self.bo[...]
        return out


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array, attend: Attend | None = None) -> jax.Array:
        """``attend`` may run the gated half (``AttentionBackend.swiglu``: a fused kernel on
        Hopper where no gradient is taken); without one, or one that offers none, jnp."""
        gated = getattr(attend, "swiglu", None) or swiglu
        return gated(x, self.w_gate[...], self.w_up[...]) @ self.w_down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, attend: Attend) -> jax.Array:
        """``attend`` runs the attention itself: over whole sequences (``SequenceAttention``)
        or one new token against a cache (``generate.py``)."""
        with jax.named_scope("qkv_proj"):
            q, k, v = self.attn.project_qkv(self.input_norm(x), cos, sin)
        with jax.named_scope("attention"):
            heads = attend.full(q, k, v)
        with jax.named_scope("out_proj"):
            x = x + self.attn.project_out(heads)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.post_norm(x), attend)


class L2ADecoderLayer(nnx.Module):
    """Sliding-window attention for every token, global attention for routed tokens.

    ``mode`` is this layer's routing (``l2a``, ``full``, ``swa``, ``random`` with
    ``density``, or ``pruned``: the global branch removed, window attention alone);
    ``routing.py`` has the equations."""

    def __init__(
        self,
        cfg: ModelConfig,
        l2a: L2AConfig,
        index: int,
        mode: str,
        density: float,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.l2a = l2a
        self.index = index
        self.mode = mode
        self.density = density
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        if mode != "pruned":  # a pruned layer has no global branch at all
            self.global_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.router = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype), axes=("embed",))
            self.global_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def decide(self, s: jax.Array, routing: Routing, index=None, density=None):
        """Router logits z (b, t) f32, sigma, the hard route (bool) and the gate d (float).
        ``index`` and ``density`` (traced when layers run in a scan) default to the layer's."""
        z = jnp.einsum("btd,d->bt", s, self.router[...], preferred_element_type=jnp.float32)
        sigma, route, gate = route_tokens(
            z,
            mode=self.mode,
            density=self.density if density is None else density,
            tau=self.l2a.tau,
            threshold=self.l2a.threshold,
            routing=routing,
            layer_index=self.index if index is None else index,
        )
        return z, sigma, route, gate

    def __call__(
        self,
        x,
        cos,
        sin,
        attend: Attend,
        *,
        routing: Routing,
        index=None,
        density=None,
    ):
        with jax.named_scope("window_qkv_proj"):
            q, k, v = self.attn.project_qkv(self.input_norm(x), cos, sin)
        with jax.named_scope("window_attention"):
            heads = attend.local(q, k, v, self.l2a.window)
        with jax.named_scope("window_out_proj"):
            h = x + self.attn.project_out(heads)
        if self.mode == "pruned":
            with jax.named_scope("mlp"):
                y = h + self.mlp(self.post_norm(h), attend)
            none = jnp.zeros(h.shape[:2], jnp.float32)
            return y, RouterStats.of(none, none, none > 0, False, routing.counted)
        with jax.named_scope("router"):
            s = self.global_norm(h)
            z, sigma, route, gate = self.decide(s, routing, index, density)
        if self.mode != "swa":
            with jax.named_scope("global_qkv_proj"):
                k, v = self.global_attn.project_kv(s, cos, sin)
            args = (h, s, k, v, route, gate, cos, sin)

            def dense(*args):
                return self._global_branch(*args, attend=attend, dense=True)

            def sparse(*args):
                # compacted rows in forward-only passes (prefill, scoring): under autodiff
                # the run-time choice of row count keeps the residuals of both sizes, and a
                # train step measured no faster for it (bench/RESULTS.md)
                compact = not routing.train and getattr(attend, "compacts_routed", False)
                return self._global_branch(*args, attend=attend, dense=False, compact=compact)

            if self.mode == "full" or routing.dense is True:
                h = dense(*args)
            elif routing.dense is False:
                h = sparse(*args)
            else:  # a traced coin: both arms in one program, one of them runs
                h = jax.lax.cond(routing.dense, dense, sparse, *args)
        elif self.global_attn.cfg.o_bias:
            h = h + self.global_attn.bo[...]  # o_proj_global(0): its bias alone
        with jax.named_scope("mlp"):
            y = h + self.mlp(self.post_norm(h), attend)
        stats = RouterStats.of(z, sigma, route, self.mode == "l2a", routing.counted)
        return y, stats

    def _global_branch(
        self, h, s, k, v, route, gate, cos, sin, *, attend: Attend, dense: bool, compact=False
    ):
        """h plus the global branch's gated output: dense over every token, or for the routed
        tokens alone; with ``compact`` (where ``attend`` takes routed queries as compacted
        rows) only the routed tokens' queries and outputs are projected (``_routed_rows``)."""
        if compact:
            return self._routed_rows(h, s, k, v, route, gate, cos, sin, attend)
        with jax.named_scope("global_qkv_proj"):
            q = self.global_attn.project_q(s, cos, sin)
        with jax.named_scope("global_attention"):
            heads = attend.full(q, k, v) if dense else attend.routed(q, k, v, route)
        with jax.named_scope("global_out_proj"):
            gated = (gate[..., None, None] * heads.astype(jnp.float32)).astype(heads.dtype)
            return h + self.global_attn.project_out(gated)

    def _routed_rows(self, h, s, k, v, route, gate, cos, sin, attend: Attend):
        """The routed tokens' global attention with their queries and outputs projected as
        compacted rows. The rows are as many as the largest routed count needs among two
        static sizes, ``ROUTED_ROWS_FRACTION`` of the sequence and all of it, picked at run
        time, so the result is exact at any routed fraction, and a layer routing up to a
        quarter of its tokens projects queries and outputs for a quarter of the sequence.
        An ``attend`` with ``routed_rows_overflow`` (a prefill's) takes the small size alone
        and reports whether it was too small."""
        from pallas_kernels.attention import compact_routed  # kernels only reach here

        t = route.shape[1]
        small = max(1, -(-t // ROUTED_ROWS_FRACTION))
        attend_rows = attend.routed_rows(k, v)  # outside the cond: a prefill keeps k, v here

        def rows(n):
            qpos, slot = compact_routed(route, n)
            src = jnp.maximum(qpos, 0)
            pick = functools.partial(jnp.take_along_axis, indices=src[:, :, None], axis=1)
            with jax.named_scope("global_qkv_proj"):
                q = self.global_attn.project_q(pick(s), pick(cos), pick(sin))
            with jax.named_scope("global_attention"):
                heads = attend_rows(q, qpos)
            with jax.named_scope("global_out_proj"):
                g = jnp.where(qpos >= 0, jnp.take_along_axis(gate, src, axis=1), 0.0)
                gated = (g[..., None, None] * heads.astype(jnp.float32)).astype(heads.dtype)
                out = self.global_attn.project_out(gated, bias=False)
                # back to token order by a gather (slot: each routed token's row), which XLA
                # fuses with the residual add; a scatter-add would cost a pass of its own
                back = jnp.take_along_axis(out, jnp.maximum(slot, 0)[:, :, None], axis=1)
                back = jnp.where((slot >= 0)[:, :, None], back, jnp.zeros((), back.dtype))
                base = h + self.global_attn.bo[...] if self.global_attn.cfg.o_bias else h
                return base + back.astype(base.dtype)

        if small >= t:
            return rows(t)
        fits = jnp.max(jnp.sum(route, axis=1)) <= small
        overflow = getattr(attend, "routed_rows_overflow", None)
        if overflow is not None:  # no choice at run time: the caller checks ``fits``
            overflow(~fits)
            return rows(small)
        return jax.lax.cond(fits, lambda: rows(small), lambda: rows(t))


class QwenModel(nnx.Module):
    """Causal LM: ``model(input_ids, positions=None, segment_ids=None) -> logits (b, t, vocab)``.

    ``input_ids``: (b, t) integer token ids (a list or NumPy array is fine), checked against the
    vocabulary when concrete (see ``batch.py`` for what happens inside ``jit``). ``positions``
    default to 0..t-1 per row. ``segment_ids`` (b, t) int keeps packed documents apart: a token
    attends only to earlier tokens with the same id. With ``l2a``, the layers it names are
    ``L2ADecoderLayer``.

    How attention runs is fixed here, when the model is built (``from_hf`` and
    ``convert_to_l2a`` pass it on): ``attention_impl`` (``auto``, ``xla``, ``pallas``) and the
    ``mesh`` (with ``rules``) that the kernels are shard-mapped over. Neither is a property of
    the weights, and neither is saved with them.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype="float32",
        attention_impl: str = "auto",
        l2a: L2AConfig | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        rngs: nnx.Rngs,
    ):
        dtype = resolve_dtype(dtype)
        self.cfg = cfg
        self.l2a = l2a
        self.attention = AttentionBackend(
            attention_impl, cfg.head_dim, mesh, rules or ShardingRules()
        )
        self.attention.check_heads(cfg.num_heads, cfg.num_kv_heads)
        plan = l2a.layer_modes(cfg.num_layers) if l2a is not None else {}
        self.l2a_layers = tuple(sorted(plan))
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List(
            [
                L2ADecoderLayer(cfg, l2a, i, *plan[i], dtype=dtype, rngs=rngs)
                if i in plan
                else DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                for i in range(cfg.num_layers)
            ]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype
            )
        logger.info(
            "model %s: %d layers (%d L2A%s), attention impl %s (runs as %s)%s",
            cfg.architecture,
            cfg.num_layers,
            len(plan),
            f", mode {l2a.mode}, window {l2a.window}" if l2a is not None else "",
            attention_impl,
            self.attention.describe(),
            f", on mesh {dict(mesh.shape)}" if mesh is not None else "",
        )

    @property
    def attention_impl(self) -> str:
        return self.attention.impl

    @property
    def mesh(self) -> Mesh | None:
        return self.attention.mesh

    def output_head(self) -> jax.Array:
        """The (hidden, vocab) matrix that turns final hidden states into logits."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def forward_with_stats(
        self, input_ids, positions=None, segment_ids=None, *, routing: Routing | None = None
    ) -> tuple[jax.Array, RouterStats | None]:
        """Logits (b, t, vocab) float32, and the routing statistics of the L2A layers (a
        leading layer axis) or None for a model without L2A layers."""
        h, stats = self.hidden_with_stats(input_ids, positions, segment_ids, routing=routing)
        logits = jnp.einsum(
            "btd,dv->btv", h, self.output_head(), preferred_element_type=jnp.float32
        )
        return logits, stats

    def hidden_with_stats(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        *,
        routing: Routing | None = None,
        remat: str = "none",
        groups: list | None = None,
    ) -> tuple[jax.Array, RouterStats | None]:
        """The final-normed hidden states (b, t, hidden) that ``output_head()`` maps to logits, and
        the routing statistics: what a loss that never holds every logit at once starts from.
        ``remat`` (see ``REMAT_POLICIES``) trades the backward pass's memory for recomputation,
        layer by layer. ``groups``: the layers as ``layer_scan.LayerGroup``s whose weights are
        already stacked (training keeps them so); by default this model's own layers."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}")
        input_ids = as_token_ids(input_ids, self.cfg.vocab_size)
        b, t = input_ids.shape
        positions = check_per_token(positions, (b, t), "positions")
        segment_ids = check_per_token(segment_ids, (b, t), "segment_ids")
        limit = self.cfg.max_position_embeddings
        if t > limit and self.cfg.rope.rope_type != "dynamic":
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings {limit}; extend the "
                "model's context first (rope scaling and max_position_embeddings in its config)"
            )
        routing = routing or Routing()
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = self.rope(positions)
        with jax.named_scope("embed"):
            x = self.embed_tokens(input_ids)
        if self.mesh is not None:  # activations: split by batch, whole along the hidden size
            rules = self.attention.rules
            spec = rules.spec(("batch", "seq"), self.mesh, (b, t))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec, None)))

        attend = SequenceAttention(self.attention, segment_ids)
        x, stats, _ = self.run_decoder(
            x, cos, sin, lambda cache: attend, routing=routing, remat=remat, groups=groups
        )
        return self.final_norm(x), RouterStats.concat(stats)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """(b, t) ids -> (b, t, hidden); ids outside [0, vocab) read NaN rows (negative ids
        must not wrap around)."""
        safe_ids = jnp.where(input_ids < 0, self.cfg.vocab_size, input_ids)
        return jnp.take(self.embed[...], safe_ids, axis=0, mode="fill", fill_value=jnp.nan)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The rotary cos and sin tables (b, t, head_dim) of ``positions`` (b, t)."""
        return rope_cos_sin(
            self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings, positions
        )

    def run_decoder(
        self,
        x,
        cos,
        sin,
        attention,
        *,
        routing: Routing,
        remat: str = "none",
        caches: list | None = None,
        groups: list | None = None,
    ) -> tuple[jax.Array, list[RouterStats], list]:
        """The layers over ``x``. ``attention(cache) -> attend`` gives each layer the object
        that runs its attention calls (``SequenceAttention``, or a cache-reading one in
        ``generate.py``), with that layer's slice of ``caches`` (per group of layers, see
        ``layer_scan``); what the attend object holds in ``.cache`` afterwards is collected the
        same way; ``groups`` are the stacked layers if already built. Returns x, the stats per
        group, the new caches per group."""

        def run_layer(layer, x, index, density, cache):
            attend = attention(cache)
            if isinstance(layer, L2ADecoderLayer):
                x, stats = layer(x, cos, sin, attend, routing=routing, index=index, density=density)
            else:
                x, stats = layer(x, cos, sin, attend), None
            return x, stats, getattr(attend, "cache", None)

        return run_layers(
            self.layers,
            x,
            run_layer,
            remat=remat != "none",
            remat_policy=REMAT_POLICIES[remat],
            caches=caches,
            groups=groups,
        )

    def __call__(
        self, input_ids, positions=None, segment_ids=None, *, routing: Routing | None = None
    ) -> jax.Array:
        return self.forward_with_stats(input_ids, positions, segment_ids, routing=routing)[0]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """The static graph and the parameter pytree; ``forward`` puts them back together."""
    return nnx.split(model)


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids,
    positions=None,
    segment_ids=None,
    *,
    routing: Routing | None = None,
) -> jax.Array:
    """Logits as a pure function of the parameter pytree: safe to ``jax.jit`` with explicit
    shardings."""
    return forward_with_stats(graphdef, params, input_ids, positions, segment_ids, routing=routing)[
        0
    ]


def forward_with_stats(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids,
    positions=None,
    segment_ids=None,
    *,
    routing: Routing | None = None,
) -> tuple[jax.Array, RouterStats | None]:
    """Like ``forward``, with the routing statistics of the L2A layers."""
    model = nnx.merge(graphdef, params)
    return model.forward_with_stats(input_ids, positions, segment_ids, routing=routing)
