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
from qkv.attention import MultiHeadAttention
from qkv.hardware import AVX2_ENVIRONMENT
from qkv.kernels import Dropout, Linear, dropout, frozen_cache, frozen_weights, linear, uses_onednn


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
    prepared: dict = {}
    with torch.inference_mode(), frozen_weights(prepared):
        for _ in range(3):
            assert torch.equal(linear(x, weight, bias), expected)
            assert torch.equal(kernels.linear_relu(x, weight, bias), expected.relu())
    assert all(entry[1] is None for entry in prepared.values())  # nothing packed
    layer = Linear(64, 100).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 settings")
def test_the_avx2_settings_take_an_x86_cpu_to_the_paths_of_one_without_bf16():
    """qkv.hardware.AVX2_ENVIRONMENT makes this CPU behave as an AVX2 CPU without bf16 (AMD Zen 3) for
    every path qkv takes, whatever it has: so every machine proves the fallback on real oneDNN."""
    code = (
        "import torch, torch.nn.functional as F; from qkv import hardware, kernels; "
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'; "
        "assert not hardware.cpu_bf16_native(); "
        "assert hardware.resolve_precision('auto', 'cpu') == 'fp32'; "
        "assert not kernels.onednn_linear_works(torch.bfloat16); "
        "assert not kernels.packing_works(torch.bfloat16); "
        "x, w = torch.randn(8, 16).bfloat16(), torch.randn(4, 16).bfloat16(); "
        "assert torch.equal(kernels.linear(x, w), F.linear(x, w)); "
        "assert torch.equal(kernels.linear_relu(x, w), F.linear(x, w).relu()); "
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_relu_equals_relu_of_linear_packed_or_not_with_or_without_gradients(dtype):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(40, 3, 64), torch.randn(96, 64), torch.randn(96)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    expected = F.relu(linear(x, weight, bias))
    assert (expected == 0).any() and (expected > 0).any()
    with torch.inference_mode():
        assert torch.equal(kernels.linear_relu(x, weight, bias), expected)
        with frozen_weights({}):  # packed at the second use
            for _ in range(3):
                assert torch.equal(kernels.linear_relu(x, weight, bias), expected)
    weight.requires_grad_()
    out = kernels.linear_relu(x, weight, None)
    out.sum().backward()
    reference = weight.detach().clone().requires_grad_()
    F.relu(F.linear(x, reference)).sum().backward()
    torch.testing.assert_close(weight.grad, reference.grad)


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


needs_packing = pytest.mark.skipif(
    not kernels.packing_works(torch.float32), reason="no packed oneDNN weights"
)


def packable(dtype: torch.dtype):
    """`dtype` as a parameter, skipped where oneDNN cannot pack weights of it."""
    return pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not kernels.packing_works(dtype),
            reason=ONEDNN_BF16 if dtype == torch.bfloat16 else "no packed oneDNN weights",
        ),
    )


@pytest.mark.parametrize("dtype", [packable(torch.float32), packable(torch.bfloat16)])
def test_frozen_weights_are_packed_at_their_second_use_with_the_same_results(dtype):
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape).to(dtype) for shape in [(32, 1, 64), (100, 64), (100,)])
    expected = F.linear(x.double(), weight.double(), bias.double())
    with torch.inference_mode(), frozen_weights():
        outputs = [linear(x, weight, bias) for _ in range(3)]
        packed = frozen_cache()[("onednn", id(weight))][1]
        few_rows = linear(x[:2], weight, bias)  # too few rows to be worth packing: not packed
    assert packed is not None and packed.layout == torch._mkldnn
    assert frozen_cache() is None  # dropped on leaving the block
    tolerance = 2e-4 if dtype == torch.float32 else 0.25  # bf16: 8 bits of mantissa, 64 products
    for out in [*outputs, few_rows]:
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected[: out.size(0)], rtol=0, atol=tolerance)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


@needs_packing
def test_weights_changed_between_frozen_blocks_are_seen():
    # Fused Adam updates parameters without bumping their version counters: only the block's scope
    # tells a packed weight is stale.
    x, weight = torch.randn(32, 64), torch.randn(100, 64)
    with torch.inference_mode():
        with frozen_weights():
            before = [linear(x, weight) for _ in range(2)][-1]
        weight.mul_(2)
        with frozen_weights():
            after = [linear(x, weight) for _ in range(2)][-1]
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-4)


def test_nested_frozen_blocks_share_the_outermost_cache():
    with frozen_weights():
        outer = frozen_cache()
        with frozen_weights():
            assert frozen_cache() is outer
        assert frozen_cache() is outer
    assert frozen_cache() is None


@needs_packing
def test_a_dictionary_passed_to_frozen_blocks_keeps_the_packed_weights_between_them():
    layer = Linear(64, 48)
    x = torch.randn(32, 64)
    prepared: dict = {}
    with torch.no_grad():
        for _ in range(2):
            with frozen_weights(prepared):
                assert frozen_cache() is prepared
                out = layer(x)
        packed = prepared[("onednn", id(layer.weight))][1]
        assert packed is not None  # packed at the second use, in the second block
        with frozen_weights(prepared):
            assert layer(x) is not None
            assert prepared[("onednn", id(layer.weight))][1] is packed  # not packed again
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    assert frozen_cache() is None


@pytest.mark.parametrize("dtype", [packable(torch.float32), packable(torch.bfloat16)])
def test_kept_weights_are_packed_for_products_of_any_number_of_rows(dtype):
    """Within one search a product of a few rows does not repay the packing; over the many searches of
    a caller that keeps the prepared weights it does (batch 1: 1 row greedy, 5 rows beam 5)."""
    torch.manual_seed(0)
    x, weight = torch.randn(1, 1, 64).to(dtype), torch.randn(100, 64).to(dtype)
    expected = F.linear(x.double(), weight.double())
    with torch.inference_mode():
        with frozen_weights():
            single_search = [linear(x, weight) for _ in range(2)][-1]
            entry = frozen_cache().get(("onednn", id(weight)))
            assert entry is None or entry[1] is None  # not packed
        prepared: dict = {}
        with frozen_weights(prepared):
            kept = [linear(x, weight) for _ in range(2)][-1]
        assert prepared[("onednn", id(weight))][1].layout == torch._mkldnn
    tolerance = 2e-4 if dtype == torch.float32 else 0.25
    for out in (single_search, kept):
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)


def test_stacked_q_k_v_weights_are_made_once_inside_a_frozen_block():
    mha = MultiHeadAttention(16, 2)
    projections = (mha.q_proj, mha.k_proj, mha.v_proj)
    with torch.no_grad():
        with frozen_weights():
            first, _ = mha._stacked(*projections)
            assert mha._stacked(*projections)[0] is first
        again, _ = mha._stacked(*projections)
    assert again is not first and torch.equal(again, first)
    assert torch.equal(first[:16], mha.q_proj.weight) and torch.equal(first[32:], mha.v_proj.weight)


@pytest.mark.parametrize(
    ("rows", "length", "k"),
    [(32, 40000, 10), (3, 8000, 2), (5, 4096 * 3, 7), (2, 160 * 40, 10)],
)
def test_topk_equals_torch_topk(rows, length, k):
    assert kernels._topk_chunk(length, k) is not None  # the chunked path, not the fallback
    generator = torch.Generator().manual_seed(length + k)
    x = torch.randn(rows, length, generator=generator)
    x[0, :] = x[0].sort().values  # the k best in one chunk
    x[-1, ::97] += 5.0  # the k best spread over many chunks
    if rows > 2:
        x[1, length // 2 :] = -torch.inf  # as the dead beams of a search's first step
    values, indices = kernels.topk(x, k)
    expected_values, expected_indices = x.topk(k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize(
    ("rows_per_group", "length", "k"), [(5, 8000, 10), (1, 8000, 10), (3, 6000, 4)]
)
def test_topk_of_offset_rows_in_groups_equals_torch_topk_of_the_sums(
    rows_per_group, length, k, chunked, monkeypatch
):
    """A beam search's candidates: each group (a sentence) has rows_per_group rows (its beams), each row
    its own offset (the beam's score)."""
    if chunked:
        assert kernels._topk_chunk(length, k, rows_per_group) is not None
    else:
        monkeypatch.setattr(kernels, "_topk_chunk", lambda *args: None)
    generator = torch.Generator().manual_seed(length + k)
    groups = 4
    x = torch.log_softmax(torch.randn(groups * rows_per_group, length, generator=generator), 1)
    offsets = -10 * torch.rand(groups * rows_per_group, generator=generator)
    if rows_per_group > 1:
        offsets[1] = -torch.inf  # a dead beam (a group of dead beams only would be all ties)
    x[-1, ::97] += 5.0  # the k best of the last group spread over many chunks
    values, indices = kernels.topk(x, k, offsets, rows_per_group)
    sums = (x + offsets[:, None]).view(groups, rows_per_group * length)
    expected_values, expected_indices = sums.topk(k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("rows", [1, kernels.ARGMAX_MIN_ROWS, 40])
def test_argmax_equals_torch_argmax(rows):
    x = torch.randn(rows, 8000, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(kernels.argmax(x), x.argmax(dim=1))


def test_topk_with_ties_returns_the_tied_values_at_valid_indices():
    x = torch.zeros(4, 8000)
    x[:, 100:105] = 1.0
    values, indices = kernels.topk(x, 10)
    assert torch.equal(values, x.topk(10, dim=1).values)
    assert torch.equal(x.gather(1, indices), values)
    assert indices.unique(dim=1).size(1) == 10  # no index twice


def test_topk_falls_back_to_torch_topk_where_chunks_do_not_pay():
    assert kernels._topk_chunk(1000, 10) is None  # a short row
    assert kernels._topk_chunk(8009, 10) is None  # a prime length: no chunk divides it
    assert kernels._topk_chunk(4096, 40) is None  # too few chunks of at least 32 for k = 40
    x = torch.randn(3, 8009)
    values, indices = kernels.topk(x, 5)
    assert torch.equal(values, x.topk(5, dim=1).values)
    assert torch.equal(indices, x.topk(5, dim=1).indices)
    y = torch.randn(8000, 3).t()  # not contiguous
    assert torch.equal(kernels.topk(y, 5)[1], y.topk(5, dim=1).indices)
