"""What defines a model: one frozen dataclass per idea (``ModelConfig``, ``RopeConfig``,
``L2AConfig``), built from an HF ``config.json``. Nothing here imports JAX or a kernel: a
config can be read, checked and written on any machine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# ``static`` is a model-level mode only: it resolves to ``full`` or ``swa`` per layer.
ROUTING_MODES = ("l2a", "full", "swa", "static", "random")

_DTYPE_NAMES = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
}


class ConfigError(ValueError):
    """A configuration that this project cannot run, with the fix in the message."""


def resolve_dtype(dtype) -> np.dtype:
    """A floating parameter dtype from a name (``"bf16"``, ``"bfloat16"``, ``"float32"``, ...)
    or a dtype object; anything else raises a ``ConfigError`` naming the accepted names."""
    import ml_dtypes  # numpy alone has no bfloat16

    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower())
        if name is None:
            raise ConfigError(f"dtype {dtype!r} is unknown; use one of {sorted(set(_DTYPE_NAMES))}")
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    try:
        resolved = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype {dtype!r} is not a dtype; use 'bfloat16' or 'float32'") from e
    if resolved.name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"parameters must be float32, bfloat16 or float16; got {resolved.name}")
    return resolved


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, in the vocabulary of HF ``rope_parameters``.

    ``original_max_position_embeddings`` is the pre-training context for ``yarn`` and the
    length past which ``dynamic`` starts to stretch the base frequency.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
            )
        if self.rope_type != "default" and not self.factor > 0:
            raise ConfigError(f"rope factor must be > 0 for rope type {self.rope_type!r}")

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "default":
            return out
        out["factor"] = self.factor
        if self.rope_type == "yarn":
            out.update(
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
                truncate=self.truncate,
            )
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen2/Qwen2.5 or Qwen3 decoder.

    ``qkv_bias``: biases on q/k/v projections (Qwen2 always, Qwen3 with attention_bias).
    ``o_bias``: bias on the output projection (Qwen3 with attention_bias only).
    ``qk_norm``: per-head RMSNorm on queries and keys (Qwen3).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    # HF config keys this model does not interpret (token ids, ...), kept for the round trip.
    hf_extra_json: str = "{}"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; "
                f"use a checkpoint of one of {SUPPORTED_ARCHITECTURES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )

    @property
    def is_qwen3(self) -> bool:
        return self.architecture == "Qwen3ForCausalLM"

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise ConfigError(
                f"config.json must name exactly one architecture, got {architectures!r}; "
                f"supported: {SUPPORTED_ARCHITECTURES}"
            )
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch!r} is not supported; use a checkpoint of one of "
                f"{SUPPORTED_ARCHITECTURES}"
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported; Qwen uses 'silu'")
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ConfigError(
                "HF sliding-window layers (use_sliding_window / layer_types) are not supported; "
                "set use_sliding_window=false: L2A adds its own windowed branch"
            )
        num_heads = hf["num_attention_heads"]
        is_qwen3 = arch == "Qwen3ForCausalLM"
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        known = {
            "architectures",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
            "attention_bias",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "model_type",
            "hidden_act",
            "use_sliding_window",
            "layer_types",
            "sliding_window",
            "max_window_layers",
            "transformers_version",
            "torch_dtype",
            "dtype",
        }
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(not is_qwen3) or attention_bias,
            o_bias=is_qwen3 and attention_bias,
            qk_norm=is_qwen3,
            rope=_rope_from_hf(hf),
            hf_extra_json=json.dumps(extra, sort_keys=True),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out = json.loads(self.hf_extra_json)
        out.update(
            architectures=[self.architecture],
            model_type="qwen3" if self.is_qwen3 else "qwen2",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            use_sliding_window=False,
            rope_parameters=self.rope.to_hf(),
        )
        if self.is_qwen3:
            out["attention_bias"] = self.qkv_bias
        return out


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Reads transformers-5 ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if (
        params.pop("partial_rotary_factor", 1.0) != 1.0
        or hf.get("partial_rotary_factor", 1.0) != 1.0
    ):
        raise ConfigError("partial_rotary_factor != 1 is not supported by Qwen models")
    allowed = {f.name for f in dataclasses.fields(RopeConfig)} - {"rope_type", "theta"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"unknown rope parameters {unknown}; known: {sorted(allowed)}")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "yarn" and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 32768)
        )
    if params.get("factor") is None:
        if rope_type != "yarn":
            raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
        params["factor"] = (
            hf["max_position_embeddings"] / params["original_max_position_embeddings"]
        )
    kwargs = {k: v for k, v in params.items() if v is not None}
    return RopeConfig(rope_type=rope_type, theta=float(theta), **kwargs)


@dataclasses.dataclass(frozen=True)
class L2AConfig:
    """Which layers are L2A layers and how they route: everything that defines an L2A model
    and is saved with it (the ``l2a`` section of its ``config.json``).

    ``layers``: indices of L2A layers (None: every layer); the others keep full attention.
    ``window``: keys per token in the sliding-window branch, itself included (4095 for Qwen3-8B).
    ``tau``: router temperature; ``threshold``: route when sigmoid(z / tau) >= threshold.
    ``mode``: ``l2a`` (learned router), ``full`` (every token global), ``swa`` (none),
    ``static`` (``static_global_layers`` fully global, the other L2A layers ``swa``), or
    ``random`` (tokens drawn at random with ``random_densities``, one per L2A layer, in the
    order of ``layers``). ``pruned_layers``: L2A layers whose global branch was removed after
    training (``convert.prune_global_branches``): window attention alone, no global KV cache.
    """

    layers: tuple[int, ...] | None = None
    window: int = 4095
    tau: float = 0.1
    threshold: float = 0.5
    mode: str = "l2a"
    static_global_layers: tuple[int, ...] = ()
    random_densities: tuple[float, ...] = ()
    pruned_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ConfigError(f"l2a.mode {self.mode!r} is unknown; use one of {ROUTING_MODES}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(
                f"l2a.window must be an int >= 1 (keys per token), got {self.window!r}"
            )
        if not self.tau > 0:
            raise ConfigError(f"l2a.tau must be > 0, got {self.tau}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"l2a.threshold must be in (0, 1), got {self.threshold}")
        if self.mode == "static" and not self.static_global_layers:
            raise ConfigError(
                "l2a.mode 'static' needs l2a.static_global_layers: the layers that stay global"
            )
        if self.mode != "static" and self.static_global_layers:
            raise ConfigError("l2a.static_global_layers is only used with l2a.mode 'static'")
        if self.mode == "random":
            if not self.random_densities:
                raise ConfigError(
                    "l2a.mode 'random' needs l2a.random_densities: one routed fraction per L2A "
                    "layer (e.g. the per-layer routed fractions of a learned run)"
                )
            if any(not 0 <= p <= 1 for p in self.random_densities):
                raise ConfigError(
                    f"l2a.random_densities must lie in [0, 1]: {self.random_densities}"
                )
        elif self.random_densities:
            raise ConfigError("l2a.random_densities is only used with l2a.mode 'random'")

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The L2A layers of a ``num_layers`` model, checked against every list in the config."""
        layers = tuple(range(num_layers)) if self.layers is None else tuple(self.layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(
                f"l2a.layers {layers} must be distinct indices in [0, {num_layers}); bad: {bad}"
            )
        stray = sorted(set(self.static_global_layers) - set(layers))
        if stray:
            raise ConfigError(f"l2a.static_global_layers {stray} are not L2A layers {layers}")
        stray = sorted(set(self.pruned_layers) - set(layers))
        if stray:
            raise ConfigError(f"l2a.pruned_layers {stray} are not L2A layers {layers}")
        if self.mode == "random" and len(self.random_densities) != len(layers):
            raise ConfigError(
                f"l2a.random_densities has {len(self.random_densities)} entries; it needs one "
                f"per L2A layer ({len(layers)})"
            )
        return layers

    def layer_modes(self, num_layers: int) -> dict[int, tuple[str, float]]:
        """Layer index -> (mode, density) for every L2A layer, in the mode vocabulary with
        ``static`` resolved: ``l2a``, ``full``, ``swa``, ``random`` (density used by the
        last alone) or ``pruned`` (no global branch at all)."""
        plan = {}
        for position, layer in enumerate(self.layer_indices(num_layers)):
            if layer in self.pruned_layers:
                plan[layer] = ("pruned", 0.0)
            elif self.mode == "random":
                plan[layer] = ("random", self.random_densities[position])
            elif self.mode == "static":
                plan[layer] = ("full" if layer in self.static_global_layers else "swa", 0.0)
            else:
                plan[layer] = (self.mode, 0.0)
        return plan

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> L2AConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown l2a config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("layers", "static_global_layers", "random_densities", "pruned_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)
