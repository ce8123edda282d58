"""Build a registered model from a Hugging Face folder (config.json + .safetensors), or
from a GGUF model's folder (config.json + a marker naming the GGUF files; see
heron/models/gguf_file.py), whose weights may stay quantized."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

import torch
from torch import nn

from heron.distributed import TensorParallelGroup
from heron.logger import get_logger
from heron.models.gguf_file import gguf_weight_files
from heron.models.registry import ModelRegistry
from heron.models.tensor_parallel import (reduce_row_parallel_outputs, shard_config, shard_vocab,
                                          shard_weights, tensor_parallel_problems)
from heron.quantization import QuantizedTensor, dequantize_linears

logger = get_logger(__name__)

EXPECTED = "a Hugging Face model folder with config.json and .safetensors weights"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for inference, with the config and dtype it was built from.

    `hf_config` is the checkpoint's; `shard_config` the one this rank's model was built
    from (the same object without tensor parallelism): its head counts size the KV cache."""
    model: nn.Module
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    shard_config: Any = None

    def __post_init__(self) -> None:
        if self.shard_config is None:
            self.shard_config = self.hf_config


def load_model(model_dir: str, dtype: str = "auto", device: torch.device | str = "cpu",
               group: TensorParallelGroup | None = None,
               keep_quantized: Collection[str] = ()) -> LoadedModel:
    """Load the model in `model_dir` in eval mode on `device`; with a tensor-parallel
    `group` of several ranks, this rank's shard of it (see heron.models.tensor_parallel).

    `dtype` is auto|float32|float16|bfloat16; auto takes the config's dtype
    (float32 when the config names none). A GGUF model's quantized linear layers stay
    QuantizedLinear when all their formats are in `keep_quantized` (those a platform
    has kernels for) and become dense nn.Linear layers otherwise. Raises
    FileNotFoundError/ValueError with the offending path for a bad folder or GGUF file,
    and the registry's ValueError for an unsupported architecture or a split the model
    does not allow.
    """
    group = group or TensorParallelGroup.single()
    folder = _check_folder(model_dir)
    files, gguf = _weight_files(folder)   # before the config: fail fast on a weightless folder
    hf_config = _read_config(folder)
    model_cls = ModelRegistry.resolve(list(getattr(hf_config, "architectures", None) or []))
    problems = tensor_parallel_problems(hf_config, model_cls, group.world_size)
    if problems:
        raise ValueError("; ".join(problems))
    torch_dtype = resolve_dtype(dtype, hf_config)
    device = torch.device(device)
    local_config = shard_config(hf_config, group)
    # Build on the meta device and materialise uninitialised storage: random
    # initialisation of weights that are overwritten anyway costs seconds per GB.
    # (Linear layers that load quantized get a dense buffer here too, released when
    # load_weights swaps them; on the CPU its untouched pages are never committed.)
    with torch.device("meta"):
        model = model_cls(local_config, torch_dtype)
        shard_vocab(model, hf_config, group)
    model.to_empty(device=device)
    weights = _iter_weights(files, gguf, hf_config, group)
    model.load_weights(shard_weights(weights, hf_config, group))
    reduce_row_parallel_outputs(model, group)
    if dequantize_linears(model, keep_quantized):
        model.to(device)   # the dense weights are made on the CPU
    model.eval().requires_grad_(False)
    max_len = _max_model_len(hf_config)
    logger.info("loaded %s from %s (%s, %s, max_model_len %d%s)", model_cls.__name__,
                files[0] if gguf else folder, torch_dtype, device, max_len,
                f", rank {group.rank} of {group.world_size}" if group.world_size > 1 else "")
    return LoadedModel(model=model, hf_config=hf_config, dtype=torch_dtype, max_model_len=max_len,
                       shard_config=local_config)


def _iter_weights(files: list[Path], gguf: bool, hf_config: Any, group: TensorParallelGroup
                  ) -> Iterable[tuple[str, torch.Tensor | QuantizedTensor]]:
    if not gguf:
        return iter_safetensors(files)
    from heron.models.gguf_weights import iter_gguf_weights

    weights = iter_gguf_weights(files, hf_config)
    if group.world_size == 1:
        return weights
    # Column-parallel shards take whole rows, which quantized tensors allow, but
    # row-parallel ones (o_proj, down_proj) cut every row's inputs, through its blocks,
    # and vocabulary shards pad with zero rows. Until sharding handles block formats,
    # every weight is dequantized before it is split: it runs, just not quantized.
    logger.warning("tensor parallelism: the GGUF weights of %s are dequantized before "
                   "sharding (quantized shards are not supported yet)", files[0].name)
    return ((name, t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t)
            for name, t in weights)


@dataclass
class ModelDescription:
    """What a model folder holds, read without loading weights (`weight_files`: its
    safetensors, or for a GGUF model's folder the GGUF files)."""
    folder: Path
    weight_files: list[Path]
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    model_cls: type


def describe_model(model_dir: str, dtype: str = "auto") -> ModelDescription:
    """Check `model_dir` and read its config (same errors as `load_model`); no weights load."""
    folder = _check_folder(model_dir)
    files, _ = _weight_files(folder)
    hf_config = _read_config(folder)
    model_cls = ModelRegistry.resolve(list(getattr(hf_config, "architectures", None) or []))
    return ModelDescription(folder, files, hf_config, resolve_dtype(dtype, hf_config),
                            _max_model_len(hf_config), model_cls)


def resolve_dtype(dtype: str, hf_config: Any) -> torch.dtype:
    """The torch dtype for a user's `dtype` string, reading the config for `auto`."""
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"unsupported dtype {dtype!r}: use one of auto, {', '.join(_DTYPES)}")
    # transformers 5.x names it `dtype`, 4.x `torch_dtype`; either may be a str or a torch.dtype.
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if value is None:
        return torch.float32
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        logger.warning("config dtype %s is not supported; using float32", name)
        return torch.float32
    return _DTYPES[name]


def _weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The folder's weight files, and whether they are GGUF files."""
    gguf = gguf_weight_files(folder)
    return (gguf, True) if gguf is not None else (safetensors_files(folder), False)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, else all."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names weight files that are missing: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".gguf"})
        hint = f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}{hint}; expected {EXPECTED}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, read lazily one at a time on the CPU."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _check_folder(model_dir: str) -> Path:
    folder = Path(model_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model path {model_dir!r} does not exist; expected {EXPECTED}")
    if not folder.is_dir():
        raise ValueError(f"model path {model_dir!r} is a file; expected {EXPECTED}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir!r}; expected {EXPECTED}")
    return folder


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot read {folder / 'config.json'}: {e}") from e


def _max_model_len(hf_config: Any) -> int:
    max_len = int(hf_config.max_position_embeddings)
    # Attention backends attend over the whole context. Up to the sliding window
    # that is the same thing, so a sliding-window model (Mistral v0.1) is capped there.
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and window < max_len:
        logger.info("capping max_model_len from %d to the sliding window %d", max_len, window)
        max_len = int(window)
    return max_len
