"""heron: an LLM inference and serving engine with a hardware-neutral core and platform plugins."""
from heron.core.outputs import CompletionOutput, RequestOutput
from heron.core.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it only when asked for.
    if name == "LLM":
        from heron.entrypoints.llm import LLM
        return LLM
    raise AttributeError(f"module 'heron' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
