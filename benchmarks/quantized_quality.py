"""Quality of heron's quantized and reduced-precision runs against Hugging Face float32.

Every configuration scores the same fixed English text (about 1000 tokens, written
below; nothing is downloaded) by teacher forcing: the log-probability of each actual
next token. Hugging Face float32 on the dequantized weights is the reference; for each
heron run the table gives its perplexity, the top-1 agreement with the reference (the
most likely next token, over the full vocabulary, is the same) and the mean and max
|delta log-prob| of the actual next token.

    python benchmarks/quantized_quality.py                        # the embedded SmolLM2
    python benchmarks/quantized_quality.py --model X.gguf         # another GGUF file
    python benchmarks/quantized_quality.py --model X.gguf --hf-reference X.gguf --json out.json

For the embedded model the runs are: the bfloat16 folder in bfloat16 and float32, the
Q4_1 GGUF (weights kept quantized) in float32 and bfloat16, and int8 / int4 weight-only
quantization of the bfloat16 folder. For another GGUF: the GGUF in float32 and
bfloat16. The reference is always the GGUF dequantized by transformers, so the
quantized runs are measured against the very weights they hold (int8 / int4 add their
own quantization on top). Each LLM is created, used and deleted before the next.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Several paragraphs of ordinary prose (no code, no lists): the kind of text whose
# perplexity a small instruct model should keep low, so that differences show.
PARAGRAPHS = [
    ("The town of Millbrook sits at the bend of a slow river, where the valley opens out "
     "into wide fields of wheat and barley. For most of its history it was a market town: "
     "farmers came in on Saturday mornings to sell their grain, buy tools and seed, and "
     "catch up on the news of the week. The old market hall still stands in the square, "
     "although it now holds a café, a bookshop and a small museum of local history."),
    ("In the spring the river often rises after heavy rain, and the low meadows to the "
     "south of the town turn into shallow lakes for a few weeks. Children like to watch "
     "the herons that wade through the water looking for fish, while older residents "
     "remember the great flood of 1947, when the water reached the steps of the church "
     "and boats were rowed along the high street."),
    ("The railway arrived in 1862 and changed the town more than anything before it. "
     "Goods that once took three days to reach the city by cart could now be delivered "
     "in a single afternoon. New houses were built along the road to the station, a "
     "brewery and a brick works opened, and the population doubled within twenty years. "
     "Many of the red brick terraces from that time are still lived in today."),
    ("Life in Millbrook today is quieter. Most people who work travel to the city each "
     "morning, and the shops in the centre have had to find new ways to survive. The "
     "bakery on the corner of Church Lane is a good example. It has been run by the same "
     "family for four generations, and its owners decided some years ago to open a small "
     "tea room at the back, where visitors can sit by the window and eat fresh bread."),
    ("Scientists who study small towns like Millbrook are interested in how communities "
     "adapt when the reason they were founded disappears. Some towns shrink and lose "
     "their schools and shops; others reinvent themselves as places for tourists, "
     "artists or retired people. The outcome often depends on a handful of decisions "
     "made by local councils and on the energy of a few determined individuals."),
    ("Every autumn the town holds a harvest festival that draws visitors from across "
     "the region. The main street is closed to traffic, stalls sell cheese, apples, "
     "honey and cider, and a brass band plays in the square. In the evening there is a "
     "procession of lanterns down to the river, followed by a dance in the market hall "
     "that usually goes on until well after midnight."),
    ("The local school is small, with fewer than two hundred pupils, but it has a good "
     "reputation. Teachers there say that the size of the school is its greatest "
     "strength: every child is known by name, and problems are noticed early. Parents "
     "from neighbouring villages sometimes drive their children several miles each day "
     "so that they can attend, which has helped to keep the school open."),
    ("Walkers who follow the footpath along the river can reach the ruins of an old "
     "abbey in about an hour. Little remains of the buildings except a few walls and the "
     "base of a tower, but the setting is beautiful, and on a clear day the hills on the "
     "far side of the valley can be seen from the top of the bank. The abbey was "
     "abandoned in the sixteenth century, and much of its stone was carried away to "
     "build farmhouses and barns in the surrounding countryside."),
    ("Like many places, Millbrook faces difficult questions about its future. Young "
     "people often leave to study or work in larger cities, and house prices have risen "
     "faster than local wages. At the same time, new residents bring fresh ideas and "
     "skills. Whether the town can balance the needs of those who have always lived "
     "there with those who have just arrived will shape its character for decades to "
     "come."),
    ("Perhaps the best way to understand the town is simply to spend a day there. Walk "
     "through the market square in the early morning, when the light is soft and the "
     "streets are almost empty. Have lunch in the tea room behind the bakery, visit the "
     "museum in the afternoon, and end the day on the bridge, watching the river move "
     "slowly past under a sky that turns from blue to gold and finally to grey."),
]
TEXT = "\n\n".join(PARAGRAPHS)


@dataclass
class Scores:
    """Teacher-forced scores of one run: per predicted position (1..n-1 of the text)."""
    logprobs: torch.Tensor   # float64 [n-1]: log-prob of the actual next token
    top1: torch.Tensor       # int64 [n-1]: the most likely next token


@dataclass
class Row:
    """One line of the table."""
    run: str
    tokens: int
    perplexity: float
    top1_agreement: float
    mean_abs_delta: float
    max_abs_delta: float
    seconds: float


def hf_scores(folder: str, token_ids: list[int], gguf_file: str | None = None) -> Scores:
    """Hugging Face float32 reference: one forward pass over the whole text."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if gguf_file is not None:
        from heron.models.default_model import hf_gguf_kwargs
        kwargs.update(hf_gguf_kwargs(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    model = model.float()   # a GGUF may come back in its file's float16 / bfloat16
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0, :-1].double()
    del model
    gc.collect()
    lp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(token_ids[1:])
    return Scores(lp.gather(1, target[:, None])[:, 0], lp.argmax(dim=-1))


def heron_scores(model: str, token_ids: list[int], **kwargs) -> Scores:
    """heron's prompt logprobs with the top-1 candidate (prompt_logprobs=1)."""
    from heron import LLM, SamplingParams

    llm = LLM(model, device="cpu", max_model_len=len(token_ids) + 16,
              max_num_batched_tokens=len(token_ids) + 16, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
    llm.shutdown()
    del llm
    gc.collect()
    positions = out.prompt_logprobs[1:]   # the first token has no context
    actual = [p[t].logprob for p, t in zip(positions, token_ids[1:])]
    top1 = [next(t for t, lp in p.items() if lp.rank == 1) for p in positions]
    return Scores(torch.tensor(actual, dtype=torch.float64), torch.tensor(top1))


def compare(run: str, scores: Scores, reference: Scores, seconds: float) -> Row:
    """Perplexity of `scores` and its distance to `reference`."""
    delta = (scores.logprobs - reference.logprobs).abs()
    return Row(run, len(scores.logprobs) + 1, math.exp(-float(scores.logprobs.mean())),
               float((scores.top1 == reference.top1).double().mean()),
               float(delta.mean()), float(delta.max()), seconds)


def tokenize(folder: str, text: str) -> list[int]:
    """Token ids of `text` with the model's own tokenizer (no special tokens added, so
    that both sides score exactly the same ids)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False)


def default_runs() -> Runs:
    """The embedded SmolLM2: (reference folder, its gguf_file, tokenizer folder, runs)."""
    from heron.models.default_model import default_gguf_path, default_model_path

    gguf, dense = default_gguf_path(), default_model_path()
    runs = [("folder bf16 (dtype bfloat16)", dense, {"dtype": "bfloat16"}),
            ("folder bf16 (dtype float32)", dense, {"dtype": "float32"}),
            ("GGUF Q4_1 (dtype float32)", gguf, {"dtype": "float32"}),
            ("GGUF Q4_1 (dtype bfloat16)", gguf, {"dtype": "bfloat16"}),
            ("folder int8 (dtype float32)", dense, {"dtype": "float32", "quantization": "int8"}),
            ("folder int4 (dtype float32)", dense, {"dtype": "float32", "quantization": "int4"})]
    return str(Path(gguf).parent), Path(gguf).name, dense, runs


Runs = tuple[str, str | None, str, list[tuple[str, str, dict]]]


def gguf_runs(model: str, reference: str) -> Runs:
    """Another GGUF file, scored against `reference` (a GGUF or a Hugging Face folder)."""
    from heron.models.gguf_file import gguf_model_folder

    runs = [("GGUF (dtype float32)", model, {"dtype": "float32"}),
            ("GGUF (dtype bfloat16)", model, {"dtype": "bfloat16"})]
    ref = Path(reference)
    if ref.is_file():
        return str(ref.parent), ref.name, gguf_model_folder(model), runs
    return str(ref), None, gguf_model_folder(model), runs


def print_table(title: str, reference: Scores, rows: list[Row]) -> None:
    """The rows as an aligned text table, reference first."""
    print(f"\n{title}")
    print(f"{'run':34} {'tokens':>6} {'ppl':>8} {'top-1':>7} {'mean|d|':>8} {'max|d|':>7} {'s':>6}")
    ref_ppl = math.exp(-float(reference.logprobs.mean()))
    print(f"{'HF float32 (reference)':34} {len(reference.logprobs) + 1:6d} {ref_ppl:8.3f} "
          f"{'-':>7} {'-':>8} {'-':>7} {'-':>6}")
    for r in rows:
        print(f"{r.run:34} {r.tokens:6d} {r.perplexity:8.3f} {r.top1_agreement:7.1%} "
              f"{r.mean_abs_delta:8.4f} {r.max_abs_delta:7.3f} {r.seconds:6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file (default: the embedded SmolLM2 runs)")
    parser.add_argument("--hf-reference", help="what Hugging Face loads as the float32 "
                        "reference: a GGUF file (dequantized) or a folder (default: --model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HERON_CPU_KVCACHE_SPACE", "0.25")

    if args.model:
        reference_path = args.hf_reference or args.model
        ref_folder, ref_gguf, tok_folder, runs = gguf_runs(args.model, reference_path)
        title = f"{Path(args.model).name} against HF float32 of {reference_path} (dequantized)"
    else:
        ref_folder, ref_gguf, tok_folder, runs = default_runs()
        title = "SmolLM2-135M-Instruct against HF float32 of its Q4_1 GGUF (dequantized)"
    token_ids = tokenize(tok_folder, TEXT)
    start = time.perf_counter()
    reference = hf_scores(ref_folder, token_ids, ref_gguf)
    ref_seconds = time.perf_counter() - start
    print(f"reference: {len(token_ids)} tokens, {ref_seconds:.1f} s", file=sys.stderr)
    rows = []
    for name, model, kwargs in runs:
        start = time.perf_counter()
        scores = heron_scores(model, token_ids, **kwargs)
        rows.append(compare(name, scores, reference, time.perf_counter() - start))
        print(f"{name}: done in {rows[-1].seconds:.1f} s", file=sys.stderr)
    print_table(title, reference, rows)
    result = {"title": title, "tokens": len(token_ids),
              "reference_perplexity": math.exp(-float(reference.logprobs.mean())),
              "rows": [asdict(r) for r in rows]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
