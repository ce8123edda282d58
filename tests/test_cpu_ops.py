"""The cpu platform's fused layer ops compute what the plain-torch layers compute."""
import pytest
import torch

from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.cpu_ops import load_ops
from heron.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    ops = load_ops()
    if ops is None:
        pytest.skip("the C layer ops do not build here")
    return ops


def fused(ops):
    """A forward context that carries only the fused ops (no attention in these tests)."""
    return set_forward_context(ForwardContext(None, [], None, ops))


def close(a, b, dtype):
    # bf16: at most one rounding step apart (the float32 sum of squares may be
    # ordered differently); f32: float32 rounding noise.
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_with_and_without_residual(ops, dtype, rows):
    norm = RMSNorm(96, 1e-5, dtype)
    norm.weight.data = torch.randn(96, dtype=dtype)
    x, res = torch.randn(rows, 96, dtype=dtype), torch.randn(rows, 96, dtype=dtype)
    expected = norm(x)
    expected_pair = norm(x, res.clone())
    with fused(ops):
        got = norm(x)
        res2 = res.clone()
        got_pair = norm(x, res2)
    close(got, expected, dtype)
    close(got_pair[0], expected_pair[0], dtype)
    assert torch.equal(got_pair[1], expected_pair[1]) and got_pair[1] is res2   # sum, in place
    if dtype == torch.bfloat16:   # mostly bit-identical: only near-ties of the rounding differ
        assert (got != expected).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_a_fused_qkv_view(ops, dtype):
    rope = RotaryEmbedding(64, 4096, {"rope_type": "default", "rope_theta": 10000.0}, dtype)
    t, heads = 37, 12
    qkv = torch.randn(t, heads * 64 + 3 * 64, dtype=dtype)
    positions = torch.randint(0, 4096, (t,))
    view = qkv[:, :heads * 64].view(t, heads, 64)
    expected = rope(positions).rotate(view.clone())   # no context: torch path
    with fused(ops):
        got = rope(positions).rotate(view)
    assert got.data_ptr() == view.data_ptr()          # rotated in place
    close(got, expected, dtype)
    if dtype == torch.bfloat16:   # every product and sum rounded as torch rounds them
        assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(ops, dtype):
    x = torch.randn(50, 2 * 80, dtype=dtype) * 4
    expected = silu_and_mul(x)
    with fused(ops):
        got = silu_and_mul(x)
    close(got, expected, dtype)
    if dtype == torch.bfloat16:
        assert (got != expected).float().mean() < 0.02


def test_unsupported_inputs_fall_back(ops):
    x = torch.randn(4, 8, dtype=torch.float16)
    assert ops.silu_and_mul(x) is None
    assert ops.rms_norm(x, torch.ones(8, dtype=torch.float16), 1e-5, None) is None
    strided = torch.randn(8, 4).t()
    assert ops.silu_and_mul(strided) is None
