"""The run configuration of ``train.py``: one ``ml_collections.ConfigDict`` tree, every field
defined once here with its default. Config files (``configs/*.py``) start from
``default_config()`` and change fields; the tree is locked, so an unknown key (in a file or on
the command line) fails at once with the nearest known key. ``validate`` checks every value
before any work starts and returns the typed settings the library takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import warnings

import ml_collections

from l2a_jax.config import ConfigError, L2AConfig, ModelConfig, RopeConfig, resolve_dtype
from l2a_jax.data.pipeline import NeedleMix
from l2a_jax.training.step import TrainConfig

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"

    c.model = ml_collections.ConfigDict()
    # "checkpoint": load model.checkpoint (a local HF directory); "random": a new model of the
    # shape below
    c.model.init = "checkpoint"
    c.model.checkpoint = ""
    c.model.architecture = "Qwen3ForCausalLM"
    c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    c.model.hidden_size = 256
    c.model.intermediate_size = 768
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 64
    # 0 keeps the checkpoint's value (or sizes a new model to data.seq_len)
    c.model.max_position_embeddings = 0
    c.model.rope_theta = 0.0  # 0 keeps the checkpoint's (or 1e6 for a new model)
    c.model.dtype = "float32"
    c.model.attention_impl = "auto"

    c.l2a = ml_collections.ConfigDict()
    c.l2a.enabled = True
    c.l2a.layers = ml_collections.FieldReference(None, field_type=tuple)  # None: every layer
    c.l2a.window = 4095
    c.l2a.tau = 0.1
    c.l2a.threshold = 0.5
    c.l2a.mode = "l2a"
    c.l2a.static_global_layers = ()
    c.l2a.random_densities = ()

    c.data = ml_collections.ConfigDict()
    c.data.files = ()  # text files or directories; empty: the embedded corpus
    c.data.tokenizer = "bytes"  # "bytes", "qwen" or a local HF tokenizer directory
    c.data.seq_len = 1024
    c.data.batch_size = 8
    c.data.needle_rate = 0.0
    c.data.needle_haystacks = ("noise", "essay")
    c.data.needle_value_kinds = ("numbers",)
    c.data.needle_loss = "all"  # "all" tokens of a task row, or its "answer" alone
    c.data.drill_rate = 0.0  # rows of packed recall drills (data/pipeline.py)
    c.data.drill_length = 48  # tokens per drill
    c.data.drill_gap = 16  # the value sits at least this many tokens before the drill's end

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.seed = 0
    c.train.learning_rate = 5e-5
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.sparsity_weight = 1e-8
    c.train.sparsity_warmup_steps = 100
    c.train.sparsity_ramp = "linear"
    c.train.dense_step_prob = 0.1
    c.train.route_all_steps = 0  # route every token for this many steps first (from scratch)
    # then route tokens at random with a probability falling from 1 to 0 over this many steps
    c.train.route_all_decay_steps = 0
    c.train.remat = "none"  # "none", "full" (recompute each layer) or "dots" (keep matmuls)
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step
    # trainable weights and optimizer state are kept in this dtype; compute runs in model.dtype
    c.train.master_dtype = "float32"
    c.train.loss_chunk = 4096
    c.train.trainable = "recipe"  # "recipe": attention, norms, routers; "all": every weight
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.log_every = 10

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.seq = 1  # context parallelism: each sequence split over this many devices
    c.mesh.tensor = 1
    c.lock()
    return c


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The validated configuration, as the typed objects the library takes."""

    model: ModelConfig | None  # a new model's; None: read from ``checkpoint``
    checkpoint: str
    model_overrides: dict  # from_hf's max_position_embeddings / rope_theta
    dtype: object
    attention_impl: str
    l2a: L2AConfig | None
    train: TrainConfig
    needles: NeedleMix
    mesh_shape: tuple[int, int, int, int]  # data, fsdp, seq, tensor


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field {field}: {message}")


@contextlib.contextmanager
def _section(name: str):
    """Names the config section in errors raised while its typed object is built."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"config section {name}: {e}") from e


def check_keys(config: ml_collections.ConfigDict, reference=None, prefix="") -> None:
    """Raises a ``ConfigError`` for the first key of ``config`` that the defaults lack, naming
    the nearest known key (for trees built without the defaults' lock)."""
    reference = reference if reference is not None else default_config()
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            near = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            raise ConfigError(f"unknown config key {name}{hint}")
        if isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(config[key], reference[key], name + ".")


def validate(config: ml_collections.ConfigDict, vocab_size: int) -> RunSettings:
    """Every field checked, with the field named in the error; ``vocab_size`` is the
    tokenizer's."""
    check_keys(config)
    m, d, t = config.model, config.data, config.train
    _check(m.init in ("checkpoint", "random"), "model.init", "use 'checkpoint' or 'random'")
    _check(
        m.init == "random" or bool(m.checkpoint),
        "model.checkpoint",
        "this config trains from a checkpoint; pass --config.model.checkpoint=/path/to/a/local/"
        "Qwen/checkpoint (or --config.model.init=random for a new model)",
    )
    _check(
        m.init == "checkpoint" or not m.checkpoint,
        "model.checkpoint",
        "is only read with model.init='checkpoint' (this config builds a new model)",
    )
    _check(m.architecture in ARCHITECTURES, "model.architecture", f"use one of {ARCHITECTURES}")
    for name in ("seq_len", "batch_size"):
        _check(d[name] >= 1, f"data.{name}", f"must be >= 1, got {d[name]}")
    for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
        _check(t[name] >= 1, f"train.{name}", f"must be >= 1, got {t[name]}")
    _check(
        t.grad_accum_steps >= 1 and d.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        f"must be >= 1 and divide data.batch_size ({d.batch_size}); got {t.grad_accum_steps}",
    )
    _check(
        t.steps > max(t.warmup_steps, t.sparsity_warmup_steps),
        "train.steps",
        f"{t.steps} must exceed train.warmup_steps ({t.warmup_steps}) and "
        f"train.sparsity_warmup_steps ({t.sparsity_warmup_steps})",
    )
    hand_off = t.route_all_steps + t.route_all_decay_steps
    if config.l2a.enabled and hand_off and hand_off >= t.steps:
        # legal (short smoke runs do it), but the routers never decide alone in such a run
        warnings.warn(
            f"train.route_all_steps ({t.route_all_steps}) + train.route_all_decay_steps "
            f"({t.route_all_decay_steps}) reach train.steps ({t.steps}): every step routes "
            "tokens beyond the routers' choice, so the run never trains (or reports) the "
            "routers' own sparsity; shorten the hand-off or train for more steps",
            UserWarning,
            stacklevel=2,
        )
    for name in ("data", "fsdp", "seq", "tensor"):
        size = config.mesh[name]
        _check(size >= 1 or (name == "data" and size == -1), f"mesh.{name}", "must be >= 1")
    _check(
        d.seq_len % config.mesh.seq == 0,
        "mesh.seq",
        f"{config.mesh.seq} sequence shards do not split data.seq_len {d.seq_len}; use a "
        "divisor of it",
    )
    try:
        dtype = resolve_dtype(m.dtype)
    except ConfigError as e:
        raise ConfigError(f"config field model.dtype: {e}") from e
    vocab = m.vocab_size or vocab_size
    _check(
        vocab >= vocab_size,
        "model.vocab_size",
        f"{vocab} is smaller than the tokenizer's vocabulary ({vocab_size})",
    )
    overrides = {}
    if m.max_position_embeddings:
        overrides["max_position_embeddings"] = m.max_position_embeddings
    if m.rope_theta:
        overrides["rope_theta"] = m.rope_theta
    model = None
    if m.init == "random":
        with _section("model"):
            model = _new_model(m, vocab, d.seq_len)
    l2a = None
    if config.l2a.enabled:
        with _section("l2a"):
            l2a = _l2a(config.l2a, model)
    with _section("train"):
        train = TrainConfig(
            learning_rate=t.learning_rate,
            warmup_steps=t.warmup_steps,
            total_steps=t.steps,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            sparsity_weight=t.sparsity_weight,
            sparsity_warmup_steps=t.sparsity_warmup_steps,
            sparsity_ramp=t.sparsity_ramp,
            dense_step_prob=t.dense_step_prob,
            loss_chunk=t.loss_chunk,
            trainable=t.trainable,
            route_all_steps=t.route_all_steps,
            route_all_decay_steps=t.route_all_decay_steps,
            remat=t.remat,
            grad_accum_steps=t.grad_accum_steps,
            master_dtype=t.master_dtype,
            compute_dtype=m.dtype,
        )
    with _section("data"):
        needles = NeedleMix(
            rate=d.needle_rate,
            haystacks=tuple(d.needle_haystacks),
            value_kinds=tuple(d.needle_value_kinds),
            loss=d.needle_loss,
            drill_rate=d.drill_rate,
            drill_length=d.drill_length,
            drill_gap=d.drill_gap,
        )
    return RunSettings(
        model=model,
        checkpoint=m.checkpoint,
        model_overrides=overrides,
        dtype=dtype,
        attention_impl=m.attention_impl,
        l2a=l2a,
        train=train,
        needles=needles,
        mesh_shape=(config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor),
    )


def _new_model(m, vocab: int, seq_len: int) -> ModelConfig:
    return ModelConfig(
        architecture=m.architecture,
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings or max(seq_len, 32768),
        qkv_bias=m.architecture == "Qwen2ForCausalLM",
        qk_norm=m.architecture == "Qwen3ForCausalLM",
        rope=RopeConfig(theta=m.rope_theta or 1e6),
    )


def _l2a(c, model: ModelConfig | None) -> L2AConfig:
    l2a = L2AConfig(
        layers=None if c.layers is None else tuple(c.layers),
        window=c.window,
        tau=c.tau,
        threshold=c.threshold,
        mode=c.mode,
        static_global_layers=tuple(c.static_global_layers),
        random_densities=tuple(c.random_densities),
    )
    if model is not None:
        l2a.layer_indices(model.num_layers)
    return l2a
