"""qkv::screened_best, a one-row greedy program's next token (`packed_linear.ScreenedOutput`): from an
int8 screening of the output product and the exact fp32 logits of its few candidates, equal to the
full product's argmax (ties, banned ids, all banned, tiny and non-finite inputs)."""

import pytest
import torch

from qkv.inference import native

pytestmark = pytest.mark.skipif(
    native.load() is not None, reason="qkv's operators do not load here"
)


def full_best(x, packed, out_features, bias):
    return (torch.ops.qkv.packed_linear(x, packed, out_features, 0) + bias).argmax(dim=-1)


@pytest.mark.parametrize("case", range(120))
def test_the_screened_best_token_is_the_full_products(case):
    generator = torch.Generator().manual_seed(case)
    out_features = int(torch.randint(1, 300, (1,), generator=generator))
    depth = int(torch.randint(1, 70, (1,), generator=generator))
    weight = torch.randn(out_features, depth, generator=generator) * (0.1 if case % 2 else 3.0)
    if case % 5 == 0 and out_features > 3:
        weight[out_features // 2] = weight[1]  # two features always equal: the first wins
    if case % 7 == 0:
        weight[0] = 0
    product_bias = (
        torch.randn(out_features, generator=generator) if case % 3 else torch.zeros(out_features)
    )
    packed = torch.ops.qkv.pack_linear(weight, product_bias)
    q, scales = torch.ops.qkv.pack_screen(weight)
    banned = torch.zeros(out_features)
    if out_features > 3 and case % 4 == 0:
        banned[:2] = float("-inf")
    if case % 11 == 0:
        banned[:] = float("-inf")
    x = torch.randn(3, depth, generator=generator) * (1e-30 if case % 13 == 0 else 1.0)
    if case % 17 == 0:
        x[1, 0] = float("nan")
    got = torch.ops.qkv.screened_best(x, packed, q, scales, banned)
    assert torch.equal(got, full_best(x, packed, out_features, banned))
