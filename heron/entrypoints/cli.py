"""The `heron` command: `heron generate PROMPT ...`, `heron serve [MODEL]`, `heron platforms`."""
from __future__ import annotations

import argparse
import json
import sys

from heron import envs
from heron.config import KV_CACHE_DTYPES


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="platform name or auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                        action="store_false", default=True)
    _add_parallel_args(parser)
    _add_speculative_arg(parser)


def _speculative_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _add_speculative_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative-config", type=_speculative_json, default=None,
                        help='speculative decoding, as JSON (vLLM\'s keys), e.g. '
                             '\'{"method": "ngram", "num_speculative_tokens": 4, '
                             '"prompt_lookup_max": 4}\' or \'{"model": DIR, '
                             '"num_speculative_tokens": 4}\'')


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's distributed and execution flags, shared by `generate` and `serve`."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks to split the model over (default 1)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                        help="pipeline stages (only 1 is supported)")
    parser.add_argument("--distributed-executor-backend", default=None,
                        choices=["uni", "mp", "ray"],
                        help="how ranks run: uni (this process), mp (a process per rank on "
                             "this host, the default for several ranks) or ray (Ray actors, "
                             "on the nodes of a Ray cluster)")
    parser.add_argument("--quantization", "-q", default=None, choices=["int8", "int4", "gguf"],
                        help="weight-only quantization of the checkpoint's linear layers: "
                             "int8 (per channel) or int4 (groups of 32); a .gguf model keeps "
                             "its own formats")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="KV-cache element type: auto (the model's dtype), fp8 (= fp8_e4m3) "
                             "or fp8_e5m2: one byte per value, twice the tokens of bfloat16")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run forward passes layer by layer from Python, never the "
                             "platform's compiled forward (for debugging and comparison)")


def parallel_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The engine arguments of `_add_parallel_args`' flags (defaults where a caller built
    `args` without them)."""
    return {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),
            "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", 1),
            "distributed_executor_backend": getattr(args, "distributed_executor_backend", None),
            "enforce_eager": getattr(args, "enforce_eager", False),
            "quantization": getattr(args, "quantization", None),
            "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto")}


def _generate(args: argparse.Namespace) -> int:
    from heron import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              seed=args.seed, enable_prefix_caching=args.enable_prefix_caching,
              speculative_config=args.speculative_config, **parallel_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": p} for p in args.prompts[:1]], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(list(args.prompts), params, use_tqdm=False)
    for output in outputs:
        prompt = output.prompt if not args.chat else args.prompts[0]
        print(f"{prompt}{output.outputs[0].text}" if not args.chat else output.outputs[0].text)
        print()
    return 0


def _platforms(args: argparse.Namespace) -> int:
    """Print every installed platform plugin and which one `--device` would choose."""
    from heron.platforms.plugins import make_plugin_manager
    from heron.platforms.registry import format_platform_table, platform_rows

    pm = make_plugin_manager()
    rows, error = platform_rows(pm, args.device)
    print(format_platform_table(rows))
    for name in pm.unmatched_allowlist():
        print(f"\nHERON_PLUGINS names {name!r}, which no installed plugin is called")
    if error:
        print(f"\nno platform chosen: {error}")
        return 1
    return 0


def _add_serve_args(serve: argparse.ArgumentParser) -> None:
    """`heron serve` flags, named as vLLM's `vllm serve` names them."""
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="local Hugging Face model folder (default: the embedded "
                            "SmolLM2-135M-Instruct, served as 'SmolLM2-135M-Instruct')")
    serve.add_argument("--model", default=None, help="same as MODEL")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help="platform name or auto")
    serve.add_argument("--api-key", default=envs.get("HERON_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $HERON_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use as 'model' (default: MODEL as given)")
    serve.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048)
    serve.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="requests that may wait for a place in the batch; past them the "
                            "server answers 503 with Retry-After (default 1024)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True)
    serve.add_argument("--block-size", type=int, default=None,
                       help="tokens per KV block (default: the platform's, 16 on cpu)")
    serve.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                       help="KV-cache size in bytes (default: the platform's estimate)")
    serve.add_argument("--chat-template", default=None,
                       help="chat template: a file, or the template itself on one line")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                       help="larger request bodies get 413 (default 4 MiB)")
    _add_parallel_args(serve)
    _add_speculative_arg(serve)
    serve.add_argument("--allowed-origins", type=json.loads, default=["*"],
                       help='CORS origins, a JSON list (default ["*"])')
    serve.add_argument("--allowed-credentials", action="store_true",
                       help="CORS: allow credentials")
    serve.add_argument("--allowed-methods", type=json.loads, default=["*"],
                       help='CORS methods, a JSON list (default ["*"])')
    serve.add_argument("--allowed-headers", type=json.loads, default=["*"],
                       help='CORS headers, a JSON list (default ["*"])')
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.add_argument("--disable-uvicorn-access-log", action="store_true")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from heron.entrypoints.openai.api_server import run_server

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"MODEL {args.model_tag!r} and --model {args.model!r} differ: give one")
    args.model = args.model_tag or args.model
    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heron", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    _add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=_generate)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_serve_args(serve)
    plat = sub.add_parser("platforms", help="list platform plugins and which one device= picks")
    plat.add_argument("--device", default="auto",
                      help="the device= to resolve (default auto; HERON_DEVICE overrides)")
    plat.set_defaults(func=_platforms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"heron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
