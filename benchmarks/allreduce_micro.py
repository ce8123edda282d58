"""All-reduce cost between two ranks on this host: gloo (loopback TCP) against heron's
shared-memory all-reduce, for a decode step's activations and a prefill chunk's.

    python benchmarks/allreduce_micro.py [--tokens 1 64 512] [--hidden 576]

Each rank runs one thread (as tensor parallel does on a 2-core host). Prints the median
microseconds per call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from heron.distributed import init_tensor_parallel
from heron.worker.mp_executor import free_port


def _time(fn, x: torch.Tensor, calls: int = 300) -> float:
    for _ in range(20):
        fn(x)
    samples = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _rank(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    group = init_tensor_parallel(rank, 2, "gloo", f"tcp://127.0.0.1:{port}", 60)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, dtype=dtype)
            gloo = _time(lambda t: dist.all_reduce(t), x.clone())
            shm = _time(group.shared_memory.all_reduce, x.clone())
            if rank == 0:
                print(f"{str(dtype):15} tokens {tokens:5}  gloo {gloo:8.1f} us   "
                      f"shared memory {shm:8.1f} us   ({gloo / shm:.0f}x)", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size")
    args = parser.parse_args()
    mp.spawn(_rank, args=(free_port(), args), nprocs=2)


if __name__ == "__main__":
    main()
