"""Hugging Face checkpoints <-> l2a_jax models.

One key table maps every HF tensor name to a parameter path and a layout transform; both
directions use it. Loading builds the model abstractly, streams tensors one at a time from
memory-mapped safetensors (optionally straight onto a sharding), and reports every unmapped,
missing, duplicate or mis-shaped tensor in one error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from l2a_jax.config import ConfigError, ModelConfig
from l2a_jax.model import QwenModel
from l2a_jax.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    iter_checkpoint_files,
    write_safetensors,
)
from l2a_jax.sharding import ShardingRules


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes; lists every problem."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor is laid out relative to ours.

    ``to_ours(hf_array, our_shape)`` and ``to_hf(our_array)``; ``hf_shape(our_shape)`` lets the
    loader check shapes before converting anything.
    """

    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Layout(lambda a, s: a, lambda a: a, lambda s: s)
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


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def read_hf_config(path: str | Path) -> tuple[Path, ModelConfig]:
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
    return directory, ModelConfig.from_hf_dict(hf_config)


def from_hf(
    path: str | Path,
    dtype=jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    attention_impl: str = "xla",
) -> QwenModel:
    """Loads a local HF Qwen2/Qwen2.5/Qwen3 checkpoint directory into a ``QwenModel``.

    Tensors are read one at a time, converted on the host, cast to ``dtype`` and placed on
    ``mesh`` (sharded by ``rules``) or on the default device.
    """
    directory, cfg = read_hf_config(path)
    rules = rules or ShardingRules()
    abstract = nnx.eval_shape(
        lambda: QwenModel(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(abstract)
    targets = {_dotted(p): v for p, v in nnx.to_flat_state(abstract_state)}

    loaded: dict[str, jax.Array] = {}
    source: dict[str, str] = {}
    problems: list[str] = []
    unreadable = False
    for file in iter_checkpoint_files(directory):
        try:
            reader = SafetensorsFile(file)
        except SafetensorsError as e:
            problems.append(str(e))
            unreadable = True
            continue
        for key in reader.keys():
            mapped = hf_key_to_param(key)
            if mapped is None:
                problems.append(f"unmapped tensor {key} in {file.name}")
                continue
            ours, layout = mapped
            if ours == "lm_head" and cfg.tie_word_embeddings:
                continue  # a tied head may be saved redundantly; the embedding is the weight
            if ours not in targets:
                problems.append(
                    f"unexpected tensor {key} in {file.name}: the config "
                    f"({cfg.architecture}) has no such parameter"
                )
                continue
            if ours in source:
                problems.append(f"duplicate tensor {key} in {file.name} and {source[ours]}")
                continue
            source[ours] = file.name
            var = targets[ours]
            want = layout.hf_shape(tuple(var.shape))
            if reader.shape(key) != want:
                problems.append(f"tensor {key} has shape {reader.shape(key)}, expected {want}")
                continue
            if problems:
                continue  # keep scanning for problems, skip the expensive conversion
            host = layout.to_ours(reader.get(key), tuple(var.shape)).astype(var.dtype)
            if mesh is not None:
                sharding = rules.sharding(var.get_metadata()["axes"], mesh, host.shape)
                loaded[ours] = jax.device_put(host, sharding)
            else:
                loaded[ours] = jnp.asarray(host)
    if unreadable:
        problems.append("tensors of unreadable files are not checked; re-copy those files")
    else:
        missing = sorted(set(targets) - set(source))
        problems += [f"missing tensor {param_to_hf_key(p)[0]}" for p in missing]
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not match its config.json "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    flat = [(p, v.replace(loaded[_dotted(p)])) for p, v in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf(
    model: QwenModel, out_dir: str | Path, *, dtype=None, max_shard_bytes: int = 4 * 1024**3
) -> Path:
    """Writes ``config.json`` and safetensors (sharded above ``max_shard_bytes``) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``dtype`` defaults to the
    model's parameter dtype."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    entries = []
    for path, var in nnx.to_flat_state(state):
        key, layout = param_to_hf_key(_dotted(path))
        entries.append((key, layout, var))
    param_dtype = entries[0][2].dtype
    save_dtype = np.dtype(dtype or param_dtype)

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2].shape)) * save_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    for stale in list(out.glob("model*.safetensors")) + list(
        out.glob("model.safetensors.index.json")
    ):
        stale.unlink()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = [
            (key, layout.to_hf(np.asarray(jax.device_get(var[...]))).astype(save_dtype))
            for key, layout, var in shard
        ]
        write_safetensors(out / name, tensors)
        weight_map.update({key: name for key, _, _ in shard})
    if len(shards) > 1:
        total = sum(int(np.prod(v.shape)) * save_dtype.itemsize for _, _, v in entries)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    hf_config = model.cfg.to_hf_dict()
    hf_config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
        save_dtype.name
    ]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    return out
