"""Reading and writing Hugging Face checkpoint directories one tensor at a time (safetensors, sharded or not).

    reader = TensorReader(directory)      # model.safetensors, or model.safetensors.index.json + its shards
    array = reader.get("model.embed_tokens.weight")        # float32 numpy, read only now
    with ShardedWriter(directory, max_shard_bytes=5 << 30) as writer:
        writer.add("lm_head.weight", array)                  # written out shard by shard

Only the `safetensors` package is needed (numpy arrays; bfloat16 tensors through its flax reader), no torch;
every tensor is returned as float32.
"""

from __future__ import annotations

import json
import pathlib
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors  # noqa: F401
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise ImportError("moe_jax.convert needs the safetensors package: pip install safetensors "
                          "(or pip install -r requirements-test.txt)") from None
    return safetensors


class TensorReader:
    """The tensors of an HF directory by name, each read from its file only when asked for."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index}: not a safetensors index (no readable 'weight_map': {error})") from None
            self._file_of = {name: self.directory / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in self._file_of.values() if not f.exists()})
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        elif single.exists():
            self._file_of = None
            self._single = single
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
            hint = (f"; it holds {others}: PyTorch pickles are not read, save with safe_serialization (the default)"
                    if others else "")
            raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._handles = {}

    def _handle(self, path: pathlib.Path, framework: str = "numpy"):
        if (path, framework) not in self._handles:
            self._handles[path, framework] = _safetensors().safe_open(str(path), framework=framework)
        return self._handles[path, framework]

    def _path(self, name: str) -> pathlib.Path:
        if self._file_of is None:
            return self._single
        if name not in self._file_of:
            raise KeyError(name)
        return self._file_of[name]

    def names(self) -> list[str]:
        if self._file_of is not None:
            return sorted(self._file_of)
        return sorted(self._handle(self._single).keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._path(name)).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as float32; KeyError naming it and the directory when it is not there."""
        try:
            path = self._path(name)
            handle = self._handle(path)
            if name not in handle.keys():
                raise KeyError(name)
        except KeyError:
            raise KeyError(f"{self.directory}: no tensor {name!r} in the checkpoint") from None
        if handle.get_slice(name).get_dtype() in NUMPY_LACKS:
            # numpy has no bfloat16 / float8: the flax reader returns them as jax arrays.
            return np.asarray(self._handle(path, "flax").get_tensor(name).astype("float32"))
        return np.asarray(handle.get_tensor(name), dtype=np.float32)

    def close(self) -> None:
        self._handles.clear()


NUMPY_LACKS = ("BF16", "F8_E4M3", "F8_E5M2")


class ShardedWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` (one file
    `model.safetensors` when everything fits), with `model.safetensors.index.json` when there are several."""

    def __init__(self, directory: str | pathlib.Path, *, max_shard_bytes: int = 5 << 30):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self._total_bytes += array.nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        _safetensors().numpy.save_file(self._pending, str(self.directory / f"shard-{index}.tmp"),
                                       metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self.directory / "shard-0.tmp").rename(self.directory / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i}.tmp").rename(self.directory / file)
            weight_map.update({name: file for name in names})
        (self.directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
