"""Minimal safetensors reader/writer over memory maps.

Reading maps the file and returns zero-copy numpy views one tensor at a time (bf16 through
``ml_dtypes``), so loading a checkpoint never needs more host memory than its largest tensor.
Writing holds one output shard in memory at a time.
The format: 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as such."""


class SafetensorsFile:
    """Lazily readable safetensors file: ``keys()``, ``shape(k)``, ``get(k)`` (a numpy view)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(
                    f"{self.path} is corrupt or truncated: no safetensors header"
                )
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise SafetensorsError(
                    f"{self.path} is corrupt or truncated: header longer than the file"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(
                    f"{self.path} is corrupt or truncated: header is not JSON ({e})"
                ) from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._data_start = 8 + header_len
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise SafetensorsError(
                    f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}"
                )
            begin, end = entry["data_offsets"]
            expected = (
                int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPES[entry["dtype"]].itemsize
            )
            if end - begin != expected or self._data_start + end > size:
                raise SafetensorsError(
                    f"{self.path} is corrupt or truncated: tensor {name} does not fit its offsets"
                )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._header[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_safetensors(
    path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None
) -> None:
    """Writes (name, array) pairs as one safetensors file readable by transformers."""
    items = list(tensors)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, arr in items:
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name}: dtype {arr.dtype} cannot be written")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())


def iter_checkpoint_files(directory: Path) -> Iterator[Path]:
    """The safetensors files of a (possibly sharded) HF checkpoint directory, in index order."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard files that are not in {directory}: {missing}; "
                "copy the complete checkpoint"
            )
        yield from (directory / n for n in names)
        return
    single = directory / "model.safetensors"
    if single.exists():
        yield single
        return
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no safetensors weights in {directory}: expected model.safetensors or "
            "model.safetensors.index.json with its shards (convert .bin checkpoints with "
            "transformers' save_pretrained(safe_serialization=True))"
        )
    yield from found
