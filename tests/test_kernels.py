"""qkv.kernels: the faster CPU computations of F.linear and F.dropout give what PyTorch's functions give."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import qkv_env
from qkv import kernels
from qkv.hardware import AVX2_ENVIRONMENT
from qkv.inference.linear import PreparedLinear
from qkv.kernels import Dropout, Linear, dropout, linear, use_fast_kernels, uses_onednn


def test_linear_equals_a_float64_reference_at_fp32_precision():
    torch.manual_seed(0)
    for shape in [(160, 256), (4, 1, 256), (7, 3, 256), (0, 256)]:
        x, weight, bias = torch.randn(shape), torch.randn(100, 256), torch.randn(100)
        x_view = torch.randn(256, *shape[:-1]).movedim(0, -1)  # a non-contiguous input too
        for inputs in (x, x_view):
            for b in (bias, None):
                with torch.inference_mode():
                    out = linear(inputs, weight, b)
                expected = F.linear(
                    inputs.double(), weight.double(), None if b is None else b.double()
                )
                assert out.dtype == torch.float32 and out.shape == expected.shape
                # fp32 accumulation of 256 products of N(0, 1) values: a bf16 product would miss by ~0.1.
                torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-4)


ONEDNN_BF16 = "oneDNN computes no bf16 on this CPU (it needs AVX-512 or AVX-NE-CONVERT)"
needs_onednn = pytest.mark.skipif(
    not kernels.onednn_linear_works(torch.float32), reason="this PyTorch has no oneDNN linear"
)
needs_onednn_bf16 = pytest.mark.skipif(
    not kernels.onednn_linear_works(torch.bfloat16), reason=ONEDNN_BF16
)


@needs_onednn
def test_linear_takes_onednn_for_fp32_on_cpu_outside_autocast():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    assert uses_onednn(x, weight)
    assert uses_onednn(x, weight.requires_grad_())
    assert not uses_onednn(x.double(), weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast still applies


@needs_onednn_bf16
def test_linear_takes_onednn_for_bf16_without_gradients():
    x_bf16, weight_bf16 = torch.randn(3, 8).bfloat16(), torch.randn(5, 8).bfloat16()
    assert uses_onednn(x_bf16, weight_bf16)
    assert not uses_onednn(x_bf16, weight_bf16.requires_grad_())  # bf16 training: PyTorch's own
    with torch.no_grad():
        assert uses_onednn(x_bf16, weight_bf16)


@pytest.fixture
def onednn_without_bf16(monkeypatch):
    """oneDNN as on a CPU without bf16 instructions (AMD Zen 3): its bf16 linear maps raise the error
    they raise there. The capability checks run anew, inside and after the test."""
    real = torch.ops.mkldnn._linear_pointwise
    real_reorder = torch.ops.mkldnn._reorder_linear_weight

    def linear_pointwise(x, weight, *args):
        if x.dtype == torch.bfloat16:
            raise RuntimeError(
                "could not create a primitive descriptor for the inner product forward "
                "propagation primitive"
            )
        return real(x, weight, *args)

    def reorder(weight, *args):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support")
        return real_reorder(weight, *args)

    clear = (kernels.onednn_linear_works.cache_clear, kernels.packing_works.cache_clear)
    for function in clear:
        function()
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", linear_pointwise)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    yield
    monkeypatch.undo()
    for function in clear:
        function()


def test_where_onednn_cannot_compute_bf16_pytorch_computes_it_with_the_same_results(
    onednn_without_bf16,
):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(32, 1, 64), torch.randn(100, 64), torch.randn(100)
    x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    assert not kernels.onednn_linear_works(torch.bfloat16)
    assert not kernels.packing_works(torch.bfloat16)
    assert kernels.onednn_linear_works(torch.float32) == kernels.FAST  # fp32 is unaffected
    assert not uses_onednn(x, weight)
    expected = F.linear(x, weight, bias)
    prepared, prepared_relu = PreparedLinear(weight, bias), PreparedLinear(weight, bias, relu=True)
    assert prepared.packed is prepared.weight  # nothing packed
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(linear(x, weight, bias), expected)
            assert torch.equal(prepared(x), expected)
            assert torch.equal(prepared_relu(x), expected.relu())
    layer = Linear(64, 100).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 settings")
def test_the_avx2_settings_take_an_x86_cpu_to_the_paths_of_one_without_bf16():
    """qkv.hardware.AVX2_ENVIRONMENT makes this CPU behave as an AVX2 CPU without bf16 (AMD Zen 3) for
    every path qkv takes, whatever it has: so every machine proves the fallback on real oneDNN."""
    code = (
        "import torch, torch.nn.functional as F; from qkv import hardware, kernels; "
        "from qkv.inference.linear import PreparedLinear; "
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'; "
        "assert not hardware.cpu_bf16_native(); "
        "assert hardware.resolve_precision('auto', 'cpu') == 'fp32'; "
        "assert not kernels.onednn_linear_works(torch.bfloat16); "
        "assert not kernels.packing_works(torch.bfloat16); "
        "x, w = torch.randn(8, 16).bfloat16(), torch.randn(4, 16).bfloat16(); "
        "assert torch.equal(kernels.linear(x, w), F.linear(x, w)); "
        "assert torch.equal(PreparedLinear(w, relu=True)(x), F.linear(x, w).relu()); "
        "print('fp32 oneDNN:', kernels.onednn_linear_works(torch.float32))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=qkv_env(**AVX2_ENVIRONMENT),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fp32 oneDNN: True"


@pytest.mark.parametrize("weight_gradient_onednn", [True, False])
def test_linear_gradients_equal_f_linear_gradients(monkeypatch, weight_gradient_onednn):
    """Both ways to the weight gradient (oneDNN on AVX-512, mm elsewhere), on every CPU."""
    monkeypatch.setattr(kernels, "WEIGHT_GRADIENT_ONEDNN", weight_gradient_onednn)
    torch.manual_seed(0)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    x = torch.randn(3, 7, 24, requires_grad=True)
    upstream = torch.randn(3, 7, 40)
    for b in (bias, None):
        ours = torch.autograd.grad(linear(x, weight, b), [x, weight], upstream)
        expected = torch.autograd.grad(F.linear(x, weight, b), [x, weight], upstream)
        for got, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (bias_grad,) = torch.autograd.grad(linear(x, weight, bias), [bias], upstream)
    torch.testing.assert_close(bias_grad, upstream.sum(dim=(0, 1)))
    # only the inputs that need a gradient get one
    frozen = torch.randn(40, 24)
    (x_grad,) = torch.autograd.grad(linear(x, frozen), [x], upstream)
    torch.testing.assert_close(x_grad, upstream @ frozen, rtol=1e-5, atol=1e-5)


def test_linear_module_trains_like_nn_linear():
    torch.manual_seed(0)
    ours, reference = Linear(6, 4), torch.nn.Linear(6, 4)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(5, 6)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    assert list(ours.state_dict()) == ["weight", "bias"]


def test_dropout_keeps_the_expected_fraction_and_scales_to_keep_the_mean():
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last draw is only partly used
    for p in (0.1, 0.3, 0.5):
        out = dropout(x, p)
        kept = out != 0
        # 1M Bernoulli draws: the standard deviation of the kept fraction is under 0.0005.
        assert abs(kept.double().mean().item() - (1 - p)) < 0.003
        scales = out[kept].unique()
        assert len(scales) == 1 and scales.item() == pytest.approx(1 / (1 - p), rel=1e-4)
        assert abs(out.double().mean().item() - 1.0) < 0.005


def test_dropout_draws_differ_and_repeat_with_the_seed():
    x = torch.ones(64, 32)
    torch.manual_seed(1)
    first, second = dropout(x, 0.3), dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3), first)
    assert not torch.equal(first, second)


def test_dropout_keeps_dtype_and_shape_and_passes_gradients_through_kept_elements():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(4, 5, 6, dtype=dtype, requires_grad=True)
        out = dropout(x, 0.3)
        assert out.dtype == dtype and out.shape == x.shape
        out.sum().backward()
        torch.testing.assert_close(x.grad, (out != 0).to(dtype) / 0.7, rtol=1e-2, atol=0)


def test_dropout_in_fp32_is_the_product_with_a_mask_of_the_draws():
    x = torch.randn(64, 1000, requires_grad=True)
    torch.manual_seed(1)
    out = dropout(x, 0.3)
    torch.manual_seed(1)
    draws = torch.randint(-(2**63), 2**63 - 1, (64 * 1000 // 4,), dtype=torch.int64)
    dropped_levels = round(0.3 * 65536)
    keep = draws.view(torch.int16).view(64, 1000) >= dropped_levels - 32768
    scale = 65536 / (65536 - dropped_levels)
    assert torch.equal(out, x.detach().mul(keep).mul_(scale))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, keep.float() * scale)


def test_dropout_edge_cases():
    x = torch.randn(10, 10)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    module = Dropout(0.5)
    module.eval()
    assert module(x) is x


def test_environment_variable_turns_the_fast_kernels_off():
    code = (
        "import torch; from qkv import kernels; "
        "assert not kernels.FAST and not kernels.onednn_linear_works(torch.float32); "
        "x = torch.ones(1000); torch.manual_seed(0); a = kernels.dropout(x, 0.5); "
        "torch.manual_seed(0); b = torch.nn.functional.dropout(x, 0.5); assert torch.equal(a, b)"
    )
    subprocess.run([sys.executable, "-c", code], env=qkv_env(QKV_FAST_KERNELS="0"), check=True)


def test_use_fast_kernels_changes_how_a_model_computes_not_what_it_holds():
    from qkv.model import Transformer, TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig.preset("tiny", src_vocab_size=20, tgt_vocab_size=20, dropout=0.0)
    plain = Transformer(config).eval()
    fast = Transformer(config).eval()
    fast.load_state_dict(plain.state_dict())
    assert use_fast_kernels(fast) is fast
    assert all(type(m) is not torch.nn.Linear for m in fast.modules())
    assert {type(m) for m in fast.modules()} >= {Linear, Dropout}
    assert fast.encoder.layers[0].self_attn.linear is linear  # the stacked Q/K/V product too
    assert plain.encoder.layers[0].self_attn.linear is F.linear
    assert all(type(m) not in (Linear, Dropout) for m in plain.modules())  # the model is plain
    assert list(fast.state_dict()) == list(plain.state_dict())
    src, tgt = torch.randint(4, 20, (3, 7)), torch.randint(4, 20, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(fast(src, tgt), plain(src, tgt), rtol=1e-5, atol=1e-5)
