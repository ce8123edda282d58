"""Running the kernels in Triton's interpreter on CPU tensors (CI, dry runs).

`TRITON_INTERPRET=1` must be set when @triton.jit decorates a kernel (it decides
what the decorator builds) and again when the kernel is launched (the interpreter
reads it then too). `interpreted()` sets it for a block of code; import the kernel
modules for the first time inside it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """TRITON_INTERPRET=1 inside the block, the previous value after it."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _fix_scalar_index()
    _fix_bf16_dot()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def is_interpreted(kernel: object) -> bool:
    """Whether a @triton.jit kernel was built for the interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def _fix_scalar_index() -> None:
    # Triton 3.6's interpreter holds a scalar as a one-element array and turns it into
    # a loop bound with int(array); NumPy >= 2.4 refuses int() on arrays with ndim > 0
    # ("only 0-dimensional arrays can be converted"), so every `range(runtime_bound)`
    # in a kernel fails. Patch the interpreter's __index__ to take the element.
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "heron_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.heron_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


def _fix_bf16_dot() -> None:
    # The interpreter stores bfloat16 as its raw uint16 bits (NumPy has no bfloat16) and
    # its tl.dot multiplies those integers. Widen bfloat16 operands to float32 first
    # (exact: a bfloat16 is the top half of a float32), as a GPU's bf16 MMA computes.
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot
    if getattr(original, "heron_fixed", False):
        return

    def widen(handle: TensorHandle) -> TensorHandle:
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.heron_fixed = True  # type: ignore[attr-defined]
    InterpreterBuilder.create_dot = create_dot
