"""Weights straight from GGUF files, quantized formats kept as they are.

`iter_gguf_weights` reads one GGUF file, or every part of a split one, through the
`gguf` package's memory-mapped reader and yields Hugging Face names with either a torch
tensor (norms, biases, a float embedding) or a `QuantizedTensor` holding the file's
bytes row by row (linear weights: Q4_0, Q8_0, Q4_K ..., and F16/BF16/F32 ones too).
Nothing is dequantized here: that is for the platform, or for `dequantize_linears`
when it has no kernel for a format.

Architectures: GGUF's `llama` (Llama 2/3, Mistral, SmolLM2) and `qwen2`. llama.cpp's
converter reorders the rows of q and k of `llama` files within each head (its rope
pairs dimensions (2i, 2i+1), Hugging Face's (i, i + d/2)); the rows are put back here,
as transformers does for the same architecture. Qwen2 files are written unpermuted.

Every problem with a file (truncated, corrupt, a tensor type heron cannot read, a
tensor name it does not know) is a ValueError naming the file and the tensor.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from heron.logger import get_logger
from heron.quantization import QuantizedTensor, UnsupportedQuantType

logger = get_logger(__name__)

# GGUF architectures whose tensors this reader maps; the value says whether llama.cpp
# permuted the rows of q and k when writing them.
ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False}

# Block formats heron reads: the classic llama.cpp ones, which gguf dequantizes and a
# platform may run. The i-quants (IQ2_XXS ...), ternary and FP4 formats are refused:
# they need lookup grids no heron kernel or load path handles, and dequantizing a large
# i-quant model in numpy at every start would be slower than any user would accept.
QUANTIZED_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)

# GGUF name (without .weight/.bias) -> HF name; {n} is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Tensors some converters add that heron derives from the config instead.
_IGNORED = {"rope_freqs.weight"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, as its header describes it (no data read)."""
    file: Path
    name: str
    type_name: str
    shape: tuple[int, ...]          # torch order: out_features first (GGUF's ne reversed)


def gguf_files(first: str | Path) -> list[Path]:
    """All files of the GGUF model whose first (or only) file is `first`.

    A split model's files are named `<stem>-00001-of-0000N.gguf` ... and are read in
    order; naming a later part, or a part that is missing, is a ValueError."""
    first = Path(first)
    match = _SPLIT.match(first.name)
    if match is None:
        return [first]
    index, count = int(match["index"]), int(match["count"])
    if index != 1:
        raise ValueError(f"{first.name} is part {index} of a split GGUF model; pass its first "
                         f"part, {match['stem']}-00001-of-{match['count']}.gguf")
    files = [first.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf")
             for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{first.name} is split into {count} files, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} missing from {first.parent}")
    return files


def open_reader(path: Path) -> Any:
    """A gguf.GGUFReader over `path`; any failure to parse it is a ValueError naming it
    (and, for a truncated file or an unknown type id, the tensor at fault)."""
    try:
        reader = _reader_class()(path)
    except _BadTensor as e:
        raise ValueError(f"{path.name}: {e}") from e
    except Exception as e:   # gguf raises ValueError, KeyError, struct errors ... on bad bytes
        raise ValueError(f"cannot read {path.name} as a GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    for tensor in reader.tensors:
        if tensor.data.nbytes != int(tensor.n_bytes):
            raise ValueError(f"{path.name}: tensor {tensor.name} ({tensor.tensor_type.name}) "
                             f"is cut short: the file is truncated")
    return reader


class _BadTensor(ValueError):
    """One tensor's header or data is unusable; the message names it."""


@functools.cache
def _reader_class() -> type:
    """gguf's reader, with its failures while mapping tensor data explained: it stops
    with a bare numpy reshape error on a truncated file, or an enum error on an unknown
    type id, neither naming the tensor."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            try:
                super()._build_tensors(start_offs, fields)
            except Exception as e:
                problem = _diagnose(len(self.data), start_offs, fields)
                if problem is None:
                    raise
                raise _BadTensor(problem) from e

    return Reader


def _diagnose(file_size: int, start_offs: int, fields: list) -> str | None:
    """What is wrong with the first bad tensor of a GGUF header, or None if unsure."""
    import gguf

    try:
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                kind = gguf.GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                return f"tensor {name} has type id {int(raw_type[0])}, which is no GGML type"
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > file_size:
                return (f"tensor {name} ({kind.name}) ends at byte {end}, but the file has "
                        f"{file_size} bytes: it is truncated")
    except Exception:   # a gguf version whose header layout differs: no diagnosis
        return None
    return None


def architecture(reader: Any, path: Path) -> str:
    """The file's `general.architecture`, checked against those heron maps."""
    field = reader.get_field("general.architecture")
    if field is None:
        raise ValueError(f"{path.name} has no general.architecture: not a model file")
    arch = str(field.contents())
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path.name} is a {arch!r} model; heron reads GGUF weights of "
                         f"{', '.join(ARCHITECTURES)} (Llama, Mistral, SmolLM2, Qwen2)")
    return arch


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None when it has none."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{suffix}"
    return None


def describe_tensors(paths: Sequence[Path]) -> list[GGUFTensorInfo]:
    """Every tensor of the files, checked (architecture known, type readable, name
    known, data complete) without reading any data: one quick pass before a model
    folder is made from them."""
    infos = []
    for index, (path, reader) in enumerate(_readers(paths)):
        if index == 0:
            architecture(reader, path)
        for tensor in reader.tensors:
            _check(path, tensor)
            infos.append(GGUFTensorInfo(path, tensor.name, tensor.tensor_type.name,
                                        tuple(int(n) for n in reversed(tensor.shape))))
    return infos


def iter_gguf_weights(paths: Sequence[str | Path], hf_config: Any
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(HF name, tensor) for every weight of the GGUF files `paths` (all parts of one
    model, first part first; a single first part also finds the others).

    Norms, biases and a float embedding table come as torch tensors in their own dtype
    (F32, F16, BF16); every other matrix as a QuantizedTensor whose rows are the file's
    bytes, whatever its format (q4_0 ... q6_k, and f16, bf16, f32 too), with q and k
    rows put back in Hugging Face's order for llama files. Data is copied out of the memory map, one
    tensor at a time, so the result outlives the reader. Raises ValueError naming the
    file, the tensor and its type for anything it cannot read."""
    files = [Path(p) for p in paths]
    if len(files) == 1:
        files = gguf_files(files[0])
    permuted = False
    for index, (path, reader) in enumerate(_readers(files)):
        if index == 0:   # only the first part of a split model carries the metadata
            permuted = ARCHITECTURES[architecture(reader, path)]
        for tensor in reader.tensors:
            name = _check(path, tensor)
            if name is None:
                continue
            value = _to_torch(path, tensor)
            if permuted and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
                heads = hf_config.num_attention_heads if ".attn_q." in tensor.name else \
                    (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)
                value = _unpermute(value, heads, path, tensor.name)
            yield name, value


def _readers(paths: Sequence[Path]) -> Iterator[tuple[Path, Any]]:
    for path in paths:
        yield path, open_reader(path)


def _check(path: Path, tensor: Any) -> str | None:
    """The tensor's HF name (None: ignored), after checking its type and name."""
    kind = tensor.tensor_type.name
    if kind not in QUANTIZED_TYPES and kind not in FLOAT_TYPES:
        raise UnsupportedQuantType(
            f"{path.name}: tensor {tensor.name} has type {kind}, which heron cannot read "
            f"(supported: {', '.join(sorted(FLOAT_TYPES))}, {', '.join(sorted(QUANTIZED_TYPES))})")
    if tensor.name in _IGNORED:
        logger.info("%s: ignoring %s (heron derives it from the config)", path.name, tensor.name)
        return None
    name = hf_name(tensor.name)
    if name is None:
        raise ValueError(f"{path.name}: tensor {tensor.name} ({kind}) is not a weight heron "
                         f"knows for this architecture")
    if len(tensor.shape) > 2 or (kind in QUANTIZED_TYPES and len(tensor.shape) != 2):
        raise ValueError(f"{path.name}: tensor {tensor.name} ({kind}) has shape "
                         f"{list(reversed(tensor.shape.tolist()))}; expected a vector or matrix")
    return name


def _to_torch(path: Path, tensor: Any) -> torch.Tensor | QuantizedTensor:
    """A torch tensor for float vectors and a float embedding table; a QuantizedTensor
    of the file's row bytes for every other matrix, float formats included. A fused
    projection (q|k|v, gate|up) may mix an F16 part with quantized ones, and the model
    fuses quantized parts only with quantized parts; dequantization makes them dense
    later wherever no kernel runs them."""
    kind = tensor.tensor_type.name
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = np.array(tensor.data)   # a private copy: the reader's memory map is read-only
    if kind in FLOAT_TYPES and (len(shape) == 1 or tensor.name.startswith("token_embd.")):
        # gguf exposes BF16 as raw bytes (numpy has no bfloat16): reinterpret them.
        if kind == "BF16":
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(data).reshape(shape)
    rows = data.view(np.uint8).reshape(shape[0], -1)
    return QuantizedTensor(kind.lower(), (shape[0], shape[1]), torch.from_numpy(rows),
                           f"{path.name}:{tensor.name}")


def _unpermute(value: torch.Tensor | QuantizedTensor, heads: int, path: Path,
               name: str) -> torch.Tensor | QuantizedTensor:
    """Undo llama.cpp's q/k row order: within each head it stored the rows as
    (pair, 2) where Hugging Face has (2, half); whole rows move, so this works on
    quantized rows without decoding them."""
    rows = value.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{path.name}: tensor {name} has {rows} rows, not a multiple of "
                         f"2 x {heads} heads: the config does not match the file")
    order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
    return value.rows(order) if isinstance(value, QuantizedTensor) else value[order]
