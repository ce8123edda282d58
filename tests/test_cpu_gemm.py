"""heron's batch-invariant linear kernel (csrc/cpu_gemm.c): correct, and a row's result
depends on that row alone (not on the row count, its place in the call, the threads)."""
import pytest
import torch
from torch import nn

from heron.kernels import cbuild
from heron.kernels.cpu_linear import (_SOURCE, InvariantLinear, _declare,
                                      invariant_linear_available)
from heron.platforms.cpu.platform import CpuPlatform
from heron.platforms.interface import ALL_INVARIANCES

pytestmark = pytest.mark.skipif(not invariant_linear_available(torch.float32),
                                reason="the C kernel does not build here (no gcc)")

SHAPES = [(576, 1536), (1536, 576), (64, 17), (100, 33), (1, 5), (48, 16)]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The exact product in float64, from the same (possibly bfloat16) values."""
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES)
def test_matches_the_exact_product(dtype, k, n):
    torch.manual_seed(k * 1000 + n)
    w, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(37, k).to(dtype)
    got = InvariantLinear(w, b)(x)
    assert got.dtype == dtype and got.shape == (37, n)
    exact = reference(x, w, b)
    if dtype == torch.float32:   # float32 accumulation error only
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6 * k ** 0.5 * 4)
    else:                        # at most one rounding to bfloat16 away from the exact value
        rounded = exact.to(torch.bfloat16).double()
        ulp = rounded.abs().clamp_min(1e-3) * 2.0 ** -7
        assert bool(((got.double() - exact).abs() <= ulp + 1e-4 * k ** 0.5).all())
    assert torch.equal(InvariantLinear(w, None)(x), InvariantLinear(w, None)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_rows_beside_it(dtype):
    torch.manual_seed(0)
    k, n = 576, 200
    w, b = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    layer = InvariantLinear(w, b)
    x = torch.randn(300, k).to(dtype)
    whole = layer(x)
    for rows in (1, 2, 3, 5, 6, 7, 8, 9, 15, 16, 17, 64, 95, 96, 97, 150):
        for start in (0, 1, 13):
            assert torch.equal(layer(x[start:start + rows]), whole[start:start + rows]), (rows, start)
    # rows taken out of a wider tensor (a strided view) and a 3-d batch
    wide = torch.randn(40, k + 9).to(dtype)
    assert torch.equal(layer(wide[:, :k]), layer(wide[:, :k].contiguous()))
    assert torch.equal(layer(x[:24].reshape(4, 6, k)), whole[:24].reshape(4, 6, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_do_not_change_the_numbers(dtype):
    torch.manual_seed(1)
    w, x = torch.randn(300, 128).to(dtype), torch.randn(50, 128).to(dtype)
    layer = InvariantLinear(w, None)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)


def variant(*defines: str):
    """The kernel built with the default (tuned) flags plus `defines`, or a skip."""
    lib, why = cbuild.load_library(_SOURCE, _declare, (cbuild.FLAG_SETS[0] + list(defines),))
    if lib is None:
        pytest.skip(f"no tuned build here: {why}")
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_widths_compute_the_same_numbers(dtype):
    """The 8-float (AVX2) and 16-float (AVX-512) variants differ in tile shapes, packing
    and vector code, not in any element's chain of multiply-adds: equal bit for bit.
    Whichever this CPU runs natively, the other is built and compared too."""
    torch.manual_seed(2)
    w, b = torch.randn(77, 300).to(dtype), torch.randn(77).to(dtype)
    x = torch.randn(41, 300).to(dtype)
    narrow = InvariantLinear(w, b, library=variant("-DVW=8"))
    wide = InvariantLinear(w, b, library=variant("-DVW=16"))
    for rows in (1, 3, 8, 41):
        assert torch.equal(narrow(x[:rows]), wide(x[:rows])), rows
    assert torch.equal(narrow(x), InvariantLinear(w, b)(x))


def test_the_portable_build_is_invariant_too():
    """Without -march=native (the fallback build) there may be no fused multiply-add:
    other roundings than the tuned build, but still one fixed chain per element."""
    lib, why = cbuild.load_library(_SOURCE, _declare, (cbuild.FLAG_SETS[-1],))
    assert lib is not None, why
    torch.manual_seed(3)
    w, x = torch.randn(50, 200).bfloat16(), torch.randn(30, 200).bfloat16()
    layer = InvariantLinear(w, None, library=lib)
    whole = layer(x)
    assert all(torch.equal(layer(x[i:i + 3]), whole[i:i + 3]) for i in range(0, 27, 3))
    torch.testing.assert_close(whole.float(), InvariantLinear(w, None)(x).float(),
                               rtol=2 ** -7, atol=1e-2)


def test_empty_input_and_bad_input():
    layer = InvariantLinear(torch.randn(8, 4), None)
    assert layer(torch.randn(0, 4)).shape == (0, 8)
    with pytest.raises(ValueError, match="float32 input with 4 features"):
        layer(torch.randn(3, 4).bfloat16())
    with pytest.raises(ValueError, match="4 features"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="float32 or bfloat16 weight"):
        InvariantLinear(torch.randn(8, 4).half(), None)


class TwoLayers(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64, dtype=dtype)
        self.down = nn.Linear(64, 32, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down(self.up(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_platform_runs_linear_layers_on_the_kernel_by_default(monkeypatch, dtype):
    monkeypatch.delenv("HERON_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("HERON_CPU_ATTENTION", raising=False)
    platform = CpuPlatform()
    model = TwoLayers(dtype)
    x = torch.randn(5, 32).to(dtype)
    plain = model(x)
    prepared = platform.prepare_model(model, dtype)
    assert isinstance(prepared.up, InvariantLinear) and isinstance(prepared.down, InvariantLinear)
    torch.testing.assert_close(prepared(x).float(), plain.float(),
                               rtol=0.05 if dtype == torch.bfloat16 else 1e-5, atol=0.05)
    assert platform.capabilities.invariances == ALL_INVARIANCES
    assert platform.capabilities.invariant_dtypes == {"float32", "bfloat16"}


def test_batch_invariant_mode_off_declares_no_invariance(monkeypatch):
    monkeypatch.setenv("HERON_BATCH_INVARIANT", "0")
    platform = CpuPlatform()
    model = platform.prepare_model(TwoLayers(torch.float32), torch.float32)
    assert isinstance(model.up, nn.Linear)
    assert not platform.capabilities.invariances and not platform.capabilities.invariant_dtypes
    monkeypatch.setenv("HERON_BATCH_INVARIANT", "1")
    monkeypatch.setenv("HERON_CPU_ATTENTION", "reference")   # plain torch attention: not declared
    assert not platform.capabilities.invariances


def test_an_edited_shared_header_rebuilds_its_libraries(tmp_path):
    """cbuild names a library by its source and the local headers it includes."""
    header, source = tmp_path / "shared.h", tmp_path / "k.c"
    header.write_text("static inline int answer(void) { return 41; }\n")
    source.write_text('#include "shared.h"\nint value(void) { return answer(); }\n')
    before = cbuild.library_path(source, ["-O2"])
    header.write_text("static inline int answer(void) { return 42; }\n")
    assert cbuild.library_path(source, ["-O2"]) != before
