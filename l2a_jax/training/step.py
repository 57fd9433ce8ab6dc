"""One training step as a pure function of its inputs, and its jitted, sharded form.

As released for L2A: attention (both branches), every norm and the routers train; MLPs,
embeddings and the LM head stay frozen. The frozen weights are an argument of the step, never
a constant baked into the compiled program, and the ``TrainState`` (step, trainable parameters,
optimizer state, rng) is the one pytree a checkpoint saves. A step's dense-global coin and its
random-route key are drawn inside the step from its own key, so one compiled program serves
every step.

The state keeps each run of same-structure layers stacked (``layer_scan.stack_states``): the
step feeds those stacks to the layers' ``lax.scan`` and updates them as they are, so neither
the traced program nor the optimizer's grows with the number of layers. ``trained_model``
turns a state back into an ordinary per-layer model (for evaluation and HF export).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from l2a_jax.batch import Batch
from l2a_jax.config import ConfigError, resolve_dtype
from l2a_jax.layer_scan import StackedGraph, stacked_graph
from l2a_jax.model import REMAT_POLICIES, QwenModel
from l2a_jax.routing import RouterStats, Routing
from l2a_jax.sharding import batch_sharding, data_parallel_size, param_shardings
from l2a_jax.training.loss import RAMPS, chunked_next_token_loss, sparsity_loss, sparsity_weight

TRAINABLE = (
    "attn",
    "global_attn",
    "router",
    "input_norm",
    "post_norm",
    "global_norm",
    "final_norm",
)
TRAINABLE_PARAMS = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in TRAINABLE)))
# ``recipe``: the L2A recipe above; ``all``: every parameter (a model trained from scratch)
TRAINABLE_SETS = {"recipe": TRAINABLE_PARAMS, "all": nnx.Param}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warm-up then cosine decay, global-norm clipping, the sparsity weight
    schedule (zero through ``sparsity_warmup_steps``, then ramped to ``sparsity_weight`` at
    ``total_steps``), and ``dense_step_prob``: the probability that a step runs the global
    branch over every token. ``loss_chunk``: sequence positions whose logits the loss computes
    at once (see ``chunked_next_token_loss``). ``trainable``: ``recipe`` (attention, norms
    and routers; MLPs and embeddings frozen) or ``all``.

    ``route_all_steps``: for the first steps every token is routed (the routers still learn
    through the straight-through gradient), so the global branches of a model trained from
    scratch become useful before the routers decide; 0 for a converted model, whose
    zero-initialised routers route every token anyway. ``route_all_decay_steps``: after those,
    each token is still routed at random with a probability that falls linearly from 1 to 0
    over this many steps, on top of the router's choice, so the model gives up global
    attention for the tokens the routers drop gradually instead of all at once. ``remat``:
    what each layer's backward recomputes (``model.REMAT_POLICIES``). ``grad_accum_steps``: a
    batch is split into that many micro-batches whose gradients are averaged before one
    optimizer update.
    ``master_dtype``: the dtype trainable parameters and the optimizer state are kept in
    (None: the model's); ``compute_dtype``: the dtype they are cast to for the forward and
    backward (None: as kept), e.g. float32 master weights with bfloat16 compute."""

    learning_rate: float = 5e-5
    warmup_steps: int = 209
    total_steps: int = 3973
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    sparsity_weight: float = 1e-8
    sparsity_warmup_steps: int = 209
    sparsity_ramp: str = "linear"
    dense_step_prob: float = 0.1
    loss_chunk: int = 4096
    trainable: str = "recipe"
    route_all_steps: int = 0
    route_all_decay_steps: int = 0
    remat: str = "none"
    grad_accum_steps: int = 1
    master_dtype: str | None = None
    compute_dtype: str | None = None

    def __post_init__(self):
        if self.total_steps <= max(self.warmup_steps, self.sparsity_warmup_steps):
            raise ConfigError(
                f"total_steps ({self.total_steps}) must exceed warmup_steps "
                f"({self.warmup_steps}) and sparsity_warmup_steps ({self.sparsity_warmup_steps})"
            )
        if self.sparsity_ramp not in RAMPS:
            raise ConfigError(
                f"sparsity_ramp {self.sparsity_ramp!r} is unknown; use one of {RAMPS}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.dense_step_prob <= 1:
            raise ConfigError(f"dense_step_prob must be in [0, 1], got {self.dense_step_prob}")
        if self.trainable not in TRAINABLE_SETS:
            raise ConfigError(
                f"trainable {self.trainable!r} is unknown; use one of {tuple(TRAINABLE_SETS)}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"remat {self.remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}"
            )
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        for name in ("master_dtype", "compute_dtype"):
            if getattr(self, name) is not None:
                try:
                    resolve_dtype(getattr(self, name))
                except ConfigError as e:
                    raise ConfigError(f"{name}: {e}") from e
        for name in ("route_all_steps", "route_all_decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_chunk < 1:
            raise ConfigError(f"loss_chunk must be >= 1 (positions), got {self.loss_chunk}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a run needs to continue: what a checkpoint saves."""

    step: jax.Array
    params: dict  # the trainable parameters, layers stacked (``layer_scan.StackedGraph``)
    opt_state: Any
    rng: jax.Array  # raw key data (uint32), which every checkpoint format stores


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW on a warm-up + cosine schedule. The parameters it
    updates are stacked per group of layers, so its compiled update holds one chain of
    operations per kind of weight, whatever the depth."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.total_steps
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def init_state(model: QwenModel, cfg: TrainConfig, *, seed: int = 0):
    """(graph, state, frozen): the model's structure (a ``StackedGraph``), its initial
    ``TrainState`` and the frozen weights, which every step takes as an argument; weights in
    the stacked form (``StackedGraph``). The state holds copies of the trainable parameters (a
    step donates its state), so ``model`` stays usable."""
    graphdef, params, frozen = nnx.split(model, TRAINABLE_SETS[cfg.trainable], ...)
    graph = stacked_graph(model, graphdef)
    params, frozen = graph.split(params), graph.split(frozen)
    master = None if cfg.master_dtype is None else resolve_dtype(cfg.master_dtype)
    # a fresh buffer in every case: ``astype`` to the dtype an array already has returns the
    # array itself, which the first (donating) step would then take from the model
    params = jax.tree.map(
        lambda x: x.astype(master) if master not in (None, x.dtype) else jnp.copy(x), params
    )
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        make_optimizer(cfg).init(params),
        jax.random.key_data(jax.random.key(seed)),
    )
    return graph, state, frozen


def route_all_probability(step: jax.Array, cfg: TrainConfig) -> jax.Array | float:
    """The probability that a token is routed whatever its router says at ``step``: 1 up to
    ``route_all_steps``, then falling linearly to 0 over ``route_all_decay_steps``."""
    if cfg.route_all_decay_steps == 0:
        return 0.0
    left = cfg.route_all_steps + cfg.route_all_decay_steps - step.astype(jnp.float32)
    return jnp.clip(left / cfg.route_all_decay_steps, 0.0, 1.0)


def train_step(
    graph: StackedGraph, cfg: TrainConfig, state: TrainState, frozen: dict, batch: Batch
) -> tuple[TrainState, dict]:
    """One optimizer step; pure. Metrics: ``loss``, ``cross_entropy``, ``sparsity_loss``,
    ``sparsity_weight``, ``dense_step``, ``grad_norm``, ``routed_fraction`` (mean over L2A
    layers) and ``router`` (``RouterStats`` per L2A layer; absent without L2A layers)."""
    rng, coin_key, route_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
    dense = jax.random.bernoulli(coin_key, cfg.dense_step_prob)
    routing = Routing(
        train=True,
        dense=dense,
        route_all=state.step < cfg.route_all_steps,
        route_prob=route_all_probability(state.step, cfg),
        rng=route_key,
    )
    lam = sparsity_weight(
        state.step,
        weight=cfg.sparsity_weight,
        warmup_steps=cfg.sparsity_warmup_steps,
        total_steps=cfg.total_steps,
        ramp=cfg.sparsity_ramp,
    )

    compute = None if cfg.compute_dtype is None else resolve_dtype(cfg.compute_dtype)

    def loss_fn(params, micro: Batch, routing: Routing):
        if compute is not None:
            params = jax.tree.map(lambda x: x.astype(compute), params)
        model = graph.shell_model(params, frozen)
        hidden, stats = model.hidden_with_stats(
            micro.input_ids,
            micro.positions,
            micro.segment_ids,
            routing=routing,
            remat=cfg.remat,
            groups=graph.layer_groups(params, frozen),
        )
        with jax.named_scope("head_and_loss"):
            ce = chunked_next_token_loss(
                hidden, model.output_head(), micro.input_ids, micro.loss_mask, chunk=cfg.loss_chunk
            )
        reg = sparsity_loss(stats)
        return ce + lam * reg, (ce, reg, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.grad_accum_steps == 1:
        (loss, (ce, reg, stats)), grads = grad_fn(state.params, batch, routing)
    else:
        (loss, (ce, reg, stats)), grads = _accumulate(grad_fn, state.params, batch, routing, cfg)
    with jax.named_scope("optimizer"):
        updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        "cross_entropy": ce,
        "sparsity_loss": reg,
        "sparsity_weight": lam,
        "dense_step": dense,
        "grad_norm": optax.tree.norm(grads),
    }
    if stats is not None:
        metrics["routed_fraction"] = jnp.mean(stats.routed_fraction)
        metrics["router"] = stats
    with jax.named_scope("optimizer"):
        params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng)), metrics


def _accumulate(grad_fn, params, batch: Batch, routing: Routing, cfg: TrainConfig):
    """``grad_fn`` over ``cfg.grad_accum_steps`` equal micro-batches in a scan: values,
    gradients and router statistics averaged, so the step equals one over the whole batch
    (exactly when every micro-batch has as many scored tokens). Each micro-batch draws its
    random routes from its own key."""
    k = cfg.grad_accum_steps
    if batch.shape[0] % k:
        raise ValueError(f"batch size {batch.shape[0]} does not split into {k} micro-batches")
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def one(total, inputs):
        index, part = inputs
        rng = None if routing.rng is None else jax.random.fold_in(routing.rng, index)
        out = grad_fn(params, part, dataclasses.replace(routing, rng=rng))
        return jax.tree.map(lambda t, o: t + o.astype(t.dtype) / k, total, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda p, m: grad_fn(p, m, routing), params, first)
    # sums in at least float32, whatever the parameters' dtype
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes
    )
    (value, grads), _ = jax.lax.scan(one, zeros, (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return value, grads


def jit_train_step(
    graph: StackedGraph, cfg: TrainConfig, state: TrainState, frozen: dict
) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """``train_step`` jitted for the model's mesh (the one it was built or loaded on): state and
    frozen weights placed by their logical axes, the batch split over the data axes, metrics
    replicated, and the incoming state donated (its buffers hold the next state; do not read
    it after the call).

    ``state`` and ``frozen`` (concrete or abstract) give the shapes the shardings are derived
    from. Without a mesh the step runs where its inputs are, donated all the same."""
    step = jax.tree_util.Partial(train_step, graph, cfg)
    backend = graph.shell_model(state.params, frozen).attention
    mesh, rules = backend.mesh, backend.rules
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_sharding = param_shardings(state, mesh, rules)
    tokens = batch_sharding(mesh, rules)
    batch_parts = data_parallel_size(mesh, rules)
    frozen_sharding = param_shardings(frozen, mesh, rules)
    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, frozen_sharding, tokens),
        out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )

    def place(state, frozen, batch: Batch):
        # placed as the step's outputs are, so the first call compiles the program every later
        # call reuses (nothing moves for arrays already there)
        return (
            _place(state, state_sharding),
            _place(frozen, frozen_sharding),
            _place(batch, tokens),
        )

    def sharded_step(state, frozen, batch: Batch):
        if batch.shape[0] % batch_parts:
            raise ValueError(
                f"batch size {batch.shape[0]} does not split over the mesh's {batch_parts} "
                f"data-parallel devices ({dict(mesh.shape)}); use a multiple of {batch_parts}"
            )
        return jitted(*place(state, frozen, batch))

    def lower(state, frozen, batch: Batch):
        return jitted.lower(*place(state, frozen, batch))

    # as on a jitted function: the compiled programs, and lowering without running; ``place``
    # lays arguments out for a program compiled ahead of time (``lower(...).compile()``)
    sharded_step._cache_size = jitted._cache_size
    sharded_step.lower = lower
    sharded_step.place = place
    return sharded_step


def _place(tree, shardings):
    """Each array of ``tree`` on its sharding (``shardings`` is a prefix of ``tree``). An array
    already laid out so stays where it is; any other (a counter or key made on one device, a host
    value) is a value every process holds whole, laid out from the host, so this also works
    when the shardings span several processes."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            # the same layout; the step's own sharding object, so later calls (which get the
            # step's outputs) hit the same compiled program
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: one(x, sh), sub), shardings, tree)


def trained_model(graph: StackedGraph, state: TrainState, frozen: dict) -> QwenModel:
    """The model with the state's trainable parameters, its layers per layer again."""
    return graph.full_model(state.params, frozen)


def flat_metrics(metrics: dict, layers: tuple[int, ...]) -> dict[str, float]:
    """Metrics as name -> float for logs: per-layer router statistics become
    ``layer{i}/routed_fraction``, ``layer{i}/logit_std``, ..."""
    out = {k: float(v) for k, v in metrics.items() if k != "router"}
    router: RouterStats | None = metrics.get("router")
    if router is not None:
        for field in dataclasses.fields(router):
            if field.name == "sigma_sq_sum":
                continue
            values = np.asarray(getattr(router, field.name))
            for index, value in zip(layers, values, strict=True):
                out[f"layer{index}/{field.name}"] = float(value)
    return out
