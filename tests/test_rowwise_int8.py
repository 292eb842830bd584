"""qkv's own int8 product (`qkv::packed_int8_linear`, qkv.inference.rowwise_int8): the formula it
states, computed again here in exact integer arithmetic; each row quantised on its own, so that a
row's product does not depend on the others; close to fp32; its errors; AMX's products the same as
VNNI's; and the int8 engine's translations of a sentence the same alone and in a batch where the
engines take it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qkv.inference import native, prepare_for_decoding, rowwise_int8
from qkv.inference.linear import PreparedLinear, int8_works
from qkv.inference.rowwise_int8 import RowwiseInt8Linear
from qkv.search import beam_search, greedy_search
from test_search import random_model, random_sources

pytestmark = [
    pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}"),
    pytest.mark.threads(2),
]


@pytest.fixture(autouse=True)
def operators():
    assert native.load() is None


def levels() -> float:
    """The input's top level: bytes with VNNI, 7 bits with AVX2's pairs of products."""
    return 127.0 if native.int8_instructions() == "avx2" else 255.0


def reference(x, weight, bias, relu=False):
    """The product as rowwise_int8.cpp states it, its integer sums exact (float64)."""
    scales = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
    q = torch.round(weight / scales[:, None]).clamp(-127, 127)  # half to even, as nearbyint
    rows = x.reshape(-1, x.size(-1))
    low, high = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    row_scale = torch.where(high > low, (high - low) / levels(), torch.ones_like(low))
    u = ((rows - low) * (1 / row_scale)).clamp(0, levels()).round()
    sums = u.double() @ q.double().T  # exact: integers far below 2^53
    out = scales.double() * (row_scale.double() * sums + low.double() * q.double().sum(dim=1))
    if bias is not None:
        out = out + bias.double()
    out = out.float().reshape(*x.shape[:-1], weight.size(0))
    return out.clamp_min(0) if relu else out


@pytest.mark.parametrize(
    ("rows", "d_in", "d_out", "relu", "with_bias"),
    [
        (1, 8, 16, False, True),
        (5, 256, 256, False, True),  # a beam of 5: one block of rows, panels 4 at a time
        (7, 13, 37, True, True),  # blocks 4 + 3, inputs not a multiple of 4, a part panel
        (13, 64, 200, False, False),  # 3 blocks of rows, no bias
        (300, 512, 70, True, True),  # many rows: their quantisation shared among threads
    ],
)
def test_the_product_is_the_formula_it_states(rows, d_in, d_out, relu, with_bias):
    generator = torch.Generator().manual_seed(rows * 1000 + d_in)
    weight = torch.randn(d_out, d_in, generator=generator) * 0.1
    bias = torch.randn(d_out, generator=generator) if with_bias else None
    x = torch.randn(rows, d_in, generator=generator) * 3 + 0.5
    product = RowwiseInt8Linear(weight, bias, relu)(x)
    assert product.shape == (rows, d_out)
    expected = reference(x, weight, bias, relu)
    torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-5)
    if relu:
        assert (product >= 0).all() and (product == 0).any()
    # and close to fp32: within 3% of the product's norm (~1% seen; fbgemm's one scale, ~2%)
    exact = F.linear(x, weight, bias)
    exact = exact.clamp_min(0) if relu else exact
    assert (product - exact).norm() <= 0.03 * exact.norm()


def test_a_rows_product_is_the_same_alone_and_among_others():
    generator = torch.Generator().manual_seed(0)
    product = RowwiseInt8Linear(torch.randn(50, 24, generator=generator))
    x = torch.randn(9, 3, 24, generator=generator)
    x[4] *= 100  # a row of another range: fbgemm's one scale would have changed every row's
    together = product(x)
    assert together.shape == (9, 3, 50)
    for i in (0, 4, 8):
        assert torch.equal(product(x[i : i + 1]), together[i : i + 1])


def test_constant_rows_and_no_rows():
    weight, bias = torch.randn(20, 8), torch.arange(20.0)
    product = RowwiseInt8Linear(weight, bias)
    x = torch.stack([torch.zeros(8), torch.full((8,), 2.5)])  # no range: no scale to divide by
    out = product(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], bias)
    assert product(torch.randn(0, 8)).shape == (0, 20)


def test_its_errors_say_what_was_expected():
    product = RowwiseInt8Linear(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="x has 9 features, not the weights' in_features"):
        product(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="weights from qkv::pack_int8_linear"):
        torch.ops.qkv.packed_int8_linear(
            torch.randn(2, 8), torch.zeros(2, 2), product.params, 20, 0
        )
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.qkv.pack_int8_linear(torch.randn(3, 4, 5), None)


@pytest.mark.skipif(int8_works() is not None, reason=f"{int8_works()}")
def test_the_int8_engine_takes_it_where_it_serves_and_then_a_sentence_is_the_same_in_a_batch():
    engine = prepare_for_decoding(random_model(seed=5), int8=True)
    prepared = engine.output
    assert isinstance(prepared, PreparedLinear)
    if rowwise_int8.unavailable() is not None:
        assert prepared.rowwise is None
        pytest.skip(rowwise_int8.unavailable())
    assert isinstance(prepared.rowwise, RowwiseInt8Linear)
    sources = random_sources([9, 5, 7], seed=3)
    for search, options in ((greedy_search, {}), (beam_search, {"beam_size": 4})):
        ids, scores = search(engine, sources, max_len=12, **options)
        for i, length in enumerate((9, 5, 7)):
            alone_ids, alone_scores = search(
                engine, sources[i : i + 1, :length], max_len=12, **options
            )
            n = alone_ids.size(-1)
            assert torch.equal(alone_ids[0], ids[i, ..., :n])
            assert (ids[i, ..., n:] == 0).all()
            # Not to 1e-5: the fp32 parts sum in another order in a batch (its padding), and an
            # input on the edge of a rounding step then lands one step away, and every later step
            # with it. 25 random batches of 3 (12 tokens), alone against in the batch: up to 0.023
            # (greedy) and 0.018 (beam 4) as an AMD Zen 4 comes, 0.021 held to AVX2 (session 55).
            torch.testing.assert_close(alone_scores[0], scores[i], rtol=1e-2, atol=2e-2)


VNNI_PRODUCTS = """
import sys, torch
from qkv.inference import native
from qkv.inference.rowwise_int8 import RowwiseInt8Linear
assert native.load() is None and native.int8_instructions() == "vnni", native.int8_instructions()
weight, bias, x = torch.load(sys.argv[1])
torch.save(RowwiseInt8Linear(weight, bias, relu=True)(x), sys.argv[2])
"""


def test_amxs_tiles_give_vnnis_products(tmp_path):
    """Where AMX is taken (3 rows or more), the products are VNNI's, as a CPU without AMX (AMD Zen
    4/5) computes them: the same integer sums, the same arithmetic after them."""
    if native.int8_instructions() != "amx":
        pytest.skip(f"no AMX here: {native.int8_instructions()}")
    generator = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(70, 200, generator=generator), torch.randn(70, generator=generator)
    x = torch.randn(2, 19, 200, generator=generator)  # 38 rows: tiles of 16, 16 and 6
    torch.save((weight, bias, x), tmp_path / "in.pt")
    environment = {**os.environ, "QKV_INT8_AMX": "0"}
    command = [
        sys.executable,
        "-c",
        VNNI_PRODUCTS,
        str(tmp_path / "in.pt"),
        str(tmp_path / "out.pt"),
    ]
    subprocess.run(command, env=environment, check=True, timeout=300)
    assert torch.equal(
        RowwiseInt8Linear(weight, bias, relu=True)(x), torch.load(tmp_path / "out.pt")
    )
