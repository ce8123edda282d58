"""heron model -> OpenVINO IR with paged attention, cached on disk.

The model is heron's own torch model (the same file the cpu platform runs),
traced once with the tracing attention backend so that every attention layer
becomes OpenVINO's PagedAttention node. The IR's inputs are the step's flat
batch, the paged-attention metadata, the rows whose logits are wanted, and
one key and one value cache per layer; its output is float32 logits at those rows.
The IR is saved under the cache directory, keyed by the model files, dtype and
the OpenVINO, torch and converter versions, so later runs skip loading torch
weights, tracing and converting (a 135M model: ~7 s -> ~0.1 s). Compiled models
are not cached: OpenVINO 2026.4 crashes importing a compiled model that holds
PagedAttention nodes, and compiling takes about a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.layer_ops import LayerOps
from heron.kernels.openvino_attention import (OpenVinoTracingAttention, PagedAttentionInputs,
                                              conversion_extension, read_paged_model)
from heron.logger import get_logger
from heron.models.loader import ModelDescription, load_model

logger = get_logger(__name__)

# Bump when the traced graph changes, so that stale IRs are not reused.
CONVERTER_VERSION = 1

STEP_INPUTS = ("input_ids", "positions", "past_lens", "subsequence_begins", "block_indices",
               "block_indices_begins", "max_context_len", "logits_indices")


def key_cache_name(layer: int) -> str:
    return f"key_cache.{layer}"


def value_cache_name(layer: int) -> str:
    return f"value_cache.{layer}"


@dataclass(frozen=True)
class ConvertedModel:
    """The OpenVINO model and the attention sizes the runner needs."""
    model: Any
    num_layers: int
    num_kv_heads: int
    head_size: int
    from_cache: bool = False

    def weights_bytes(self) -> int:
        return sum(int(op.get_byte_size()) for op in self.model.get_ordered_ops()
                   if op.get_type_name() == "Constant")


class _PagedModel(nn.Module):
    """Wraps a heron model into the signature of the IR (see the module docstring)."""

    def __init__(self, model: nn.Module, num_heads: int, num_kv_heads: int, head_size: int,
                 num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.backend = OpenVinoTracingAttention(num_heads, num_kv_heads, head_size,
                                                head_size ** -0.5)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, past_lens: torch.Tensor,
                subsequence_begins: torch.Tensor, block_indices: torch.Tensor,
                block_indices_begins: torch.Tensor, max_context_len: torch.Tensor,
                logits_indices: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        meta = PagedAttentionInputs(past_lens, subsequence_begins, block_indices,
                                    block_indices_begins, max_context_len)
        pairs = [(caches[2 * i], caches[2 * i + 1]) for i in range(self.num_layers)]
        # Plain-torch layer ops: OpenVINO fuses the element-wise work itself.
        context = ForwardContext(meta, pairs, self.backend, LayerOps())  # type: ignore[arg-type]
        with set_forward_context(context):
            hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden[logits_indices]).float()


def ir_cache_key(description: ModelDescription) -> str:
    """Changes whenever the weights, the dtype or the converter could change the IR."""
    import openvino

    h = hashlib.sha256()
    parts = {"converter": CONVERTER_VERSION, "sources": _model_sources_digest(),
             "openvino": openvino.__version__,
             "torch": torch.__version__, "dtype": str(description.dtype),
             "config": (description.folder / "config.json").read_text()}
    for f in description.weight_files:
        stat = f.stat()
        parts[f"weights:{f.name}"] = f"{stat.st_size}:{stat.st_mtime_ns}"
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _model_sources_digest() -> str:
    """Digest of the heron sources a traced graph depends on (models, attention, this file)."""
    import heron.kernels.openvino_attention as attention
    import heron.models as models

    files = sorted(Path(models.__file__).parent.glob("*.py")) + [Path(attention.__file__),
                                                                 Path(__file__)]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def convert(description: ModelDescription, cache_dir: Path, core: Any) -> ConvertedModel:
    """`description`'s model as an OpenVINO model with paged attention: read from the IR
    cache, or traced and converted now and saved there. A cached IR that cannot be read is
    converted again; a cache that cannot be written only costs the next start its speed."""
    cfg = description.hf_config
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    num_layers = cfg.num_hidden_layers
    xml = cache_dir / ir_cache_key(description) / "model.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            model = read_paged_model(core, str(xml), num_kv_heads, head_size)
        except RuntimeError as e:
            logger.warning("cached OpenVINO IR %s is unreadable (%s); converting again",
                           xml, str(e).strip().splitlines()[-1] if str(e).strip() else e)
        else:
            logger.info("OpenVINO IR from the cache: %s", xml)
            return ConvertedModel(model, num_layers, num_kv_heads, head_size, from_cache=True)
    model = _trace_and_convert(description, num_heads, num_kv_heads, head_size, num_layers)
    try:
        _save(model, xml)
        logger.info("converted %s to OpenVINO IR %s", description.folder, xml)
    except (OSError, RuntimeError) as e:
        logger.warning("cannot save the OpenVINO IR under %s (%s): every start will convert "
                       "again; set HERON_OPENVINO_CACHE_DIR to a writable folder", xml.parent, e)
    return ConvertedModel(model, num_layers, num_kv_heads, head_size)


def _trace_and_convert(description: ModelDescription, num_heads: int, num_kv_heads: int,
                       head_size: int, num_layers: int) -> Any:
    loaded = load_model(str(description.folder), _dtype_name(description.dtype), "cpu")
    wrapper = _PagedModel(loaded.model, num_heads, num_kv_heads, head_size, num_layers).eval()
    example = _example_inputs(num_layers, num_kv_heads, head_size, description.dtype)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer warnings about the placeholder op
        wrapper(*example)   # builds lazy tables (rotary cos|sin) before the trace sees them
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        model = _convert_traced(traced)
    _name_inputs(model, num_layers)
    return model


def _save(model: Any, xml: Path) -> None:
    """Write the IR so that a reader never sees half of it: the .xml is renamed last."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f"model.{os.getpid()}.tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)


def _convert_traced(traced: torch.jit.ScriptModule) -> Any:
    """TorchScript -> ov.Model through the PyTorch frontend itself (`openvino.convert_model`
    would add a telemetry subprocess to every conversion)."""
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    frontend = FrontEndManager().load_by_framework("pytorch")
    frontend.add_extension(conversion_extension())
    # shared_memory=False: constants get their own copy of the weights; shared ones would
    # point into torch tensors that are freed once the conversion returns.
    decoder = TorchScriptPythonDecoder(traced, shared_memory=False)  # must outlive the conversion
    model = frontend.convert(frontend.load(decoder))
    del decoder
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _example_inputs(num_layers: int, num_kv_heads: int, head_size: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two sequences of 3 and 2 tokens, the second with 4 cached: only for tracing."""
    i32 = dict(dtype=torch.int32)
    step = (torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 4, 5]),
            torch.tensor([0, 4], **i32), torch.tensor([0, 3, 5], **i32),
            torch.tensor([0, 1], **i32), torch.tensor([0, 1, 2], **i32),
            torch.tensor(6, **i32), torch.tensor([2, 4]))
    cache = torch.zeros(2, num_kv_heads, 32, head_size, dtype=dtype)
    return step + tuple(cache for _ in range(2 * num_layers))


def _name_inputs(ov_model: Any, num_layers: int) -> None:
    """Stable input names, by position (the trace names *caches arbitrarily); the caches get
    a dynamic element type and shape, which the device fixes at compile time."""
    import openvino as ov

    names = list(STEP_INPUTS)
    for layer in range(num_layers):
        names += [key_cache_name(layer), value_cache_name(layer)]
    params = ov_model.get_parameters()
    if len(params) != len(names):
        raise RuntimeError(f"traced model has {len(params)} inputs, expected {len(names)}")
    for param, name in zip(params, names):
        param.set_friendly_name(name)
        param.output(0).set_names({name})
        if "cache" in name:
            param.set_element_type(ov.Type.dynamic)
            param.set_partial_shape(ov.PartialShape.dynamic(4))
    ov_model.validate_nodes_and_infer_types()
