"""qkv::screened_best, a one-row greedy program's next token (`packed_linear.ScreenedOutput`): from an
int8 screening of the output product and the exact fp32 logits of its few candidates, equal to the
full product's argmax (ties, banned ids, all banned, tiny and non-finite inputs)."""

import pytest
import torch

from qkv.inference import native

pytestmark = [
    pytest.mark.skipif(native.load() is not None, reason="qkv's operators do not load here"),
    pytest.mark.threads(2),
]


def full_best(x, packed, out_features, bias):
    return (torch.ops.qkv.packed_linear(x, packed, out_features, 0) + bias).argmax(dim=-1)


def random_case(case: int, most_features: int, most_depth: int):
    """A random output product and banned ids' bias: weights large or small, two features always
    equal (`twins`: the first must win), a feature of zeros, a bias or none, two ids banned or all."""
    generator = torch.Generator().manual_seed(case)
    out_features = int(torch.randint(1, most_features, (1,), generator=generator))
    depth = int(torch.randint(1, most_depth, (1,), generator=generator))
    weight = torch.randn(out_features, depth, generator=generator) * (0.1 if case % 2 else 3.0)
    bias = torch.randn(out_features, generator=generator) if case % 3 else torch.zeros(out_features)
    twins = case % 5 == 0 and out_features > 3
    if twins:
        weight[out_features // 2], bias[out_features // 2] = weight[1], bias[1]
    if case % 7 == 0:
        weight[0] = 0
    banned = torch.zeros(out_features)
    if out_features > 3 and case % 4 == 0:
        banned[:2] = float("-inf")
    if case % 11 == 0:
        banned[:] = float("-inf")
    return generator, weight, bias, banned, twins


@pytest.mark.parametrize("case", range(120))
def test_the_screened_best_token_is_the_full_products(case):
    generator, weight, product_bias, banned, _ = random_case(case, 300, 70)
    depth, out_features = weight.size(1), weight.size(0)
    packed = torch.ops.qkv.pack_linear(weight, product_bias)
    q, scales = torch.ops.qkv.pack_screen(weight)
    x = torch.randn(3, depth, generator=generator) * (1e-30 if case % 13 == 0 else 1.0)
    if case % 17 == 0:
        x[1, 0] = float("nan")
    got = torch.ops.qkv.screened_best(x, packed, q, scales, banned)
    assert torch.equal(got, full_best(x, packed, out_features, banned))


def exact_logits(x, weight, bias, banned):
    return x.double() @ weight.double().T + bias.double() + banned.double()


def screen_of_rows(weight, bias):
    q, params = torch.ops.qkv.pack_int8_linear(weight, bias)
    l1 = q.abs().to(torch.int32).sum(dim=(1, 3)).flatten()[: weight.size(0)].float()
    return q, params, l1


@pytest.mark.parametrize("case", range(120))
def test_the_screened_best_tokens_of_many_rows_are_the_largest_exact_logits(case):
    """qkv::screened_best_rows, a greedy program of many rows: each row's token is the one of the
    largest exact logit (float64 here; fp32's rounding apart where two are that close), the first of
    equal features, never a banned id unless all are, and the first NaN of a row that has one."""
    generator, weight, bias, banned, twins = random_case(case, 400, 90)
    out_features, depth = weight.shape
    rows = int(torch.randint(2, 40, (1,), generator=generator))
    x = torch.randn(rows, depth, generator=generator) * (1e-30 if case % 13 == 0 else 1.0)
    if case % 17 == 0:
        x[1, 0] = float("nan")
    if case % 19 == 0:
        x[0] = 0.5  # a row of one value: its quantisation step is no guide
    if case % 23 == 0:
        x[0] = 3e37  # logits past float's range: every one computed
    if case % 29 == 0:
        x[-1] *= 1e35  # large, but the screen's bounds in range
    got = torch.ops.qkv.screened_best_rows(x, weight, bias, *screen_of_rows(weight, bias), banned)
    logits = exact_logits(x, weight, bias, banned)
    for r in range(rows):
        row, token = logits[r], int(got[r])
        if x[r].isnan().any():  # every logit NaN: the first, as torch.argmax
            assert token == 0
            continue
        if not (x[r] @ weight.T + bias).isfinite().all():  # past float's range: which of the
            assert 0 <= token < out_features  # infinities comes first depends on the sums' order
            continue
        if row.isinf().all():  # every id banned
            continue
        if twins and banned[1] == 0:
            assert token != out_features // 2, "the second of two equal features"
        tolerance = 1e-5 * (1 + float((x[r].double().abs() @ weight.double().abs().T).max()))
        assert float(row[token]) >= float(row.max()) - tolerance, (r, token, int(row.argmax()))
    if case % 11 == 0:  # every id banned: the first, as torch.argmax of -inf everywhere
        finite = [r for r in range(rows) if (x[r] @ weight.T + bias).isfinite().all()]
        assert finite and all(int(got[r]) == 0 for r in finite)


def test_the_screened_tokens_of_many_rows_are_each_rows_own_whatever_the_batch():
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(700, 64, generator=generator), torch.randn(700, generator=generator)
    screen, banned = screen_of_rows(weight, bias), torch.zeros(700)
    x = torch.randn(33, 64, generator=generator)
    together = torch.ops.qkv.screened_best_rows(x, weight, bias, *screen, banned)
    alone = [
        torch.ops.qkv.screened_best_rows(x[r : r + 2], weight, bias, *screen, banned)[0]
        for r in range(32)
    ]
    assert together[:32].tolist() == [int(t) for t in alone]
    assert torch.equal(together, exact_logits(x, weight, bias, banned).argmax(dim=1))
