"""The one attention interface the model uses; implementations plug in behind ``impl``.

- ``xla``: the pure-jnp references of ``pallas_kernels`` (materialise the score matrix);
- ``pallas``: the Pallas kernels (native on a GPU, interpret mode elsewhere);
- ``cudnn``: cuDNN's fused attention (``jax.nn.dot_product_attention``) for dense and windowed
  calls, on a GPU;
- ``auto``: per call, the fastest that applies on this machine (``AttentionBackend``); off the
  GPU that is the jnp path, with a window of at most a quarter of the sequence computed band by
  band (``banded_window``) instead of through the full score matrix.

A Pallas call is opaque to XLA's partitioner, so on a mesh each kernel runs inside
``jax.shard_map``: batch split over the data axes and heads over ``tensor``, specs derived from
the same ``ShardingRules`` as the weights, each GQA group (a kv head and the query heads that
read it) on one device. The jnp reference needs no wrapping: XLA partitions it like any other
computation. When the mesh has a sequence axis (the ``seq`` rule), every implementation runs
context-parallel (``context_parallel.py``): each device attends for its own part of the
sequence, with the window's halo or the global branch's K/V brought from the other shards.

Kernel modules are imported on the first call that needs them, so configs, the model
definition and the HF loader never load the Pallas Triton backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from l2a_jax.config import ConfigError
from l2a_jax.sharding import ShardingRules, axis_size
from pallas_kernels.blocks import SUPPORTED_HEAD_DIMS  # plain data: loads no kernel

ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
# head dims and dtypes cuDNN's fused attention takes through jax.nn.dot_product_attention
CUDNN_MAX_HEAD_DIM = 128
CUDNN_DTYPES = ("bfloat16", "float16")


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_impl(impl: str, head_dim: int) -> str:
    """What ``impl`` runs the Pallas-capable operations as on this machine: ``auto`` is
    ``pallas`` on a GPU for head dims the kernels support, ``xla`` otherwise."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention impl {impl!r} is unknown; use one of {ATTENTION_IMPLS}")
    if impl == "auto":
        return "pallas" if _on_gpu() and head_dim in SUPPORTED_HEAD_DIMS else "xla"
    return impl


def _cudnn_takes(q, segment_ids) -> bool:
    """cuDNN through ``jax.nn.dot_product_attention`` (JAX 0.11) has no segment ids (packed
    documents would need a (T, T) mask), takes half precision only, head dims up to 128."""
    d = q.shape[-1]
    return (
        segment_ids is None
        and q.dtype.name in CUDNN_DTYPES
        and d <= CUDNN_MAX_HEAD_DIM
        and d % 8 == 0
    )


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """How a model runs attention: ``impl`` as requested, resolved per operation on this
    machine, and the ``mesh`` (with its ``rules``) that kernels are shard-mapped over; no mesh
    runs them on whatever device holds the inputs.

    ``auto`` on a GPU takes, per call, what was measured fastest on an H200 (bench/RESULTS.md):
    cuDNN for dense causal and sliding-window attention where it applies (no segment ids, half
    precision, head dim <= 128; cuDNN runs 20-25% faster than the Pallas window kernel), the
    Pallas kernels otherwise and always for routed (query-sparse) attention; off the GPU the
    jnp reference. On Hopper, windows that cuDNN would run go, when no gradient is taken, to
    the Pallas Mosaic GPU forward, 4-5% faster than cuDNN's there (``pallas_kernels.hopper``;
    train steps keep cuDNN); there too ``auto`` and ``pallas`` without a mesh run the
    feed-forward's gated half as one fused kernel where no gradient is taken (``swiglu``).
    ``cudnn`` forces cuDNN for dense and windowed calls (and runs
    routed calls densely, then zeroes skipped rows: full attention's cost, the baseline to
    beat).
    """

    impl: str
    head_dim: int
    mesh: Mesh | None = None
    rules: ShardingRules = ShardingRules()

    def __post_init__(self):
        resolve_impl(self.impl, self.head_dim)
        if self.impl == "cudnn" and not _on_gpu():
            raise ConfigError("attention_impl 'cudnn' needs a GPU; use 'auto' or 'xla' here")

    @property
    def runs_as(self) -> str:
        """The implementation of routed calls (and of every call but cuDNN's)."""
        return resolve_impl(self.impl, self.head_dim)

    def describe(self) -> str:
        hopper = False
        if _on_gpu():
            from pallas_kernels.hopper import on_hopper

            hopper = on_hopper()
        line = self.runs_as
        if self.impl == "cudnn" or (self.impl == "auto" and self.runs_as == "pallas"):
            routed = "cudnn (dense)" if self.impl == "cudnn" else "pallas"
            line = f"dense and window: cudnn where it applies, else pallas; routed: {routed}"
            if self.impl == "auto" and hopper:
                line += "; windows without gradients: pallas (mosaic gpu)"
        if self.impl in ("auto", "pallas") and self.mesh is None and hopper:
            line += "; feed-forward gate without gradients: fused (mosaic gpu)"
        return line

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """Raises a ``ConfigError`` when the mesh would split a GQA group across devices."""
        if self.runs_as in ("pallas", "cudnn") and self.mesh is not None:
            _head_axes(self.mesh, self.rules, num_heads, num_kv_heads)

    def _use_cudnn(self, q, segment_ids) -> bool:
        if self.impl == "cudnn":
            if segment_ids is not None:
                raise ValueError(
                    "attention_impl 'cudnn' takes no segment_ids (packed documents); use "
                    "'auto', which runs such batches on the Pallas kernels"
                )
            return True
        return self.impl == "auto" and self.runs_as == "pallas" and _cudnn_takes(q, segment_ids)

    @property
    def seq_axes(self):
        """The mesh axes the sequence is split over (None: every device holds whole rows)."""
        if self.mesh is None:
            return None
        return self.rules.spec(("seq",), self.mesh)[0]

    def _context_parallel(self, q, k, v, **kwargs) -> jax.Array:
        from l2a_jax.context_parallel import context_parallel_attention

        # each shard's part runs on the kernels (cuDNN takes no segment ids, which carry the
        # halo's visibility) or on the jnp reference
        impl = "xla" if self.runs_as == "xla" else "pallas"
        inner = AttentionBackend(impl, self.head_dim)
        if impl == "pallas":
            heads = _head_axes(self.mesh, self.rules, q.shape[2], k.shape[2])
        else:  # heads split only where a whole GQA group stays on each device
            q_axes = self.rules.spec(("q_heads",), self.mesh, (q.shape[2],))[0]
            kv_axes = self.rules.spec(("kv_heads",), self.mesh, (k.shape[2],))[0]
            heads = q_axes if q_axes == kv_axes else None
        batch = self.rules.spec(("batch",), self.mesh, q.shape[:1])[0]
        return context_parallel_attention(
            inner, self.mesh, self.seq_axes, batch, heads, q, k, v, **kwargs
        )

    def causal(self, q, k, v, *, segment_ids=None, window: int | None = None) -> jax.Array:
        """q (b, t, hq, d), k/v (b, t, hkv, d) -> (b, t, hq, d); causal, optionally windowed
        (``window`` keys per query, itself included)."""
        if self.seq_axes is not None:
            return self._context_parallel(q, k, v, segment_ids=segment_ids, window=window)
        if self._use_cudnn(q, segment_ids):
            local = None if window is None or window >= q.shape[1] else (window - 1, 0)
            fn = functools.partial(_cudnn_causal, local_window_size=local)
            if local is not None and _hopper_window_takes(q):
                fn = functools.partial(_window_hopper_unless_differentiated, window=window)
            return self._on_mesh(fn, q, k, v, segment_ids=None)
        if self.runs_as == "pallas":
            import pallas_kernels

            # a window as long as the sequence is plain causal attention
            fn = functools.partial(
                pallas_kernels.sliding_window_attention, window=window or q.shape[1]
            )
            return self._on_mesh(fn, q, k, v, segment_ids=segment_ids)
        if self.banded(window, q.shape[1]):
            return banded_window(q, k, v, window, segment_ids=segment_ids)
        from pallas_kernels import reference

        return reference.causal_attention_reference(q, k, v, window=window, segment_ids=segment_ids)

    def banded(self, window: int | None, seq_len: int) -> bool:
        """Whether the jnp path runs this window band by band (``auto`` only: ``xla`` stays the
        reference itself)."""
        return self.impl == "auto" and window is not None and 4 * window <= seq_len

    def routed(self, q, k, v, route, *, segment_ids=None) -> jax.Array:
        """Causal attention for queries with ``route`` (b, t) true, exactly zero for others."""
        if self.seq_axes is not None:
            return self._context_parallel(q, k, v, segment_ids=segment_ids, route=route)
        if self.impl == "cudnn":
            dense = self.causal(q, k, v, segment_ids=segment_ids)
            return jnp.where(route[:, :, None, None], dense, jnp.zeros((), dense.dtype))
        if self.runs_as == "pallas":
            import pallas_kernels

            return self._on_mesh(
                pallas_kernels.conditional_global_attention, q, k, v, route, segment_ids=segment_ids
            )
        from pallas_kernels import reference

        return reference.conditional_global_attention_reference(
            q, k, v, route, segment_ids=segment_ids
        )

    @property
    def compacts_routed(self) -> bool:
        """Whether routed calls can take their queries as compacted rows (``routed_rows``):
        on the Pallas kernels, unless the sequence is split over devices."""
        return self.impl != "cudnn" and self.runs_as == "pallas" and self.seq_axes is None

    def routed_rows(self, q_rows, k, v, qpos, *, segment_ids=None) -> jax.Array:
        """Causal attention for routed queries given as rows (b, n, hq, d) at positions
        ``qpos`` (b, n), ascending with padding rows (-1) last (``compact_routed``'s layout);
        padding rows give zero. Only where ``compacts_routed``."""
        if not self.compacts_routed:
            raise ValueError(
                f"attention {self.describe()!r} takes routed queries in token order; call "
                "routed() (compacted rows need the Pallas kernels and an unsplit sequence)"
            )
        import pallas_kernels

        return self._on_mesh(
            pallas_kernels.routed_rows_attention, q_rows, k, v, qpos, segment_ids=segment_ids
        )

    def swiglu(self, x, w_gate, w_up) -> jax.Array:
        """The gated half of the feed-forward, ``silu(x @ w_gate) * (x @ w_up)`` for x
        (..., d). ``auto`` and ``pallas`` on Hopper without a mesh, for shapes it takes: the
        fused Mosaic GPU kernel (``pallas_kernels.swiglu``) where no gradient is taken, the
        jnp form under differentiation; otherwise the jnp form."""
        fused = self.impl in ("auto", "pallas") and self.mesh is None and _on_gpu()
        if fused and _swiglu_takes(x, w_gate):
            return _swiglu_unless_differentiated(x, w_gate, w_up)
        return swiglu(x, w_gate, w_up)

    def decode(self, q, k_cache, v_cache, num_keys, *, route=None) -> jax.Array:
        """One new query per row against a cache: q (b, 1, hq, d) reads the first
        ``num_keys`` (b,) slots of the caches (b, slots, hkv, d). With ``route`` (b,) bool,
        rows not routed give zero and skip the read: on the GPU the Pallas decode kernel's
        programs for such rows return at once; the jnp path skips it when no row routes."""
        if self.runs_as == "pallas" and self.mesh is None:
            import pallas_kernels

            return pallas_kernels.decode_attention(q, k_cache, v_cache, num_keys, route=route)
        from pallas_kernels import reference

        def read():
            return reference.decode_attention_reference(q, k_cache, v_cache, num_keys, route)

        if route is None:
            return read()
        return jax.lax.cond(jnp.any(route), read, lambda: jnp.zeros_like(q))

    def _on_mesh(self, kernel, q, k, v, *per_token, segment_ids):
        """``kernel(q, k, v, *per_token, segment_ids=...)``, shard-mapped when there is a mesh.
        ``per_token`` arrays are (b, t) like ``segment_ids``."""
        if self.mesh is None:
            return kernel(q, k, v, *per_token, segment_ids=segment_ids)
        heads = _head_axes(self.mesh, self.rules, q.shape[2], k.shape[2])
        batch = self.rules.spec(("batch",), self.mesh, q.shape[:1])[0]
        qkv = PartitionSpec(batch, None, heads, None)
        tokens = PartitionSpec(batch, None)
        extra = (*per_token, segment_ids)

        def local(q, k, v, *extra):
            *per_token, segment_ids = extra
            return kernel(q, k, v, *per_token, segment_ids=segment_ids)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(qkv, qkv, qkv, *(None if x is None else tokens for x in extra)),
            out_specs=qkv,
            check_vma=False,  # pallas_call carries no varying-manual-axes types
        )(q, k, v, *extra)


class Attend(Protocol):
    """The three attention calls a decoder layer makes; q (b, t, hq, d), k/v (b, t, hkv, d)
    -> (b, t, hq, d). ``SequenceAttention`` runs them over whole sequences; generation runs
    them for new tokens against KV caches."""

    def full(self, q, k, v) -> jax.Array:
        """Causal attention over every earlier key."""

    def local(self, q, k, v, window: int) -> jax.Array:
        """Causal attention over the last ``window`` keys, the query's own included."""

    def routed(self, q, k, v, route) -> jax.Array:
        """``full`` for queries with ``route`` (b, t) true, exactly zero for the others."""

    # Optional: an Attend with ``compacts_routed`` true also offers ``routed_rows(k, v)``,
    # which takes the keys and values of every token and returns ``attend(q_rows, qpos)`` for
    # routed queries as compacted rows (``AttentionBackend.routed_rows``); the layer then
    # projects only those queries, in rows of a size it picks at run time (the returned
    # function is pure, so it may run inside ``lax.cond``). One that also offers
    # ``routed_rows_overflow(flag)`` gets the small size without that choice and is told
    # whether the layer routed more tokens than those rows hold (its caller then runs again
    # with the choice). An Attend may also offer ``swiglu(x, w_gate, w_up)`` for the
    # feed-forward's gated half (``AttentionBackend.swiglu``); the MLP computes the jnp form
    # where it does not.


@dataclasses.dataclass(frozen=True)
class SequenceAttention:
    """``Attend`` over whole (packed) sequences: training, scoring and prefill."""

    backend: AttentionBackend
    segment_ids: jax.Array | None = None

    def full(self, q, k, v) -> jax.Array:
        return self.backend.causal(q, k, v, segment_ids=self.segment_ids)

    def local(self, q, k, v, window: int) -> jax.Array:
        return self.backend.causal(q, k, v, segment_ids=self.segment_ids, window=window)

    def routed(self, q, k, v, route) -> jax.Array:
        return self.backend.routed(q, k, v, route, segment_ids=self.segment_ids)

    @property
    def compacts_routed(self) -> bool:
        return self.backend.compacts_routed

    def swiglu(self, x, w_gate, w_up) -> jax.Array:
        return self.backend.swiglu(x, w_gate, w_up)

    def routed_rows(self, k, v):
        def attend(q_rows, qpos):
            return self.backend.routed_rows(q_rows, k, v, qpos, segment_ids=self.segment_ids)

        return attend


def banded_window(q, k, v, window: int, *, segment_ids=None) -> jax.Array:
    """Sliding-window attention in jnp without the (T, T) score matrix: the sequence is cut
    into blocks of ``window`` queries, each reading its own block and the one before (which
    hold every key it may see), so scores cost T x 2 window instead of T x T. Same contract
    and float32 softmax as ``reference.sliding_window_attention_reference``."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group, c = hq // hkv, window
    pad = -t % c
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    if pad:  # padded queries sit in a segment of their own and are cut off at the end
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    n = (t + pad) // c

    def with_previous(x):  # (b, n, c, ...) -> (b, n, 2c, ...): block i-1 then block i
        before = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        return jnp.concatenate([before, x], axis=2)

    qb = q.reshape(b, n, c, hkv, group, d)
    kb = with_previous(k.reshape(b, n, c, hkv, d))
    vb = with_previous(v.reshape(b, n, c, hkv, d).astype(jnp.float32))
    seg = segment_ids.reshape(b, n, c)
    logits = jnp.einsum(
        "bnikgd,bnjkd->bnkgij",
        qb,
        kb,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    ) * (d**-0.5)
    i = jnp.arange(c)[:, None] + c  # a query's place among its block's 2c keys
    j = jnp.arange(2 * c)[None, :]
    first = (jnp.arange(n) == 0)[:, None, None]  # block 0 has no block before it
    visible = (j <= i) & (j > i - window) & ~(first & (j < c))  # (n, c, 2c)
    visible = visible[None] & (seg[:, :, :, None] == with_previous(seg)[:, :, None, :])
    logits = jnp.where(visible[:, :, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)  # every query sees itself: no empty row
    out = jnp.einsum("bnkgij,bnjkd->bnikgd", p, vb, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, n * c, hq, d)[:, :t].astype(q.dtype)


def _cudnn_causal(q, k, v, *, local_window_size, segment_ids=None):
    del segment_ids  # always None here: the caller checked
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=local_window_size, implementation="cudnn"
    )


def _hopper_window_takes(q) -> bool:
    """Whether a window cuDNN would run goes to the Pallas Mosaic GPU kernel instead when no
    gradient is taken: on Hopper, for sequences a whole number of its 128-token tiles (which
    ``pallas_kernels.hopper.takes`` needs; cuDNN takes the others)."""
    from pallas_kernels import hopper

    t = q.shape[1]
    return hopper.takes(q, rows=t, keys=t, has_segments=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _window_hopper_unless_differentiated(q, k, v, window, segment_ids=None):
    """Windowed causal attention: evaluated as is (prefill, scoring) on the Mosaic GPU kernel,
    faster than cuDNN's there (``bench/RESULTS.md``); differentiated, cuDNN's forward and
    backward, which beat the Pallas pair in a train step."""
    del segment_ids
    import pallas_kernels

    return pallas_kernels.sliding_window_attention(q, k, v, window=window)


def _window_cudnn_fwd(q, k, v, window, segment_ids=None):
    del segment_ids
    cudnn = functools.partial(_cudnn_causal, local_window_size=(window - 1, 0))
    return jax.vjp(cudnn, q, k, v)  # (output, its pullback: a pytree of residuals)


def _window_cudnn_bwd(window, pullback, g):
    return (*pullback(g), None)


_window_hopper_unless_differentiated.defvjp(_window_cudnn_fwd, _window_cudnn_bwd)


def swiglu(x, w_gate, w_up) -> jax.Array:
    """``silu(x @ w_gate) * (x @ w_up)`` in jnp, in x's dtype."""
    return jax.nn.silu(x @ w_gate) * (x @ w_up)


def _swiglu_takes(x, w_gate) -> bool:
    from pallas_kernels import swiglu as kernel

    rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x
    return kernel.takes(rows, w_gate)


@jax.custom_vjp
def _swiglu_unless_differentiated(x, w_gate, w_up):
    """``swiglu`` evaluated as is (prefill, scoring) on the fused Mosaic GPU kernel, which
    never writes the two products (``bench/RESULTS.md``); differentiated, the jnp form."""
    from pallas_kernels import swiglu as kernel

    out = kernel.swiglu_up(x.reshape(-1, x.shape[-1]), w_gate, w_up)
    return out.reshape(*x.shape[:-1], w_gate.shape[1])


def _swiglu_fwd(x, w_gate, w_up):
    return jax.vjp(swiglu, x, w_gate, w_up)


def _swiglu_bwd(pullback, g):
    return pullback(g)


_swiglu_unless_differentiated.defvjp(_swiglu_fwd, _swiglu_bwd)


def _head_axes(mesh: Mesh, rules: ShardingRules, num_heads: int, num_kv_heads: int):
    """The mesh axes that split heads for the kernels: the same for query and kv heads, so
    every GQA group stays on one device; a ``ConfigError`` naming sizes that work otherwise."""
    q_axes = rules.spec(("q_heads",), mesh, (num_heads,))[0]
    kv_axes = rules.spec(("kv_heads",), mesh, (num_kv_heads,))[0]
    if q_axes != kv_axes:
        working = [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]
        raise ConfigError(
            f"mesh axes {q_axes} of size {axis_size(mesh, q_axes)} split the {num_heads} query "
            f"heads but not the {num_kv_heads} kv heads, so a GQA group would span devices in "
            f"the attention kernels; use a head-splitting (tensor) size among {working}, or "
            "attention_impl='xla'"
        )
    return q_axes
