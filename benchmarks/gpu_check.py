"""Everything a lent GPU machine should check for the cuda platform, in one call.

    bash benchmarks/gpu_check.sh                      # on the GPU machine (see that script)
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # rehearsal here: CPU, interpreter, tiny sizes

Sections, each in its own process (a failure or a CUDA error in one does not stop
the others, and each engine gets the whole card), printing one JSON line last:
  env          device, versions, the card's copy bandwidth (bytes read + written)
  tests        the triton kernel, compile and platform tests, on cuda tensors
  equivalence  heron on cuda vs Hugging Face on the same GPU, greedy: float32 must be
               token-for-token; bfloat16/float16 agreement is reported
  kernels      decode and prefill attention timed (median of CUDA-event timings):
               decode as bytes of KV read per second against the copy bandwidth over
               a small sweep of decode tiles, prefill as TFLOP/s against torch's SDPA
  offline      the offline-64 workload (../shared/anchors/workloads.py) through heron
               and through HF `generate` (one static batch of 64, greedy), same GPU
The machine has no network and no weights: the offline model is a randomly
initialised Llama of SmolLM2-135M's shape (30 layers, 9/3 heads, vocab 49152)
with a word-level tokenizer over the workload's words; throughput does not depend
on the weights' values. A markdown table ends the output; results and logs go to
--out (the device tool's $OUT).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=100000.0)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                  tie_word_embeddings=False)


# -- helpers shared by the sections ---------------------------------------------------------

def device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def use_interpreter(dry: bool) -> None:
    """Dry runs execute the kernels in Triton's interpreter: set it before any kernel import."""
    if dry:
        from heron.kernels.triton_kernels.interpret import interpreted
        global _INTERPRETER   # held: a collected context manager would restore the variable
        _INTERPRETER = interpreted()
        _INTERPRETER.__enter__()   # for the rest of this process


_INTERPRETER = None


def anchors_dir() -> Path:
    for candidate in (os.environ.get("HERON_ANCHORS"), ROOT / ".anchors",
                      ROOT.parent / "shared" / "anchors"):
        if candidate and (Path(candidate) / "workloads.py").exists():
            return Path(candidate)
    raise SystemExit("no anchors: copy ../shared/anchors to .anchors in the repository "
                     "(cp -r ../shared/anchors .anchors) or set HERON_ANCHORS")


def workload(dry: bool):
    sys.path.insert(0, str(anchors_dir()))
    import workloads
    reqs = workloads.get("offline-64")
    if dry:
        reqs = [workloads.Request(r.prompt[:60], 4) for r in reqs[:4]]
    return reqs, workloads.WORDS


def timed(fn, dev: str, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps, CUDA events on a GPU."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def heron_llm(path: str, dry: bool, dtype: str, **kwargs):
    """heron's LLM on the cuda platform; in a dry run on cpu with the triton backend."""
    from heron import LLM
    if dry:
        from heron.kernels.triton_attention import TritonAttention
        from heron.platforms.cpu.platform import CpuPlatform
        CpuPlatform.attention_backend = lambda self, dtype, head_size: TritonAttention
        kwargs.setdefault("kv_cache_memory_bytes", 64 * 2**20)
    llm = LLM(path, device=device(dry), dtype=dtype, **kwargs)
    assert llm.llm_engine.executor.runner.backend.name == "triton", "not the triton backend"
    return llm


# -- sections ---------------------------------------------------------------------------------

def section_env(a) -> dict:
    import torch
    import transformers
    import triton
    dev = device(a.dry_run)
    size = (8 if a.dry_run else 1024) * 2**20
    src = torch.randn(size // 2, device=dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), dev, 3 if a.dry_run else 20)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip,
                triton=triton.__version__, transformers=transformers.__version__,
                copy_gbps=2 * size / seconds / 1e9)
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(name=props.name, sms=props.multi_processor_count, total_gib=total / 2**30)
        from heron.platforms.cuda.platform import CudaPlatform
        info["detect"] = CudaPlatform().detect().reason
    else:
        info.update(name="cpu (dry run)", sms=0, total_gib=0.0, detect="dry run")
    return info


def section_tests(a) -> dict:
    env = dict(os.environ, HERON_TRITON_TEST_DEVICE=device(a.dry_run))
    files = ["tests/test_triton_kernels.py", "tests/test_cuda_platform.py",
             "tests/test_triton_compile.py"]
    extra = ["-k", "gqa4 or compile or platform or splits"] if a.dry_run else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    (Path(a.out) / "tests.log").write_text(log)
    summary = next((line for line in reversed(log.splitlines()) if " in " in line and
                    ("passed" in line or "failed" in line or "error" in line)), "no summary")
    return dict(ok=proc.returncode == 0, summary=summary.strip("= "))


def hf_greedy_on(model, prompt: list[int], n: int, dev: str) -> list[int]:
    import torch
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):   # full recompute: no cache, nothing to drift
            logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1]
            ids.append(int(logits.float().argmax()))
    return ids[len(prompt):]


def section_equivalence(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from heron import SamplingParams
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model
    dev = device(a.dry_run)
    n = 6 if a.dry_run else 24
    prompts = [[5, 9, 17, 33, 62], list(range(3, 40)), [7], list(range(3, 40)) + [90, 91],
               [100] * 3 + list(range(50, 200, 3))]
    if a.dry_run:
        prompts = prompts[:3]
    results = {}
    tmp = Path(tempfile.mkdtemp())
    models = [("llama-4/2", "llama", {}),
              ("qwen2-6/2", "qwen2", dict(hidden_size=48, num_attention_heads=6,
                                          num_key_value_heads=2, intermediate_size=50))]
    for label, arch, overrides in models[:1] if a.dry_run else models:
        path = str(build_tiny_model(tmp / label.replace("/", "-"), arch, seed=3, **overrides))
        for dtype in ("float32", "bfloat16", "float16"):
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
            want = [hf_greedy_on(hf, p, n, dev) for p in prompts]
            del hf
            # small steps: chunked prefill and mixed batches; shared prompts: prefix-cache hits
            llm = heron_llm(path, a.dry_run, dtype, block_size=16, max_num_batched_tokens=32,
                            kv_cache_memory_bytes=2**30)
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            got = [list(o.outputs[0].token_ids) for o in outs]
            same = sum(g == w for g, w in zip(got, want))
            prefix = [next((i for i, (x, y) in enumerate(zip(g, w)) if x != y), len(w))
                      for g, w in zip(got, want)]
            results[f"{label} {dtype}"] = dict(identical=same, prompts=len(prompts),
                                               agreeing_tokens=sum(prefix), tokens=n * len(prompts))
            del llm, outs
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
    ok = all(r["identical"] == r["prompts"] for k, r in results.items() if "float32" in k)
    return dict(ok=ok, models=results)


def _decode_batch(seqs: int, ctx: int, hq: int, hk: int, d: int, block_size: int, dev: str,
                  query_len: int = 1):
    import torch

    from heron.kernels.interface import AttentionMetadata
    per_seq = -(-ctx // block_size)
    blocks = torch.randperm(seqs * per_seq, device=dev).to(torch.int32).view(seqs, per_seq)
    starts = list(range(0, seqs * query_len + 1, query_len))
    meta = AttentionMetadata(
        num_seqs=seqs, num_tokens=seqs * query_len,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.full((seqs,), ctx, dtype=torch.int32, device=dev), block_tables=blocks,
        slot_mapping=torch.zeros(seqs * query_len, dtype=torch.int64, device=dev),
        max_query_len=query_len, max_seq_len=ctx, block_size=block_size,
        query_start_loc_cpu=starts, seq_lens_cpu=[ctx] * seqs)
    cache = torch.randn(2, seqs * per_seq, block_size, hk, d, device=dev).to(torch.bfloat16)
    q = torch.randn(seqs * query_len, hq, d, device=dev).to(torch.bfloat16)
    return meta, cache, q


def section_kernels(a) -> dict:
    import torch
    import torch.nn.functional as F

    import heron.kernels.triton_attention as ta
    dev = device(a.dry_run)
    reps = 2 if a.dry_run else 50
    rows = []
    decode_shapes = [(64, 2048, 32, 8, 128), (64, 2048, 9, 3, 64), (4, 16384, 32, 8, 128)]
    sweep = [ta.Tiles(16, n, w) for n in (32, 64, 128) for w in (4, 8)]
    if a.dry_run:
        decode_shapes, sweep = [(2, 64, 4, 2, 32)], [ta.Tiles(16, 32), ta.Tiles(16, 64)]
    default = ta.DECODE_TILES
    for seqs, ctx, hq, hk, d in decode_shapes:
        meta, cache, q = _decode_batch(seqs, ctx, hq, hk, d, 16, dev)
        backend = ta.TritonAttention(hq, hk, d, d ** -0.5)
        kv_bytes = 2 * seqs * ctx * hk * d * cache.element_size()
        for tiles in sweep:
            ta.DECODE_TILES = tiles
            try:
                seconds = timed(lambda: backend.attend(q, cache, meta), dev, reps)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a row, not a crash
                rows.append(dict(kind="decode", shape=[seqs, ctx, hq, hk, d], tiles=tiles.__dict__,
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(kind="decode", shape=[seqs, ctx, hq, hk, d], tiles=tiles.__dict__,
                             default=tiles == default, splits=backend.num_splits(meta, q.device),
                             us=seconds * 1e6, gbps=kv_bytes / seconds / 1e9))
        ta.DECODE_TILES = default
    prefill_shapes = [(4, 2048, 32, 8, 128), (8, 1024, 9, 3, 64)] if not a.dry_run else [(1, 32, 4, 2, 32)]
    for seqs, length, hq, hk, d in prefill_shapes:
        meta, cache, q = _decode_batch(seqs, length, hq, hk, d, 16, dev, query_len=length)
        backend = ta.TritonAttention(hq, hk, d, d ** -0.5)
        flops = 4 * seqs * hq * d * length * length / 2        # QK^T and PV, causal half
        seconds = timed(lambda: backend.attend(q, cache, meta), dev, max(2, reps // 5))
        # the peer: SDPA (flash) over the same tokens laid out contiguously
        qs = q.view(seqs, length, hq, d).transpose(1, 2)
        ks = torch.randn(seqs, hq, length, d, device=dev).to(q.dtype)
        sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, ks, is_causal=True), dev,
                     max(2, reps // 5))
        rows.append(dict(kind="prefill", shape=[seqs, length, hq, hk, d], us=seconds * 1e6,
                         tflops=flops / seconds / 1e12, sdpa_tflops=flops / sdpa / 1e12))
    return dict(rows=rows)


def build_offline_model(dest: Path, words: list[str], dry: bool) -> str:
    """A random Llama (SmolLM2-135M's shape unless dry) and a word-level tokenizer whose
    vocabulary is the workload's words padded to the model's vocabulary size."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    shape = TINY_SHAPE if dry else SMOLLM2_SHAPE
    names = ["<unk>", "<s>", "</s>"] + sorted(set(words))
    names += [f"x{i}" for i in range(shape["vocab_size"] - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<unk>").save_pretrained(dest)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest)
    return str(dest)


def section_offline(a) -> dict:
    import torch
    dev = device(a.dry_run)
    reqs, _ = workload(a.dry_run)
    prompts = [r.prompt for r in reqs]
    if a.engine == "heron":
        from heron import SamplingParams
        llm = heron_llm(a.model, a.dry_run, "bfloat16", max_model_len=2048)
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
                  for r in reqs]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)   # warm-up, as bench_offline
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        result = dict(seconds=seconds, generated=gen, prompt_tokens=prompt_tokens,
                      num_blocks=llm.llm_engine.num_blocks)
        if dev == "cuda":
            free, total = torch.cuda.mem_get_info()
            result["used_fraction"] = 1 - free / total
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.model)
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev).eval()
        n = max(r.max_tokens for r in reqs)
        enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
        with torch.inference_mode():
            warm = tok(prompts[:2], return_tensors="pt", padding=True).to(dev)
            model.generate(**warm, max_new_tokens=4, do_sample=False)
            start = time.perf_counter()
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            if dev == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        result = dict(seconds=seconds, generated=n * len(reqs),
                      prompt_tokens=int(enc["attention_mask"].sum()))
    result["gen_tok_s"] = result["generated"] / result["seconds"]
    result["total_tok_s"] = (result["generated"] + result["prompt_tokens"]) / result["seconds"]
    return result


SECTIONS = dict(env=section_env, tests=section_tests, equivalence=section_equivalence,
                kernels=section_kernels, offline=section_offline)


# -- the driver -----------------------------------------------------------------------------

def run_section(name: str, a, log, timeout: int, *extra: str) -> dict:
    # Never past the whole run's budget: the table must still print inside the call.
    timeout = int(min(timeout, a.deadline - time.perf_counter() - 10))
    if timeout < 20:
        return dict(error="skipped: the run's time budget is spent")
    cmd = [sys.executable, __file__, "--section", name, "--out", a.out, *extra]
    if a.dry_run:
        cmd.append("--dry-run")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = f"{(e.stdout or b'')!r}\n{(e.stderr or b'')!r}\ntimed out after {timeout} s", -1
    log.write(f"\n===== {name} {' '.join(extra)} (rc {rc}, {time.perf_counter() - start:.0f} s)\n"
              f"{output}")
    log.flush()
    lines = [line for line in (proc.stdout if rc != -1 else "").splitlines()
             if line.startswith("{")]
    if rc != 0 or not lines:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"rc {rc}: {tail[0][:160]}")
    return json.loads(lines[-1])


def table(res: dict) -> str:
    rows = [("check", "result", "detail")]
    env = res.get("env", {})
    if "error" in env:
        rows.append(("device", "ERROR", env["error"]))
    else:
        rows.append(("device", env["name"], f"torch {env['torch']} (CUDA {env['cuda']}, HIP "
                     f"{env['hip']}), triton {env['triton']}, transformers {env['transformers']}, "
                     f"{env['sms']} SMs, {env['total_gib']:.0f} GiB"))
        rows.append(("copy bandwidth (read+write)", f"{env['copy_gbps']:.0f} GB/s",
                     "device-to-device copy of 1 GiB (8 MiB dry), median"))
    for name in ("tests", "equivalence", "kernels", "offline-heron"):
        if name not in res:
            rows.append((name, "skipped", "--skip"))
    if "tests" in res:
        tests = res["tests"]
        rows.append(("kernel + platform tests on the device", "PASS" if tests.get("ok") else "FAIL",
                     tests.get("summary") or tests.get("error", "")))
    eq = res.get("equivalence", {})
    if "error" in eq:
        rows.append(("greedy = HF on the same device", "ERROR", eq["error"]))
    for label, r in eq.get("models", {}).items():
        verdict = ("PASS" if r["identical"] == r["prompts"] else "FAIL") if "float32" in label \
            else "info"
        rows.append((f"greedy vs HF: {label}", verdict,
                     f"{r['identical']}/{r['prompts']} prompts identical, "
                     f"{r['agreeing_tokens']}/{r['tokens']} tokens before the first difference"))
    copy = env.get("copy_gbps") or float("nan")
    kernels = res.get("kernels", {})
    if "error" in kernels:
        rows.append(("attention micro-benchmark", "ERROR", kernels["error"]))
    for r in kernels.get("rows", []):
        shape = "x".join(map(str, r["shape"]))
        if r["kind"] == "decode":
            if "error" in r:
                rows.append((f"decode {shape} tiles {r['tiles']}", "ERROR", r["error"]))
                continue
            t = r["tiles"]
            rows.append((f"decode seqs x ctx x Hq x Hkv x D {shape}, BLOCK_N {t['block_n']} "
                         f"warps {t['num_warps']}{' (default)' if r['default'] else ''}",
                         f"{r['gbps']:.0f} GB/s", f"{r['gbps'] / copy:.0%} of copy, "
                         f"{r['us']:.0f} us, {r['splits']} splits"))
        else:
            rows.append((f"prefill seqs x len x Hq x Hkv x D {shape}", f"{r['tflops']:.1f} TFLOP/s",
                         f"torch SDPA (contiguous, not paged) {r['sdpa_tflops']:.1f} TFLOP/s, "
                         f"{r['us']:.0f} us"))
    heron_r, hf_r = res.get("offline-heron", {}), res.get("offline-hf", {})
    for label, r in (("heron", heron_r), ("HF generate, batch 64", hf_r)):
        if "error" in r:
            rows.append((f"offline-64 {label}", "ERROR", r["error"]))
        elif r:
            extra = ""
            if "num_blocks" in r:
                extra = f", {r['num_blocks']} KV blocks"
                if "used_fraction" in r:
                    extra += f", {r['used_fraction']:.2f} of device memory in use (target 0.9)"
            rows.append((f"offline-64 {label}", f"{r['gen_tok_s']:.0f} gen tok/s",
                         f"{r['total_tok_s']:.0f} total tok/s, {r['seconds']:.1f} s{extra}"))
    if "gen_tok_s" in heron_r and "gen_tok_s" in hf_r:
        rows.append(("offline-64 heron / HF", f"{heron_r['gen_tok_s'] / hf_r['gen_tok_s']:.2f}x",
                     "random-weight Llama of SmolLM2-135M's shape, bf16, same GPU"))
    width = [max(len(str(r[i])) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, width)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in width) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/heron_gpu_check")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "equivalence", "kernels",
                                                                "offline"])
    ap.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=["heron", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=540,
                    help="seconds for the whole run (the device tool allows 600 per call)")
    a = ap.parse_args()
    a.deadline = time.perf_counter() + a.budget
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.section:
        use_interpreter(a.dry_run)
        print(json.dumps(SECTIONS[a.section](a)))
        return
    res: dict[str, dict] = {}
    with open(Path(a.out) / "sections.log", "w") as log:
        res["env"] = run_section("env", a, log, 120)
        print("env", res["env"], flush=True)
        plan = [("tests", 450), ("equivalence", 240), ("kernels", 240)]
        for name, timeout in plan:
            if name not in a.skip:
                res[name] = run_section(name, a, log, timeout)
                print(name, "done", flush=True)
        if "offline" not in a.skip:
            reqs, words = workload(a.dry_run)
            model = build_offline_model(Path(tempfile.mkdtemp()) / "smollm2-shape", words,
                                        a.dry_run)
            for engine in ("hf", "heron"):
                res[f"offline-{engine}"] = run_section("offline", a, log, 300, "--engine", engine,
                                                       "--model", model)
                print("offline", engine, "done", flush=True)
    text = table(res)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(res, indent=1))
    (Path(a.out) / "gpu_check.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
