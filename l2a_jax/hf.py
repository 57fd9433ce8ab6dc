"""Hugging Face checkpoints <-> l2a_jax models.

One key table maps every HF tensor name to a parameter path and a layout transform; both
directions use it. Loading (``weights.load_weights``) builds the model abstractly, streams
tensors one at a time from memory-mapped safetensors (optionally straight onto a sharding), and
reports every unmapped, missing, duplicate or mis-shaped tensor in one error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from l2a_jax.config import ConfigError, L2AConfig, ModelConfig, resolve_dtype
from l2a_jax.model import QwenModel
from l2a_jax.safetensors_io import iter_checkpoint_files
from l2a_jax.sharding import ShardingRules
from l2a_jax.weights import (
    SAME,
    SKIP,
    Layout,
    load_weights,
    model_parameters,
    write_weights,
)

# nn.Linear (out, in) <-> (in, out)
LINEAR = Layout(lambda a, s: a.T, lambda a: a.T, lambda s: s[::-1])
# nn.Linear (heads*head_dim, embed) <-> (embed, heads, head_dim)
HEADS_IN = Layout(
    lambda a, s: a.T.reshape(s),
    lambda a: a.reshape(a.shape[0], -1).T,
    lambda s: (s[1] * s[2], s[0]),
)
# nn.Linear (embed, heads*head_dim) <-> (heads, head_dim, embed)
HEADS_OUT = Layout(
    lambda a, s: a.T.reshape(s),
    lambda a: a.reshape(-1, a.shape[-1]).T,
    lambda s: (s[2], s[0] * s[1]),
)
# bias (heads*head_dim,) <-> (heads, head_dim)
HEADS_BIAS = Layout(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],))
# router nn.Linear(hidden, 1) weight (1, hidden) <-> (hidden,)
ROUTER = Layout(lambda a, s: a.reshape(s), lambda a: a.reshape(1, -1), lambda s: (1, s[0]))

_PLACEHOLDERS = {"layer": r"\d+", "qkv": "[qkv]", "qk": "[qk]", "ffn": "gate|up|down"}

# (HF name template, our parameter path template, layout)
KEY_TABLE: tuple[tuple[str, str, Layout], ...] = (
    ("model.embed_tokens.weight", "embed", SAME),
    ("model.norm.weight", "final_norm.weight", SAME),
    ("lm_head.weight", "lm_head", LINEAR),
    ("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_norm.weight", SAME),
    (
        "model.layers.{layer}.post_attention_layernorm.weight",
        "layers.{layer}.post_norm.weight",
        SAME,
    ),
    ("model.layers.{layer}.self_attn.{qkv}_proj.weight", "layers.{layer}.attn.w{qkv}", HEADS_IN),
    ("model.layers.{layer}.self_attn.{qkv}_proj.bias", "layers.{layer}.attn.b{qkv}", HEADS_BIAS),
    ("model.layers.{layer}.self_attn.o_proj.weight", "layers.{layer}.attn.wo", HEADS_OUT),
    ("model.layers.{layer}.self_attn.o_proj.bias", "layers.{layer}.attn.bo", SAME),
    (
        "model.layers.{layer}.self_attn.{qk}_norm.weight",
        "layers.{layer}.attn.{qk}_norm.weight",
        SAME,
    ),
    ("model.layers.{layer}.mlp.{ffn}_proj.weight", "layers.{layer}.mlp.w_{ffn}", LINEAR),
    # L2A layers: the window branch keeps the base names above; the global branch and router
    ("model.layers.{layer}.global_layernorm.weight", "layers.{layer}.global_norm.weight", SAME),
    ("model.layers.{layer}.router.weight", "layers.{layer}.router", ROUTER),
    (
        "model.layers.{layer}.global_attn.{qkv}_proj.weight",
        "layers.{layer}.global_attn.w{qkv}",
        HEADS_IN,
    ),
    (
        "model.layers.{layer}.global_attn.{qkv}_proj.bias",
        "layers.{layer}.global_attn.b{qkv}",
        HEADS_BIAS,
    ),
    ("model.layers.{layer}.global_attn.o_proj.weight", "layers.{layer}.global_attn.wo", HEADS_OUT),
    ("model.layers.{layer}.global_attn.o_proj.bias", "layers.{layer}.global_attn.bo", SAME),
    (
        "model.layers.{layer}.global_attn.{qk}_norm.weight",
        "layers.{layer}.global_attn.{qk}_norm.weight",
        SAME,
    ),
)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(pattern + "$")


_HF_TO_OURS = [(_compile(hf), ours, layout) for hf, ours, layout in KEY_TABLE]
_OURS_TO_HF = [(_compile(ours), hf, layout) for hf, ours, layout in KEY_TABLE]


def hf_key_to_param(key: str) -> tuple[str, Layout] | None:
    """Our dotted parameter path and layout for an HF tensor name, or None if unmapped."""
    for pattern, ours, layout in _HF_TO_OURS:
        m = pattern.match(key)
        if m:
            return ours.format(**m.groupdict()), layout
    return None


def param_to_hf_key(path: str) -> tuple[str, Layout]:
    for pattern, hf, layout in _OURS_TO_HF:
        m = pattern.match(path)
        if m:
            return hf.format(**m.groupdict()), layout
    raise KeyError(f"parameter {path} has no HF name in the key table")


def read_hf_config(path: str | Path) -> tuple[Path, ModelConfig, L2AConfig | None]:
    """The checkpoint directory, its model config, and its L2A config if it is an L2A model."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist; pass a local directory holding "
            "config.json and *.safetensors (nothing is downloaded)"
        )
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json; it is not an HF checkpoint")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file} is not valid JSON: {e}") from e
    l2a = None
    if "l2a" in hf_config:
        l2a_dict = dict(hf_config.pop("l2a"))
        hf_config["architectures"] = [l2a_dict.pop("base_architecture", None)]
        l2a = L2AConfig.from_dict(l2a_dict)
    return directory, ModelConfig.from_hf_dict(hf_config), l2a


def from_hf(
    path: str | Path,
    *,
    dtype="float32",
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    attention_impl: str = "auto",
    max_position_embeddings: int | None = None,
    rope_theta: float | None = None,
) -> QwenModel:
    """Loads a local HF Qwen2/Qwen2.5/Qwen3 checkpoint directory (or one written by ``to_hf``
    from an L2A model) into a ``QwenModel``. ``max_position_embeddings`` and ``rope_theta``,
    when given, replace the checkpoint's (extending the context: weights are unchanged).

    Tensors are read one at a time, converted on the host, cast to ``dtype`` (a dtype or a name:
    ``"bf16"``, ``"bfloat16"``, ``"float32"``, ...) and placed on ``mesh`` (sharded by
    ``rules``) or on the default device. ``attention_impl`` and ``mesh`` also fix how the model
    runs attention (see ``QwenModel``).
    """
    dtype = resolve_dtype(dtype)  # a bad name fails before any file is read
    directory, cfg, l2a = read_hf_config(path)
    if max_position_embeddings is not None:
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_position_embeddings)
    if rope_theta is not None:
        cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, theta=float(rope_theta)))

    def mapper(key: str):
        mapped = hf_key_to_param(key)
        if mapped is not None and mapped[0] == "lm_head" and cfg.tie_word_embeddings:
            return SKIP  # a tied head may be saved redundantly; the embedding is the weight
        return mapped

    return load_weights(
        lambda: QwenModel(
            cfg,
            dtype=dtype,
            attention_impl=attention_impl,
            l2a=l2a,
            mesh=mesh,
            rules=rules,
            rngs=nnx.Rngs(0),
        ),
        iter_checkpoint_files(directory),
        mapper,
        lambda ours: param_to_hf_key(ours)[0],
        description=f"checkpoint {directory} does not match its config.json ({cfg.architecture})",
        mesh=mesh,
        rules=rules,
    )


def to_hf(
    model: QwenModel, out_dir: str | Path, *, dtype=None, max_shard_bytes: int = 4 * 1024**3
) -> Path:
    """Writes ``config.json`` and safetensors (sharded above ``max_shard_bytes``) in HF layout.
    A base model's directory loads in ``transformers.AutoModelForCausalLM.from_pretrained``;
    an L2A model's adds its global branches and routers and an ``l2a`` config section, and
    loads back with ``from_hf``. ``dtype`` defaults to the model's parameter dtype."""
    out = Path(out_dir)
    entries = [(*param_to_hf_key(path), var) for path, var in model_parameters(model)]
    save_dtype = write_weights(out, entries, dtype=dtype, max_shard_bytes=max_shard_bytes)
    hf_config = model.cfg.to_hf_dict()
    if model.l2a is not None:
        hf_config["l2a"] = {**model.l2a.to_dict(), "base_architecture": model.cfg.architecture}
        hf_config["architectures"] = ["L2A" + model.cfg.architecture]
    hf_config["dtype"] = save_dtype.name
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    return out
