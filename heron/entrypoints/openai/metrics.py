"""Prometheus metrics on /metrics: vLLM's production set, named `heron:` instead of `vllm:`.

Engine-wide gauges and counters (requests running/waiting, KV-cache usage, prefix
cache, preemptions) are read from the engine's latest stats snapshot at scrape
time. Per-request figures (token counters, latency histograms, finished requests by
reason) are recorded by `ServerMetrics`, which the async engine calls on its own
thread after every step.
"""
from __future__ import annotations

from typing import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from heron.core.async_engine import EngineStats
from heron.core.outputs import RequestOutput

# `*_created` series double the output and no dashboard reads them.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_TPOT_BUCKETS = [0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0]


def buckets_1_2_5(maximum: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `maximum` (token-count histograms)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > maximum:
                return out
            out.append(float(m * scale))
        scale *= 10


class _EngineCollector:
    """Gauges and counters read from the engine's stats snapshot when scraped."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._labels = [model_name]

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        metric = GaugeMetricFamily(name, doc, labels=["model_name"])
        metric.add_metric(self._labels, value)
        return metric

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        metric = CounterMetricFamily(name, doc, labels=["model_name"])
        metric.add_metric(self._labels, value)
        return metric

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield self._gauge("heron:num_requests_running",
                          "Number of requests in model execution batches.", s.num_running)
        yield self._gauge("heron:num_requests_waiting",
                          "Number of requests waiting to be processed.", s.num_waiting)
        yield self._gauge("heron:kv_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield self._gauge("heron:prefix_cache_hit_rate",
                          "Prefix cache hit rate (tokens found / tokens queried) since start.",
                          hit_rate)
        yield self._counter("heron:prefix_cache_queries",
                            "Prefix cache queries, in tokens.", s.prefix_cache_queries)
        yield self._counter("heron:prefix_cache_hits",
                            "Prefix cache hits, in tokens.", s.prefix_cache_hits)
        yield self._counter("heron:num_preemptions",
                            "Cumulative number of preemption from the engine.", s.num_preemptions)
        yield from self._spec_decoding(s)

    def _spec_decoding(self, s: EngineStats) -> Iterator[Metric]:
        """vLLM's spec_decode_* counters (zero without speculative decoding)."""
        spec = s.spec_decoding
        yield self._counter("heron:spec_decode_num_drafts",
                            "Number of spec decoding drafts.", spec.num_drafts)
        yield self._counter("heron:spec_decode_num_draft_tokens",
                            "Number of draft tokens.", spec.num_draft_tokens)
        yield self._counter("heron:spec_decode_num_accepted_tokens",
                            "Number of accepted tokens.", spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("heron:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.",
                                      labels=["model_name", "position"])
        for position, count in enumerate(spec.num_accepted_tokens_per_pos):
            per_pos.add_metric(self._labels + [str(position)], count)
        yield per_pos


class ServerMetrics:
    """The server's metric registry; also the async engine's `StatLogger`."""

    def __init__(self, model_name: str, max_model_len: int,
                 stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self._prompt_tokens = counter("heron:prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("heron:generation_tokens",
                                          "Number of generation tokens processed.")
        self._success = counter("heron:request_success", "Count of successfully processed requests.",
                                ("finished_reason",))
        self._ttft = histogram("heron:time_to_first_token_seconds",
                               "Histogram of time to first token in seconds.", _TTFT_BUCKETS)
        self._tpot = histogram("heron:time_per_output_token_seconds",
                               "Histogram of time per output token in seconds.", _TPOT_BUCKETS)
        self._e2e = histogram("heron:e2e_request_latency_seconds",
                              "Histogram of end to end request latency in seconds.",
                              _LATENCY_BUCKETS)
        self._queue = histogram("heron:request_queue_time_seconds",
                                "Histogram of time spent waiting before the first step.",
                                _LATENCY_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self._req_prompt = histogram("heron:request_prompt_tokens",
                                     "Number of prefill tokens processed.", token_buckets)
        self._req_generation = histogram("heron:request_generation_tokens",
                                         "Number of generation tokens processed.", token_buckets)
        self._req_n = histogram("heron:request_params_n",
                                "Histogram of the n request parameter.", [1, 2, 5, 10, 20])
        self.model_name = model_name
        # Engine thread only: generated tokens already counted, per request id.
        self._seen: dict[str, int] = {}

    def log_step(self, outputs: list[RequestOutput]) -> None:
        name = self.model_name
        for output in outputs:
            generated = sum(len(c.token_ids) for c in output.outputs)
            before = self._seen.get(output.request_id)
            if before is None:
                self._first_output(output)
                before = 0
            if generated > before:
                if before == 0:
                    self._first_token(output)
                self._generation_tokens.labels(name).inc(generated - before)
            if output.finished:
                self._seen.pop(output.request_id, None)
                self._finished(output, generated)
            else:
                self._seen[output.request_id] = generated

    def _first_output(self, output: RequestOutput) -> None:
        name = self.model_name
        self._prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self._req_prompt.labels(name).observe(len(output.prompt_token_ids))
        self._req_n.labels(name).observe(len(output.outputs))
        m = output.metrics
        if m is not None and m.first_scheduled_time is not None:
            self._queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)

    def _first_token(self, output: RequestOutput) -> None:
        m = output.metrics
        if m is not None and m.first_token_time is not None:
            self._ttft.labels(self.model_name).observe(m.first_token_time - m.arrival_time)

    def _finished(self, output: RequestOutput, generated: int) -> None:
        name = self.model_name
        first = output.outputs[0]
        self._success.labels(name, first.finish_reason or "stop").inc()
        self._req_generation.labels(name).observe(generated)
        m = output.metrics
        if m is None or m.finished_time is None:
            return
        self._e2e.labels(name).observe(m.finished_time - m.arrival_time)
        if m.first_token_time is not None and len(first.token_ids) > 1:
            self._tpot.labels(name).observe(
                (m.finished_time - m.first_token_time) / (len(first.token_ids) - 1))

    def log_aborted(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._seen.pop(request_id, None)
            self._success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return prometheus_client.generate_latest(self.registry)
