"""Model weights on disk <-> model state, streaming one tensor at a time.

``load_weights`` builds a model abstractly, maps each stored tensor name to a parameter path
(through the caller's mapper: the HF key table), converts it on the host, and places it on the
default device or a sharding. Every unmapped, unexpected, duplicate, mis-shaped or missing
tensor is collected and reported in one ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from l2a_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from l2a_jax.sharding import ShardingRules


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes; lists every problem."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a stored tensor is laid out relative to ours.

    ``to_ours(stored, our_shape)`` and ``to_stored(ours)``; ``stored_shape(our_shape)`` lets the
    loader check shapes before converting anything.
    """

    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_stored: Callable[[np.ndarray], np.ndarray]
    stored_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Layout(lambda a, s: a, lambda a: a, lambda s: s)
SKIP = ("", SAME)  # a mapper's answer for a tensor to ignore


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_parameters(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    """(dotted path, variable) for every parameter, in a stable order."""
    _, state = nnx.split(model)
    return [(dotted(path), var) for path, var in nnx.to_flat_state(state)]


def load_weights(
    build: Callable[[], nnx.Module],
    files: Iterable[Path],
    mapper: Callable[[str], tuple[str, Layout] | None],
    stored_name: Callable[[str], str],
    *,
    description: str,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> nnx.Module:
    """The model ``build()`` describes, filled from ``files``.

    ``mapper(stored key)`` gives (parameter path, layout), ``SKIP``, or None for an unmapped
    key; ``stored_name(path)`` names a missing parameter in the stored vocabulary.
    """
    rules = rules or ShardingRules()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    targets = {dotted(p): v for p, v in nnx.to_flat_state(abstract_state)}
    loaded: dict[str, jax.Array] = {}
    source: dict[str, str] = {}
    problems: list[str] = []
    unreadable = False
    for file in files:
        try:
            reader = SafetensorsFile(file)
        except SafetensorsError as e:
            problems.append(str(e))
            unreadable = True
            continue
        for key in reader.keys():
            mapped = mapper(key)
            if mapped is None:
                problems.append(f"unmapped tensor {key} in {file.name}")
                continue
            if mapped is SKIP:
                continue
            ours, layout = mapped
            if ours not in targets:
                problems.append(
                    f"unexpected tensor {key} in {file.name}: the config has no such parameter"
                )
                continue
            if ours in source:
                problems.append(f"duplicate tensor {key} in {file.name} and {source[ours]}")
                continue
            source[ours] = file.name
            var = targets[ours]
            want = layout.stored_shape(tuple(var.shape))
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
        problems += [f"missing tensor {stored_name(p)}" for p in sorted(set(targets) - set(source))]
    if problems:
        raise CheckpointError(
            f"{description} ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    flat = [(p, v.replace(loaded[dotted(p)])) for p, v in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def write_weights(
    out: Path,
    entries: list[tuple[str, Layout, nnx.Variable]],
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 1024**3,
) -> np.dtype:
    """Writes (stored name, layout, variable) as ``model.safetensors`` or numbered shards with
    an index, replacing any weights already there. Returns the dtype written."""
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = np.dtype(dtype or entries[0][2].dtype)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2].shape)) * save_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = [
            (key, layout.to_stored(np.asarray(jax.device_get(var[...]))).astype(save_dtype))
            for key, layout, var in shard
        ]
        write_safetensors(out / name, tensors)
        weight_map.update({key: name for key, _, _ in shard})
    if len(shards) > 1:
        total = sum(int(np.prod(v.shape)) * save_dtype.itemsize for _, _, v in entries)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return save_dtype
