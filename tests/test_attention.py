"""qkv's attention equals PyTorch's reference modules, never gives NaN, and differentiates correctly."""

import math

import pytest
import torch
from torch import nn

from qkv.attention import (
    MultiHeadAttention,
    causal_mask,
    fused_attention,
    scaled_dot_product_attention,
)

TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10}


def copy_from_torch(reference: nn.MultiheadAttention) -> MultiHeadAttention:
    """A qkv MultiHeadAttention with the weights of a torch.nn.MultiheadAttention."""
    ours = MultiHeadAttention(reference.embed_dim, reference.num_heads).to(reference.in_proj_weight)
    w_q, w_k, w_v = reference.in_proj_weight.chunk(3)
    b_q, b_k, b_v = reference.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, weight, bias in [
            (ours.q_proj, w_q, b_q),
            (ours.k_proj, w_k, b_k),
            (ours.v_proj, w_v, b_v),
            (ours.out_proj, reference.out_proj.weight, reference.out_proj.bias),
        ]:
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
    return ours.eval()


def test_formula_on_a_hand_computed_example():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    out, weights = scaled_dot_product_attention(q, k, v)
    a = math.exp(1 / math.sqrt(2))
    expected = torch.tensor([[a / (a + 1), 1 / (a + 1)]])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected * 10)


def test_reference_path_equals_torch_functional():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every row keeps one key: torch's own kernel is only defined then
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masking", ["key_padding", "causal"])
def test_multi_head_self_attention_equals_torch(dtype, masking):
    torch.manual_seed(1)
    d_model, n_heads, batch, length = 32, 4, 3, 6
    reference = nn.MultiheadAttention(d_model, n_heads, batch_first=True).to(dtype).eval()
    ours = copy_from_torch(reference)
    x = torch.randn(batch, length, d_model, dtype=dtype)
    if masking == "key_padding":
        lengths = torch.tensor([6, 4, 1])
        is_pad = torch.arange(length)[None, :] >= lengths[:, None]  # torch: True = ignore
        ref_out, ref_weights = reference(x, x, x, key_padding_mask=is_pad)
        kwargs = dict(mask=~is_pad[:, None, None, :])  # qkv: True = may attend
    else:
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        ref_out, ref_weights = reference(x, x, x, attn_mask=future)
        kwargs = dict(causal=True)
    tol = TOLERANCES[dtype]
    fast_out, no_weights = ours(x, **kwargs)
    slow_out, weights = ours(x, need_weights=True, **kwargs)
    assert no_weights is None
    torch.testing.assert_close(fast_out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(slow_out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.mean(dim=1), ref_weights, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_head_cross_attention_equals_torch(dtype):
    torch.manual_seed(2)
    reference = nn.MultiheadAttention(16, 2, batch_first=True).to(dtype).eval()
    ours = copy_from_torch(reference)
    queries = torch.randn(2, 4, 16, dtype=dtype)
    memory = torch.randn(2, 9, 16, dtype=dtype)
    is_pad = torch.zeros(2, 9, dtype=torch.bool)
    is_pad[1, 5:] = True
    ref_out, ref_weights = reference(queries, memory, memory, key_padding_mask=is_pad)
    out, weights = ours(queries, memory, mask=~is_pad[:, None, None, :], need_weights=True)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.mean(dim=1), ref_weights, atol=tol, rtol=tol)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(need_weights):
    torch.manual_seed(3)
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, 3, 8)
    mask = torch.ones(2, 1, 1, 3, dtype=torch.bool)
    mask[1] = False  # the second sentence has nothing to attend to
    out, weights = mha(x, mask=mask, need_weights=need_weights)
    assert not torch.isnan(out).any()
    bias_only = mha.out_proj.bias.expand(3, 8)  # a zero context vector, projected by W^O
    torch.testing.assert_close(out[1], bias_only)
    if need_weights:
        assert (weights[1] == 0).all()
        torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 3))


def test_masked_keys_get_exactly_zero_weight():
    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 2).eval()
    mask = torch.tensor([True, True, False, False])[None, None, None, :]
    _, weights = mha(torch.randn(1, 4, 8), mask=mask, need_weights=True)
    assert (weights[..., 2:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 4))


def test_causal_mask_with_offset_lets_new_queries_see_the_past():
    mask = causal_mask(2, 4)[0, 0]
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_the_fused_kernel_and_the_written_out_formula_agree_also_without_keys():
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.rand(2, 1, 5, 6) < 0.5
    mask[1, 0, 2] = False  # a query with no key: zeros, never NaN, on both paths
    expected, _ = scaled_dot_product_attention(q, k, v, mask)
    out = fused_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[1, :, 2] == 0).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradcheck_attention_function():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False]] * 3)[None].expand(2, 3, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask)[0], (q, k, v)
    )
