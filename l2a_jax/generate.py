"""Generation with KV caches: one batched prefill over the prompts, then one jitted decode step
per new token, looped on the device.

Prompts of different lengths travel right-padded in one (batch, T) array with
``prompt_lengths`` (or as a list of id lists, padded here). Row r then decodes at its own
positions L_r, L_r + 1, ...: what prefill caches for its padding sits at positions the row
overwrites before it ever reads them.

Caches, per layer, stacked per group of layers like the weights (``layer_scan``):

- the window branch of an L2A layer: a ring buffer of R = min(window, capacity) slots, position
  p in slot p % R. Which position a slot holds follows from the row's current position, so
  nothing else is stored;
- the global branch of an L2A layer, and a base layer's attention: one slot per position up to
  the capacity (longest prompt + new tokens);
- an L2A layer in ``swa`` mode (no token ever routed) or pruned (no global branch) keeps no
  global cache.

Decode-time skipping: a token that a layer's router does not route needs nothing from that
layer's global cache. Its K/V are still written (later tokens may attend to them), but the read
is skipped: on the GPU the decode kernel's programs for unrouted rows return at once, and the
jnp path skips the read when no row of the batch routes. The global branch's output for an
unrouted token is zero by definition, so skipping changes no result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2a_jax.attention import SequenceAttention
from l2a_jax.batch import as_token_ids, host_token_ids
from l2a_jax.config import ModelConfig
from l2a_jax.layer_scan import StackedGraph, stacked_graph
from l2a_jax.model import L2ADecoderLayer, QwenModel
from l2a_jax.routing import RouterStats, Routing
from pallas_kernels.reference import masked_attention

WINDOW, GLOBAL = "window", "global"
_OVERFLOW = "routed_rows_overflow"  # a prefill layer's report, taken out of its cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The caches of a batch of sequences: per group of layers a dict from branch (``window``,
    ``global``) to (k, v), each (layers, batch, slots, kv_heads, head_dim); ``lengths``
    (batch,) int32, the tokens cached per row (the next token's position); and ``capacity``,
    the positions the caches were allocated for (a ring buffer shorter than its window holds
    them all, and no more)."""

    groups: list
    lengths: jax.Array
    capacity: int = dataclasses.field(metadata=dict(static=True))

    def check_room(self, tokens: int) -> None:
        """Raises when feeding ``tokens`` more tokens to every row would pass the capacity."""
        need = int(np.max(jax.device_get(self.lengths), initial=0)) + tokens
        if need > self.capacity:
            raise ValueError(
                f"the cache holds {self.capacity} positions, too few for {tokens} more "
                f"token(s) after the longest row's {need - tokens}; prefill with a larger capacity"
            )

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.groups))


@dataclasses.dataclass(frozen=True)
class CacheSize:
    """KV-cache bytes of a model for one sequence of ``context`` tokens: ``per_token`` bytes
    grow with the context (global caches), ``fixed`` do not (window ring buffers)."""

    context: int
    per_token: int
    fixed: int
    per_layer: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.per_token * self.context + self.fixed


def cache_layout(model: QwenModel, capacity: int) -> list[dict[str, int]]:
    """Per layer, the slots each cached branch allocates for a capacity of ``capacity``
    positions: what prefill allocates, and what ``cache_size`` counts."""
    layout = []
    for layer in model.layers:
        if isinstance(layer, L2ADecoderLayer):
            slots = {WINDOW: min(layer.l2a.window, capacity)}
            if layer.mode not in ("swa", "pruned"):
                slots[GLOBAL] = capacity
        else:
            slots = {GLOBAL: capacity}
        layout.append(slots)
    return layout


def cache_size(model: QwenModel, context: int) -> CacheSize:
    """Bytes the KV caches of one sequence of ``context`` tokens take (k and v, every layer,
    in the model's dtype)."""
    cfg = model.cfg
    slot_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * model.embed[...].dtype.itemsize
    per_layer = [slot_bytes * sum(slots.values()) for slots in cache_layout(model, context)]
    per_token = slot_bytes * sum(GLOBAL in s for s in cache_layout(model, context))
    return CacheSize(context, per_token, sum(per_layer) - per_token * context, tuple(per_layer))


# ---------------------------------------------------------------------------------------------
# attention against caches


def _ring(x, lengths, slots):
    """The ring buffer (b, slots, h, d) of a prefilled x (b, t, h, d): slot s holds the last
    position p < length with p % slots == s (zeros where there is none)."""
    last = lengths[:, None] - 1
    pos = last - jnp.mod(last - jnp.arange(slots)[None, :], slots)
    taken = jnp.take_along_axis(x, jnp.maximum(pos, 0)[:, :, None, None], axis=1)
    return jnp.where((pos >= 0)[:, :, None, None], taken, jnp.zeros((), x.dtype))


def _ring_positions(pos, slots):
    """The position each ring slot holds when row r's newest token is at pos[r]: (b, slots)."""
    return pos[:, None] - jnp.mod(pos[:, None] - jnp.arange(slots)[None, :], slots)


class _PrefillAttend:
    """Runs a layer's attention over the prompts and keeps what it caches. With
    ``fixed_rows``, a layer that compacts its routed queries takes the small row count
    without a run-time choice and reports whether its routed tokens fit (``_prefill``)."""

    def __init__(self, inner: SequenceAttention, lengths, capacity: int, fixed_rows=False):
        self.inner, self.lengths, self.capacity = inner, lengths, capacity
        self.fixed_rows = fixed_rows
        self.cache = {}

    @property
    def routed_rows_overflow(self):
        if not self.fixed_rows:
            return None

        def note(flag):
            self.cache[_OVERFLOW] = flag

        return note

    def _keep_global(self, k, v):
        pad = [(0, 0), (0, self.capacity - k.shape[1]), (0, 0), (0, 0)]
        self.cache[GLOBAL] = (jnp.pad(k, pad), jnp.pad(v, pad))

    def full(self, q, k, v):
        self._keep_global(k, v)
        return self.inner.full(q, k, v)

    def routed(self, q, k, v, route):
        self._keep_global(k, v)
        return self.inner.routed(q, k, v, route)

    @property
    def compacts_routed(self) -> bool:
        return self.inner.compacts_routed

    def routed_rows(self, k, v):
        self._keep_global(k, v)
        return self.inner.routed_rows(k, v)

    def swiglu(self, x, w_gate, w_up):
        return self.inner.swiglu(x, w_gate, w_up)

    def local(self, q, k, v, window):
        slots = min(window, self.capacity)
        self.cache[WINDOW] = (_ring(k, self.lengths, slots), _ring(v, self.lengths, slots))
        return self.inner.local(q, k, v, window)


class _DecodeAttend:
    """Runs a layer's attention for one new token per row at positions ``pos`` (b,), writing
    its K/V into the layer's caches and reading them back."""

    def __init__(self, cache: dict, pos, backend, skip):
        self.cache, self.pos, self.backend, self.skip = dict(cache), pos, backend, skip
        self.rows = jnp.arange(pos.shape[0])

    def _write(self, branch, k, v, slot):
        kc, vc = self.cache[branch]
        kc = kc.at[self.rows, slot].set(k[:, 0])
        vc = vc.at[self.rows, slot].set(v[:, 0])
        self.cache[branch] = (kc, vc)
        return kc, vc

    def local(self, q, k, v, window):
        slots = self.cache[WINDOW][0].shape[1]
        kc, vc = self._write(WINDOW, k, v, jnp.mod(self.pos, slots))
        held = _ring_positions(self.pos, slots)
        visible = (held >= 0) & (held > self.pos[:, None] - window)
        return masked_attention(q, kc, vc, visible[:, None, :])

    def full(self, q, k, v):
        kc, vc = self._write(GLOBAL, k, v, self.pos)
        return self.backend.decode(q, kc, vc, self.pos + 1)

    def routed(self, q, k, v, route):
        kc, vc = self._write(GLOBAL, k, v, self.pos)
        # ``skip`` is traced: with it off every row reads, through the same compiled program
        # (the layer's gate then zeroes the rows not routed), so the two differ only in data
        read = route[:, 0] | ~self.skip
        return self.backend.decode(q, kc, vc, self.pos + 1, route=read)


# ---------------------------------------------------------------------------------------------
# prefill and decode


def _logits(model: QwenModel, x_last):
    h = model.final_norm(x_last)
    return jnp.einsum("bd,dv->bv", h, model.output_head(), preferred_element_type=jnp.float32)


def _prefill(
    model: QwenModel, groups, ids, lengths, capacity: int, routing: Routing, fixed_rows=False
):
    """Logits of each row's next token, the caches and the router statistics; and, with
    ``fixed_rows``, whether some layer routed more tokens than its compacted rows hold
    (then the result is wrong and the prefill must run without ``fixed_rows``), else None."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = model.embed_tokens(ids)
    # the rotary tables in the activations' dtype, as each layer's ``apply_rope`` takes them:
    # converted once here, not twice in every layer (XLA keeps the conversion in the scan)
    cos, sin = (table.astype(x.dtype) for table in model.rope(positions))
    inner = SequenceAttention(model.attention)
    counted = positions < lengths[:, None]  # routing statistics over the real tokens only
    x, stats, caches = model.run_decoder(
        x,
        cos,
        sin,
        lambda cache: _PrefillAttend(inner, lengths, capacity, fixed_rows),
        routing=dataclasses.replace(routing, counted=counted),
        groups=groups,
    )
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    stats = RouterStats.concat(stats)
    reports = [c[_OVERFLOW] for c in caches if _OVERFLOW in c]
    caches = [{k: v for k, v in c.items() if k != _OVERFLOW} for c in caches]
    overflow = jnp.any(jnp.concatenate([r.reshape(-1) for r in reports])) if reports else None
    return _logits(model, last), KVCache(caches, lengths, capacity), stats, overflow


def _decode(model: QwenModel, groups, cache: KVCache, tokens, routing: Routing, skip):
    pos = cache.lengths
    cos, sin = model.rope(pos[:, None])
    x = model.embed_tokens(tokens[:, None])
    x, _, new = model.run_decoder(
        x,
        cos,
        sin,
        lambda layer_cache: _DecodeAttend(layer_cache, pos, model.attention, skip),
        routing=routing,
        caches=cache.groups,
        groups=groups,
    )
    return _logits(model, x[:, 0]), KVCache(new, pos + 1, cache.capacity)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from logits: greedy at ``temperature`` 0; otherwise softmax
    at ``temperature`` over the ``top_k`` most likely tokens (all when None), cut to the
    smallest set whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {self.top_k}")

    def __call__(self, logits, key):
        """(b, vocab) float32 logits -> (b,) int32 tokens."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1:
            ordered = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            kept = jnp.sum(before < self.top_p, axis=-1, keepdims=True)
            cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _seed(seed) -> np.ndarray:
    """``seed`` as the int32 scalar a jitted program takes."""
    if not isinstance(seed, (int, np.integer)) or not -(2**31) <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [-2**31, 2**31); got {seed!r}")
    return np.asarray(seed, np.int32)


def _routing(key) -> Routing:
    return Routing(rng=key)  # only ``random`` layers read it


@functools.partial(jax.jit, static_argnames=("graph", "capacity", "fixed_rows"))
def _prefill_jit(
    graph: StackedGraph, weights, ids, lengths, seed, *, capacity: int, fixed_rows: bool
):
    # the key made here, not by the caller: an eager key costs two more dispatches before
    # the prefill can start
    model, groups = graph.shell_model(weights), graph.layer_groups(weights)
    routing = _routing(jax.random.key(seed))
    return _prefill(model, groups, ids, lengths, capacity, routing, fixed_rows)


def _run_prefill(model: ServingModel, ids, lengths, seed: int, capacity: int):
    """``_prefill_jit``'s logits, caches and statistics. Layers that compact their routed
    queries first take rows for a quarter of the prompt width (``l2a_jax.model``'s
    ``ROUTED_ROWS_FRACTION``) as a fixed size: choosing the size per layer at run time costs
    a host round trip each (3.7 ms of a 128K prefill's 625 on an H200). Where some layer
    routed more, the prefill runs again with the choice, and so do later ones through the
    same ``ServingModel``."""
    run = functools.partial(
        _prefill_jit, model.graph, model.weights, ids, lengths, _seed(seed), capacity=capacity
    )
    if not model.overflowed:
        logits, cache, stats, overflow = run(fixed_rows=True)
        if overflow is None or not bool(overflow):
            return logits, cache, stats
        del logits, cache, stats
        model.overflowed.append(True)
    logits, cache, stats, _ = run(fixed_rows=False)
    return logits, cache, stats


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("cache",))
def _decode_step_jit(graph: StackedGraph, weights, cache, tokens, key, skip):
    model, groups = graph.shell_model(weights), graph.layer_groups(weights)
    return _decode(model, groups, cache, tokens, _routing(key), skip)


@functools.partial(
    jax.jit,
    static_argnames=("graph", "steps", "sampling", "eos", "pad"),
    donate_argnames=("cache",),
)
def _decode_loop(
    graph: StackedGraph, weights, cache, first, key, skip, *, steps, sampling, eos, pad
):
    """Tokens (b, steps) after ``first`` (b,), which is already the first of them, and the
    final cache (returned so the donated one is updated in place)."""
    model, groups = graph.shell_model(weights), graph.layer_groups(weights)
    b = first.shape[0]
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    out = jnp.full((b, steps), pad, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def step(carry):
        i, token, cache, done, out = carry
        step_key = jax.random.fold_in(key, i)
        routing = _routing(jax.random.fold_in(step_key, 0))
        logits, cache = _decode(model, groups, cache, token, routing, skip)
        token = sampling(logits, jax.random.fold_in(step_key, 1))
        token = jnp.where(done, pad, token)
        return i + 1, token, cache, done | jnp.isin(token, eos_ids), out.at[:, i].set(token)

    def more(carry):
        i, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    _, _, cache, _, out = jax.lax.while_loop(more, step, (jnp.int32(1), first, cache, done, out))
    return out, cache


# ---------------------------------------------------------------------------------------------
# the public entry points


@dataclasses.dataclass(frozen=True)
class ServingModel:
    """A model made ready for many generation calls: its weights taken out of the module graph
    once, each run of same-structure layers stacked (``layer_scan.StackedGraph``). Every call
    of ``prefill``, ``decode_step``, ``decode`` or ``generate`` with a plain ``QwenModel``
    does this first, which costs host time on every call (a deep model's graph walked, its
    layers stacked); with a ``ServingModel`` it is done once. It holds the weights as they
    were: make a new one after changing them. It keeps no reference to the module."""

    graph: StackedGraph
    weights: dict
    # non-empty once a prefill routed more tokens in some layer than its fixed rows hold
    overflowed: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, model: QwenModel | ServingModel, *, stack: bool = True) -> ServingModel:
        """``model``'s weights; ``stack=False`` (a call's own use of a module) leaves the
        stacking of layers to the jitted program, which copies the weights only there."""
        if isinstance(model, ServingModel):
            return model
        graphdef, state = nnx.split(model)  # one walk over the module graph
        graph = stacked_graph(model, graphdef)
        return cls(graph, graph.split(state, stack=stack))

    @functools.cached_property
    def cfg(self) -> ModelConfig:
        return self.graph.shell_model(self.weights).cfg


def serving_model(model: QwenModel) -> ServingModel:
    """``model`` made ready for many generation calls (``ServingModel``)."""
    return ServingModel.of(model)


def _prompts(model: QwenModel | ServingModel, input_ids, prompt_lengths):
    """Right-padded (b, T) int32 ids (padding set to 0) and lengths (b,) as NumPy arrays."""
    rows = input_ids
    ragged = (
        isinstance(rows, (list, tuple))
        and bool(rows)
        and all(isinstance(r, (list, tuple, np.ndarray)) for r in rows)
        and len({len(r) for r in rows}) > 1
    )
    if ragged:
        if prompt_lengths is not None:
            raise ValueError("pass prompt_lengths with a padded array, not with id lists")
        prompt_lengths = [len(r) for r in rows]
        width = max(prompt_lengths)
        rows = [list(r) + [0] * (width - len(r)) for r in rows]
    ids = np.asarray(rows)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, prompt_len) with prompt_len >= 1; got shape {ids.shape}"
        )
    b, t = ids.shape
    if prompt_lengths is None:
        lengths = np.full((b,), t, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be {b} integers (one per row); got {lengths!r}")
        if lengths.min() < 1 or lengths.max() > t:
            raise ValueError(
                f"prompt_lengths must lie in [1, {t}] (the padded prompt width); got {lengths}"
            )
        lengths = lengths.astype(np.int32)
    if not np.issubdtype(ids.dtype, np.integer):
        host_token_ids(ids, model.cfg.vocab_size)  # raises its clear error for float ids
    ids = np.where(np.arange(t)[None, :] < lengths[:, None], ids, 0)
    return host_token_ids(ids, model.cfg.vocab_size), lengths  # real tokens in the vocabulary


def _capacity(model: QwenModel | ServingModel, longest: int, new_tokens: int) -> int:
    need = longest + new_tokens
    limit = model.cfg.max_position_embeddings
    if need > limit and model.cfg.rope.rope_type != "dynamic":
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({new_tokens}) = {need} exceeds the "
            f"model's context of {limit} positions; shorten the prompt or extend the model's "
            "context (rope scaling and max_position_embeddings in its config)"
        )
    return need


def prefill(
    model: QwenModel | ServingModel,
    input_ids,
    *,
    prompt_lengths=None,
    capacity=None,
    seed: int = 0,
):
    """Runs the model once over right-padded prompts with the attention implementations of
    training (kernels on a GPU) and fills the caches. Returns the logits of each row's next
    token (b, vocab) float32 and a ``KVCache`` with room for ``capacity`` positions (default:
    the prompt width). ``model``: a ``QwenModel`` or, for many calls, a ``ServingModel``.
    ``seed`` (an int32) draws the routes of layers in ``random`` mode; ``generate`` with the
    same seed routes its prompts the same way. Where L2A layers compact their routed queries
    (the kernels), it returns once the prefill has run: the host reads whether its fixed row
    counts held (``_run_prefill``)."""
    model = ServingModel.of(model, stack=False)
    ids, lengths = _prompts(model, input_ids, prompt_lengths)
    capacity = _capacity(model, ids.shape[1], 0 if capacity is None else capacity - ids.shape[1])
    return _run_prefill(model, ids, lengths, seed, capacity)[:2]


def decode_step(
    model: QwenModel | ServingModel, cache: KVCache, tokens, *, skip: bool = True, seed: int = 0
):
    """Feeds one token per row at the cache's next position; returns the logits of the token
    after it (b, vocab) float32 and the updated cache (the argument's buffers are donated).
    ``skip``: unrouted rows do not read an L2A layer's global cache."""
    model = ServingModel.of(model, stack=False)
    tokens = as_token_ids(np.asarray(tokens)[:, None], model.cfg.vocab_size)[:, 0]
    cache.check_room(1)
    key = jax.random.key(seed)
    return _decode_step_jit(model.graph, model.weights, cache, tokens, key, jnp.asarray(skip))


def generate(
    model: QwenModel | ServingModel,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prompt_lengths=None,
    seed: int = 0,
    skip: bool = True,
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, RouterStats | None]:
    """Continues each prompt by up to ``max_new_tokens`` tokens; returns them as int32
    (batch, max_new_tokens). After a row's ``eos_token_id`` (one id or several) the row holds
    ``pad_token_id`` (default: the first eos id, else 0), and decoding stops once every row
    has ended.

    ``input_ids``: (batch, prompt_len) ids, right-padded when ``prompt_lengths`` (batch,) gives
    each row's real length, or a list of id lists of any lengths. Greedy at ``temperature`` 0;
    otherwise sampled (``top_k``, ``top_p``) from ``seed``. ``skip`` turns decode-time
    skipping of unrouted global reads on (results are the same either way). With
    ``return_stats``, also the prefill's ``RouterStats`` over the prompts' real tokens (None
    for a model without L2A layers). ``model``: a ``QwenModel`` or, for many calls, a
    ``ServingModel`` (``serving_model(model)``)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    sampling = Sampling(temperature, top_p, top_k)
    _seed(seed)
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).astype(int).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    model = ServingModel.of(model, stack=False)
    ids, lengths = _prompts(model, input_ids, prompt_lengths)
    capacity = _capacity(model, ids.shape[1], max_new_tokens)
    key = jax.random.key(seed)
    logits, cache, stats = _run_prefill(model, ids, lengths, seed, capacity)
    first = sampling(logits, jax.random.fold_in(key, 1))
    tokens, _ = decode(
        model, cache, first, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, pad=pad,
        skip=skip, seed=seed,
    )  # fmt: skip
    return (tokens, stats) if return_stats else tokens


def decode(
    model: QwenModel | ServingModel,
    cache: KVCache,
    first,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos: tuple[int, ...] = (),
    pad: int = 0,
    skip: bool = True,
    seed: int = 0,
) -> tuple[jax.Array, KVCache]:
    """The decode loop on its own (one jitted program): ``first`` (b,) are the first new tokens
    (sampled from ``prefill``'s logits), fed at the cache's next positions. Returns the new
    tokens (b, max_new_tokens), ``first`` included, and the final cache (the argument's
    buffers are donated)."""
    model = ServingModel.of(model, stack=False)
    cache.check_room(max_new_tokens - 1)  # the last new token is returned, not fed
    return _decode_loop(
        model.graph,
        model.weights,
        cache,
        jnp.asarray(first, jnp.int32),
        jax.random.fold_in(jax.random.key(seed), 2),
        jnp.asarray(skip),
        steps=max_new_tokens,
        sampling=sampling,
        eos=tuple(eos),
        pad=int(pad),
    )
