"""What weight-only quantized CPU matmul already exists with this torch, and how fast it is.

    flock /tmp/heron-cpu.lock ~/.venvs/torchao/bin/python benchmarks/quantized_matmul_peers.py --model smollm2
    flock /tmp/heron-cpu.lock ~/.venvs/torchao/bin/python benchmarks/quantized_matmul_peers.py --model qwen0.5b

The peers heron's own quantized linear kernels must beat. For every linear shape of
the model (fused qkv, o, fused gate|up, down, lm_head) at M = 1 (a decode step) and
M = 64 (a prefill chunk) rows it times, as the median of many calls on `--threads`
threads:

  torch float32 / bfloat16 F.linear          the dense baselines
  aten _weight_int8pack_mm                   int8 per output channel, bf16 activations
  aten _weight_int4pack_mm_for_cpu g32/g128  int4 asymmetric per group (tinygemm layout)
  torchao configs (when the running python has torchao; it is not a heron dependency,
  so use a separate venv: python3 -m venv ~/.venvs/torchao &&
  ~/.venvs/torchao/bin/pip install torch==2.13.0 torchao)

and prints, per method, microseconds per shape (the fastest of `--repeats` medians), the whole-model sum (each layer shape
times the number of layers, plus the lm_head once), and two errors as relative L2
norms: `kern` against float32 math on the weight the method really multiplies by (its
own dequantized weight, activations rounded as it rounds them): the kernel's own error;
`quant` against the original float32 weight: what the format costs. A method that
fails is listed with its error instead of numbers: on an AVX2 CPU without the optional
torchao C++ kernels several of them do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    per_token: int        # how many of it one token passes through (layers, or 1 for lm_head)


def llama_like_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                      vocab: int, layers: int) -> list[LinearShape]:
    """The linear layers of a Llama/Qwen2 decoder as a fused-weight engine runs them."""
    qkv = (heads + 2 * kv_heads) * head_dim
    return [LinearShape("qkv", hidden, qkv, layers),
            LinearShape("o", heads * head_dim, hidden, layers),
            LinearShape("gate|up", hidden, 2 * intermediate, layers),
            LinearShape("down", intermediate, hidden, layers),
            LinearShape("lm_head", hidden, vocab, 1)]


MODELS: dict[str, list[LinearShape]] = {
    "smollm2": llama_like_shapes(576, 1536, 9, 3, 64, 49152, 30),       # SmolLM2-135M
    "qwen0.5b": llama_like_shapes(896, 4864, 14, 2, 64, 151936, 24),    # Qwen2.5-0.5B
}


@dataclass
class Prepared:
    """A method set up on one weight: the call to time and the weight it really uses."""
    run: Callable[[torch.Tensor], torch.Tensor]   # x (M, K) -> y (M, N)
    x_dtype: torch.dtype                          # activations are given in this dtype
    w_used: torch.Tensor                          # float32 (N, K): its dequantized weight


Method = Callable[[torch.Tensor], Prepared]       # float32 weight (N, K) -> Prepared


class NotApplicable(Exception):
    """The method cannot take this shape at all (e.g. K is not a multiple of its group):
    an "n/a" cell, not a failure of the method."""


# ---- torch built-ins ---------------------------------------------------------------

def dense(dtype: torch.dtype) -> Method:
    def prepare(w: torch.Tensor) -> Prepared:
        wd = w.to(dtype).contiguous()
        return Prepared(lambda x: F.linear(x, wd), dtype, wd.float())
    return prepare


def aten_int8(w: torch.Tensor) -> Prepared:
    """Symmetric int8 per output channel; the scale in bf16, as the kernel wants it."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return Prepared(lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale),
                    torch.bfloat16, q.float() * scale.float()[:, None])


def aten_int4(group: int) -> Method:
    """Asymmetric 4-bit per group of `group` inputs in the tinygemm layout: the kernel
    computes (q - 8) * scale + zero, so zero = min + 8 * scale maps q = 0 to the minimum."""
    def prepare(w: torch.Tensor) -> Prepared:
        n, k = w.shape
        if k % group:
            raise NotApplicable(f"K={k} is not a multiple of group {group}")
        g = w.reshape(n, k // group, group)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
        scale_b = scale.to(torch.bfloat16)
        zero_b = (lo + 8 * scale).to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)
        # (K/group, N, 2): scale and zero per group, transposed to the kernel's order.
        scale_zero = torch.stack([scale_b, zero_b], dim=2).transpose(0, 1).contiguous()
        w_used = ((q - 8) * scale_b.float()[..., None] + zero_b.float()[..., None]).reshape(n, k)
        return Prepared(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero),
                        torch.bfloat16, w_used)
    return prepare


# ---- heron's own kernels ----------------------------------------------------------

def heron_quant(bits: int) -> Method:
    """heron's cpu_quant.c on heron's int8 (per channel) or int4 (groups of 32) weights;
    activations bf16 as the engine runs them."""
    def prepare(w: torch.Tensor) -> Prepared:
        from heron.kernels.cpu_quant import CpuQuantLinear
        from heron.quantization import QuantizedLinear
        from heron.quantization.weight_only import quantize_int4, quantize_int8
        n, k = w.shape
        if k % 32:
            raise NotApplicable(f"K={k} is not a multiple of 32")
        layer = QuantizedLinear(k, n, None, torch.bfloat16)
        layer.set_part(0, (quantize_int8 if bits == 8 else quantize_int4)(w, "w"))
        kernel = CpuQuantLinear(layer, torch.bfloat16)
        return Prepared(kernel, torch.bfloat16, layer.dequantized_weight(torch.float32))
    return prepare


def heron_bf16(w: torch.Tensor) -> Prepared:
    """heron's batch-invariant bf16 linear (cpu_gemm.c), what the engine runs unquantized."""
    from heron.kernels.cpu_linear import InvariantLinear
    wd = w.to(torch.bfloat16)
    return Prepared(InvariantLinear(wd, None), torch.bfloat16, wd.float())


# ---- torchao ---------------------------------------------------------------------

def torchao_config(make_config: Callable[[], object]) -> Method:
    """Quantize a bf16 nn.Linear with a torchao config; its F.linear is the call timed."""
    def prepare(w: torch.Tensor) -> Prepared:
        from torchao.quantization import quantize_
        n, k = w.shape
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        quantize_(lin, make_config())
        weight = lin.weight
        if type(weight) in (torch.Tensor, torch.nn.Parameter):
            # torchao skips (with a log line) shapes its layout cannot take, e.g. K % group.
            raise NotApplicable(f"quantize_ left the {k}-input weight unquantized")
        return Prepared(lambda x: F.linear(x, weight), torch.bfloat16, _torchao_dequantized(weight, k))
    return prepare


def _torchao_dequantized(weight: torch.Tensor, k: int) -> torch.Tensor:
    try:
        return weight.dequantize().float()
    except Exception:  # noqa: BLE001 - not every torchao tensor implements it
        # The identity through the layer gives W^T, rounded once to bf16 on output.
        return F.linear(torch.eye(k, dtype=torch.bfloat16), weight).float().t().contiguous()


def torchao_methods() -> list[tuple[str, Method]]:
    try:
        import torchao  # noqa: F401
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8DynamicActivationIntxWeightConfig, Int8WeightOnlyConfig,
                                          IntxWeightOnlyConfig)
        from torchao.quantization.granularity import PerGroup
    except ImportError as exc:
        print(f"# torchao rows skipped: {exc}", file=sys.stderr)
        return []
    methods = [
        ("ao int8 weight-only", lambda: Int8WeightOnlyConfig()),
        ("ao int4 weight-only plain", lambda: Int4WeightOnlyConfig(group_size=128)),
        ("ao int4 wo tile_packed_4d", lambda: Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d")),
        ("ao intx int4 wo g32 unpacked", lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32))),
        ("ao int8 dyn-act int8 w", lambda: Int8DynamicActivationInt8WeightConfig()),
        ("ao int8 dyn-act int4 w opaque", lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32),
            intx_packing_format="opaque_torchao_auto")),
    ]
    try:  # the CPU int4 layout lives in the prototype namespace in torchao 0.14+
        from torchao.prototype.quantization.int4 import (Int8DynamicActivationInt4WeightConfig,
                                                         PrototypeInt4WeightOnlyConfig)
        methods += [
            ("ao int4 wo opaque(CPU) g32", lambda: PrototypeInt4WeightOnlyConfig(group_size=32)),
            ("ao int4 wo opaque(CPU) g128", lambda: PrototypeInt4WeightOnlyConfig(group_size=128)),
            ("ao da8w4 (CPU) g32", lambda: Int8DynamicActivationInt4WeightConfig(group_size=32)),
        ]
    except ImportError as exc:
        print(f"# torchao CPU int4 rows skipped: {exc}", file=sys.stderr)
    return [(name, torchao_config(make)) for name, make in methods]


def all_methods(with_torchao: bool) -> list[tuple[str, Method]]:
    methods: list[tuple[str, Method]] = [
        ("torch f32 F.linear", dense(torch.float32)),
        ("torch bf16 F.linear", dense(torch.bfloat16)),
        ("aten int8pack_mm (per-ch)", aten_int8),
        ("aten int4pack_mm_cpu g32", aten_int4(32)),
        ("aten int4pack_mm_cpu g128", aten_int4(128)),
        ("heron bf16 (cpu_gemm.c)", heron_bf16),
        ("heron int8 (cpu_quant.c)", heron_quant(8)),
        ("heron int4 g32 (cpu_quant.c)", heron_quant(4)),
    ]
    return methods + (torchao_methods() if with_torchao else [])


# ---- measuring -------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], budget: float, min_calls: int = 7) -> float:
    """Median wall time of one call, over as many calls as fit in `budget` seconds."""
    for _ in range(3):
        fn()
    times: list[float] = []
    end = time.perf_counter() + budget
    while len(times) < min_calls or (time.perf_counter() < end and len(times) < 5000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@dataclass
class Result:
    us: dict[tuple[str, int], float | None]   # (shape name, M) -> microseconds; None: n/a
    kernel_err: float                     # worst over shapes, vs its own dequantized weight
    quant_err: float                      # worst over shapes, vs the original float32 weight
    error: str | None = None
    not_applicable: list[str] | None = None


def measure(method: Method, shapes: list[LinearShape], rows: list[int], budget: float,
            compile_: bool = False) -> Result:
    """Times one method on every shape and row count; stops at its first failure."""
    result = Result({}, 0.0, 0.0)
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        # Real checkpoints have weights of this order; the errors are relative anyway.
        w = torch.randn(shape.out_features, shape.in_features, generator=gen) * 0.02
        x64 = torch.randn(max(rows), shape.in_features, generator=gen)
        try:
            try:
                prep = method(w)
            except NotApplicable as why:
                result.us.update({(shape.name, m): None for m in rows})
                result.not_applicable = (result.not_applicable or []) + [f"{shape.name}: {why}"]
                continue
            if compile_:
                # torchao's own advice on CPU: inductor fuses the dequantization into the matmul.
                prep.run = torch.compile(prep.run, dynamic=False)
            x_all = x64.to(prep.x_dtype)
            y = prep.run(x_all)
            exact_x = x_all.float()
            result.kernel_err = max(result.kernel_err, rel_l2(y, exact_x @ prep.w_used.t()))
            result.quant_err = max(result.quant_err, rel_l2(y, x64 @ w.t()))
            for m in rows:
                x = x_all[:m].contiguous()
                with torch.no_grad():
                    result.us[(shape.name, m)] = median_seconds(lambda: prep.run(x), budget) * 1e6
        except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
            result.error = f"{shape.name} {shape.in_features}x{shape.out_features}: " \
                           f"{type(exc).__name__}: {_first_line(exc)}"
            return result
        finally:
            prep = None  # noqa: F841 - free this shape's weights before the next (lm_head is big)
    return result


def best_of(runs: list[Result]) -> Result:
    """Per cell the fastest of several rounds: other processes on a shared machine only
    ever make a call slower, so the minimum of the medians is the least disturbed."""
    first = runs[0]
    if first.error or any(r.error for r in runs):
        return next(r for r in runs if r.error)
    us = {key: None if value is None else min(r.us[key] for r in runs) for key, value in first.us.items()}
    return Result(us, first.kernel_err, first.quant_err, None, first.not_applicable)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:160]


# ---- reporting -------------------------------------------------------------------

def print_tables(model: str, shapes: list[LinearShape], rows: list[int],
                 results: dict[str, Result]) -> None:
    name_w = max(len(n) for n in results) + 1
    for m in rows:
        what = "decode token" if m == 1 else f"{m}-token chunk"
        print(f"\n## {model}, M = {m}: microseconds per call (median); model = sum over "
              f"layers x shapes + lm_head, ms per {what}")
        head = "".join(f"{f'{s.name} {s.in_features}x{s.out_features}':>20}" for s in shapes)
        print(f"{'method':<{name_w}}{head}{'model ms':>10}{'vs bf16':>8}{'kern err':>10}{'quant err':>10}")
        base = _model_ms(results.get("torch bf16 F.linear"), shapes, m)
        for name, res in results.items():
            if res.error:
                continue
            cells = "".join(f"{_cell(res.us[(s.name, m)]):>20}" for s in shapes)
            total = _model_ms(res, shapes, m)
            ratio = f"{base / total:>7.2f}x" if base and total else f"{'':>8}"
            print(f"{name:<{name_w}}{cells}{_cell(total, '.2f'):>10}{ratio}"
                  f"{res.kernel_err:>10.1e}{res.quant_err:>10.1e}")
    skipped = {n: r.not_applicable for n, r in results.items() if r.not_applicable and not r.error}
    if skipped:
        print("\n## n/a cells")
        for name, why in skipped.items():
            print(f"{name:<{name_w}}{'; '.join(why)}")
    failed = {n: r.error for n, r in results.items() if r.error}
    if failed:
        print("\n## methods that failed on this machine")
        for name, error in failed.items():
            print(f"{name:<{name_w}}{error}")


def _cell(value: float | None, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _model_ms(res: Result | None, shapes: list[LinearShape], m: int) -> float | None:
    """Whole-model milliseconds, or None when the method cannot run some shape."""
    if res is None or res.error:
        return None
    times = [res.us[(s.name, m)] for s in shapes]
    if any(t is None for t in times):
        return None
    return sum(t * s.per_token for t, s in zip(times, shapes)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timing per shape, method and M")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per method; each cell is the "
                    "fastest round's median")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--only", nargs="*", help="substrings of method names to run")
    ap.add_argument("--compile", action="store_true", help="time each method under torch.compile "
                    "(inductor; compiles every shape and M, slow to start)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        # Every shape and M is a new graph of the same lambda: past dynamo's default
        # limit of 8 it would silently run the rest eagerly.
        torch._dynamo.config.recompile_limit = 1000
    shapes = MODELS[args.model]
    try:  # imported first: its import logs to stderr, which would split the line below
        import torchao
        ao_version = f"torchao {torchao.__version__}"
    except ImportError:
        ao_version = "no torchao"
    print(f"# torch {torch.__version__}, {ao_version}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.model}, "
          f"load average {os.getloadavg()[0]:.2f} (other processes skew the times), "
          f"best of {args.repeats} medians", flush=True)
    results: dict[str, Result] = {}
    with torch.no_grad():
        for name, method in all_methods(not args.no_torchao):
            if args.only and not any(s in name for s in args.only):
                continue
            start = time.perf_counter()
            label = f"{name} +compile" if args.compile else name
            results[label] = best_of([measure(method, shapes, args.rows, args.budget, args.compile)
                                      for _ in range(args.repeats)])
            status = results[label].error or "ok"
            print(f"# {name}: {time.perf_counter() - start:.0f} s, {status}", file=sys.stderr, flush=True)
    print_tables(args.model, shapes, args.rows, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
