"""qkv's own operators (qkv.inference.native): the beam program's attention, the formula of
`attend_with_new_together` over `BeamCache`'s layout, and the products of packed weights
(`qkv::packed_linear`, qkv.inference.packed_linear), as PyTorch's and called by the programs; built
once and kept; where they cannot be built, the steps take PyTorch's operators and say so once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.inference import aoti, buckets, native, packed_linear, prepare_for_decoding
from qkv.inference import compiled as compiled_module
from qkv.inference import topk as topk_module
from qkv.inference.beam_program import attend_with_new_together, split_heads
from qkv.inference.compiled import CompiledEngine
from qkv.inference.packed_linear import PackedLinear
from qkv.inference.step_programs import BEAMS, GREEDY, GREEDY_EVERY_LOGIT
from test_beam_program import c_calls
from test_compiled import (
    QUICK,
    assert_same_beams,
    assert_same_greedy,
    encoder_uncompiled,
    uncompiled,
)
from test_search import random_model, random_sources
from torch_versions import needs_compiled_step

needs_operator = pytest.mark.skipif(
    native.unavailable() is not None, reason=f"{native.unavailable()}"
)
pytestmark = pytest.mark.threads(2)


@pytest.fixture(autouse=True)
def compile_cache(tmp_path, monkeypatch):
    """Compiled programs, if any, go to a fresh folder, never to the user's cache."""
    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))


def history_bias(sentences: int, beams: int, positions: int, generator) -> torch.Tensor:
    """(sentences, 1, beams, positions x beams) as `BeamCache` keeps it: of each position's slots
    (one a beam), each beam sees the one its ancestor wrote."""
    bias = torch.full((sentences, 1, beams, positions * beams), -math.inf)
    ancestor = torch.randint(0, beams, (sentences, beams, positions), generator=generator)
    slot = torch.arange(positions) * beams + ancestor  # (sentences, beams, positions)
    return bias.scatter_(-1, slot[:, None], 0.0)


@needs_operator
@pytest.mark.parametrize("d_head", [64, 12, 5], ids=["d_head 64", "d_head 12", "d_head 5"])
def test_each_beam_attends_to_its_own_history_by_the_programs_formula(d_head):
    assert native.load() is None
    generator = torch.Generator().manual_seed(d_head)
    sentences, heads, beams, positions, capacity = 3, 2, 4, 6, 40
    d_model = heads * d_head
    # The cache's buffers: views of one larger block, as BeamCache's layers are.
    block = torch.randn(2, 2, sentences, heads, capacity, d_head, generator=generator)
    keys, values = block[0, 1], block[1, 1]
    bias = history_bias(sentences, beams, positions, generator)
    projected = torch.randn(sentences * beams, 1, 3 * d_model, generator=generator)
    q, new_k, new_v = split_heads(projected, sentences, heads)
    written = bias.size(-1)
    history_k, history_v = keys[:, :, :written], values[:, :, :written]
    expected = attend_with_new_together(q, history_k, history_v, bias, new_k, new_v)
    got = torch.ops.qkv.beam_self_attention(projected, keys, values, bias)
    assert got.shape == (sentences * beams, 1, d_model)
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=0, atol=1e-5)
    # Slots no beam sees are never read: what is in them does not count.
    unseen = (bias == -math.inf).all(dim=2)[:, :, :, None]  # (sentences, 1, written, 1)
    assert unseen.any()
    keys[:, :, :written].masked_fill_(unseen, float("nan"))
    values[:, :, :written].masked_fill_(unseen, float("nan"))
    again = torch.ops.qkv.beam_self_attention(projected, keys, values, bias)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@needs_operator
def test_the_operator_says_what_it_expects():
    assert native.load() is None
    keys = torch.zeros(2, 2, 8, 4)
    bias = torch.zeros(2, 1, 3, 5)
    with pytest.raises(RuntimeError, match=r"projected: \(sentences x beams, 1, 3 x d_model\)"):
        torch.ops.qkv.beam_self_attention(torch.zeros(5, 1, 24), keys, keys, bias)
    with pytest.raises(RuntimeError, match="written at most the keys' capacity"):
        torch.ops.qkv.beam_self_attention(
            torch.zeros(6, 1, 24), keys, keys, torch.zeros(2, 1, 3, 9)
        )


@needs_operator
def test_the_log_softmax_overwrites_the_logits_with_pytorchs_log_probabilities():
    assert native.load() is None
    generator = torch.Generator().manual_seed(1)
    block = torch.randn(7, 1003, generator=generator) * 8  # odd width: the vectors' tails
    before = block.clone()
    logits = block[1:6, :1001]  # rows a stride apart, as a slice of a larger block
    expected = torch.log_softmax(logits, dim=-1)
    got = torch.ops.qkv.log_softmax_(logits)
    assert got.data_ptr() == logits.data_ptr()  # in place
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    outside = torch.ones_like(block, dtype=torch.bool)
    outside[1:6, :1001] = False
    assert torch.equal(block[outside], before[outside])  # nothing written past the rows
    with pytest.raises(RuntimeError, match=r"logits: \(rows, vocab\) float32"):
        torch.ops.qkv.log_softmax_(torch.zeros(4, 6).t())


@needs_operator
def test_the_operator_is_built_once_and_kept(tmp_path, monkeypatch):
    folder = tmp_path / "native"
    monkeypatch.setenv(native.CACHE_VARIABLE, str(folder))
    said = []
    assert native.load(said.append) is None
    path = native.library_path()
    assert (
        path.parent == folder
        and path.exists()
        and said == ["building qkv's operators for decoding (once, ~10 s)"]
    )
    built = path.stat().st_mtime_ns
    assert native.load(said.append) is None and len(said) == 1  # loaded in this process: kept
    native._loaded.clear()  # as a new process would: the library is found, not built again
    assert native.load(said.append) is None and len(said) == 1
    assert path.stat().st_mtime_ns == built
    assert [p.name for p in folder.iterdir()] == [path.name]  # nothing half built left beside


@needs_operator
def test_a_failed_build_says_why_in_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "native"
    monkeypatch.setenv(native.CACHE_VARIABLE, str(folder))
    command = native.compile_command

    def broken(source, output):
        return [*command(source, output), "-DQKV_BROKEN", "-include", "no_such_header.h"]

    monkeypatch.setattr(native, "compile_command", broken)
    why = native.load()
    assert why.startswith("qkv's operators did not build: ") and "\n" not in why
    assert "no_such_header.h" in why
    assert list(folder.iterdir()) == []


@needs_operator
def test_a_cache_folder_that_cannot_be_written_says_why(tmp_path, monkeypatch):
    taken = tmp_path / "a file"
    taken.write_text("not a folder")
    monkeypatch.setenv(native.CACHE_VARIABLE, str(taken))
    why = native.load()
    assert why.startswith(f"qkv's operators could not be kept in {taken}: ")
    assert "\n" not in why


@needs_operator
def test_a_library_that_does_not_load_says_why(tmp_path, monkeypatch):
    folder = tmp_path / "native"
    monkeypatch.setenv(native.CACHE_VARIABLE, str(folder))
    monkeypatch.setattr(native, "_registered", lambda: False)  # as in a process without them
    folder.mkdir()
    native.library_path().write_bytes(b"not a library")
    why = native.load()
    assert why.startswith(f"qkv's operators did not load from {native.library_path()}: ")
    assert "\n" not in why


@needs_compiled_step
def test_switched_off_the_beam_step_attends_with_pytorchs_operators(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "0")
    model = random_model(seed=3)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    said = []
    engine.beam_programs.say = said.append
    engine.beam_programs.use_native(4)
    engine.beam_programs.use_native(4)
    assert said == ["QKV_NATIVE=0: beam search takes PyTorch's operators"]
    assert engine.beam_programs.step.native is False
    key_without = engine.beam_programs.package_path(4).name
    assert_same_beams(engine, reference, random_sources([5, 8, 4], seed=2), beam_size=4, max_len=8)
    if native.load() is None:  # with it, another program: another key
        monkeypatch.delenv(native.SWITCH)
        with_operator = uncompiled(model)
        with_operator.beam_programs.use_native(4)
        assert with_operator.beam_programs.step.native is True
        assert with_operator.beam_programs.package_path(4).name != key_without


@needs_operator
@pytest.mark.parametrize("rows, n, k", [(5, 8000, 10), (1, 17, 17), (3, 37, 10), (2, 9, 1)])
def test_row_topk_is_pytorchs_topk_first_in_the_row_first_among_equals(rows, n, k):
    assert native.load() is None
    generator = torch.Generator().manual_seed(n)
    distinct = torch.randn(rows, n, generator=generator)  # no two equal: PyTorch's very indices
    top, at = torch.ops.qkv.row_topk(distinct, k)
    assert torch.equal(top, distinct.topk(k, dim=1).values)
    assert torch.equal(at, distinct.topk(k, dim=1).indices)
    for values in (
        torch.randint(0, 4, (rows, n), generator=generator).float(),  # many equal values
        torch.randn(rows, n, generator=generator).masked_fill(torch.arange(n) % 3 > 0, -math.inf),
    ):
        top, at = torch.ops.qkv.row_topk(values, k)
        expected = values.topk(k, dim=1)
        assert torch.equal(top, expected.values)
        assert torch.equal(values.gather(1, at), top)
        assert all(len(set(row)) == k for row in at.tolist())  # k different positions
        equal_to_next = top[:, 1:] == top[:, :-1]
        assert (at[:, 1:] > at[:, :-1])[equal_to_next].all()
        for row, chosen, last in zip(values, at.tolist(), top[:, -1], strict=True):
            equal_to_last = (row == last).nonzero().flatten().tolist()
            taken = [i for i in chosen if row[i] == last]
            assert taken == equal_to_last[: len(taken)]  # the first of them in the row


@needs_operator
def test_row_topk_says_what_it_expects():
    assert native.load() is None
    with pytest.raises(RuntimeError, match="k must be between 1 and 4, got 5"):
        torch.ops.qkv.row_topk(torch.zeros(2, 4), 5)
    with pytest.raises(RuntimeError, match=r"x must be \(rows, n\) float32"):
        torch.ops.qkv.row_topk(torch.zeros(2, 4, dtype=torch.float64), 1)


@needs_operator
@pytest.mark.parametrize("rows, vocab, k", [(5, 8000, 10), (1, 37, 5), (3, 1001, 1), (2, 9, 9)])
def test_log_softmax_topk_is_the_log_softmax_the_bias_and_row_topk_in_one_call(rows, vocab, k):
    assert native.load() is None
    generator = torch.Generator().manual_seed(vocab)
    block = torch.randn(rows + 1, vocab + 3, generator=generator) * 8
    logits = block[1:, :vocab]  # rows a stride apart: the operator takes them as they are
    bias = torch.zeros(vocab)
    bias[[0, vocab // 2]] = -math.inf  # banned ids
    log_probs, top, at = torch.ops.qkv.log_softmax_topk(logits, bias, k)
    torch.testing.assert_close(log_probs, torch.log_softmax(logits, -1) + bias, rtol=0, atol=1e-5)
    expected_top, expected_at = torch.ops.qkv.row_topk(log_probs, k)  # its own log-probabilities'
    assert torch.equal(top, expected_top) and torch.equal(at, expected_at)
    assert torch.isneginf(log_probs[:, [0, vocab // 2]]).all()
    with pytest.raises(RuntimeError, match=f"k must be between 1 and {vocab}"):
        torch.ops.qkv.log_softmax_topk(logits, bias, vocab + 1)
    with pytest.raises(RuntimeError, match=r"bias must be \(vocab,\) float32"):
        torch.ops.qkv.log_softmax_topk(logits, bias[:-1], k)
    with pytest.raises(RuntimeError, match=r"logits must be \(rows, vocab\) float32"):
        torch.ops.qkv.log_softmax_topk(logits.double(), bias, k)


@needs_operator
@pytest.mark.parametrize("rows, vocab", [(32, 8000), (5, 33), (3, 16), (2, 1)])
def test_biased_argmax_is_pytorchs_argmax_of_the_sum_on_ties_nan_and_infinities(rows, vocab):
    assert native.load() is None
    generator = torch.Generator().manual_seed(vocab)
    bias = torch.zeros(vocab)
    bias[0] = -math.inf  # a banned id
    distinct = torch.randn(rows, vocab + 5, generator=generator)[:, :vocab]  # rows a stride apart
    ties = torch.randint(0, 3, (rows, vocab), generator=generator).float()  # many equal values
    with_nan = distinct.clone()
    with_nan[0, vocab // 2] = with_nan[-1, -1] = math.nan  # NaN is the largest: the first one
    banned_inf = distinct.clone()
    banned_inf[:, 0] = math.inf  # inf + -inf: NaN
    for logits in (distinct, ties, with_nan, banned_inf, torch.full((rows, vocab), -math.inf)):
        expected = (logits + bias).argmax(dim=-1)
        assert torch.equal(torch.ops.qkv.biased_argmax(logits, bias), expected)
        assert torch.equal(topk_module.biased_argmax(logits, bias, native=True), expected)
    with pytest.raises(RuntimeError, match=r"bias must be \(vocab,\) float32"):
        torch.ops.qkv.biased_argmax(distinct, bias[:-1] if vocab > 1 else bias.double())


@needs_compiled_step
@needs_operator
def test_one_sentences_beam_program_finds_its_candidates_and_multiplies_with_qkvs_operators(
    monkeypatch,
):
    """As where only `packed_linear.FEW_ROWS_ON` holds this CPU: the programs of a few rows take
    qkv's products, one row, many rows and beams on many sentences do not."""
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)
    monkeypatch.setattr(packed_linear, "NATIVE_PRODUCTS_ON", ())
    monkeypatch.setattr(packed_linear, "MANY_ROWS_ON", ())
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", (torch.backends.cpu.get_cpu_capability(),))
    monkeypatch.setattr(packed_linear, "ONE_ROW_ON", ())
    model = random_model(seed=5, tgt_vocab_size=500)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    assert_same_beams(engine, reference, random_sources([7], seed=2), beam_size=5, max_len=12)
    assert engine.compiled_rows == {5}
    # each row's log-probabilities and candidates, then one sentence's extensions over the rows
    assert c_calls("aoti_torch_cpu_log_softmax_topk", engine.package_path(5)) == 1
    assert c_calls("aoti_torch_cpu_row_topk", engine.package_path(5)) == 1
    assert c_calls(PRODUCT, engine.package_path(5)) == 6 * model.config.n_decoder_layers + 1
    assert engine.step_module(GREEDY, 2).products is not None
    assert engine.step_module(GREEDY, 1).products is None  # one row: Inductor's own
    assert engine.step_module(GREEDY, 8).products is None and engine.beam_products() is None
    # Without qkv's operator for the candidates, another program: PyTorch's topk, in chunks
    monkeypatch.setattr(compiled_module.CompiledEngine, "NATIVE_CANDIDATES", False)
    plain = CompiledEngine(model)
    assert plain.package_path(5) != engine.package_path(5)
    assert_same_beams(plain, reference, random_sources([7], seed=2), beam_size=5, max_len=12)
    assert c_calls("aoti_torch_cpu_row_topk", plain.package_path(5)) == 0
    assert c_calls("aoti_torch_cpu_log_softmax_topk", plain.package_path(5)) == 0


@needs_compiled_step
@needs_operator
def test_the_beam_step_with_the_operator_gives_the_eager_engines_beams():
    model = random_model(seed=4, norm_first=True)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    engine.beam_programs.use_native(5)
    assert engine.beam_programs.step.native is True
    src = random_sources([5, 8, 4, 6], seed=3)
    assert_same_beams(engine, reference, src, beam_size=5, max_len=9, n_best=2)


@needs_operator
@pytest.mark.parametrize("rows", [1, 5, 7, 8, 32, 37])
@pytest.mark.parametrize(
    "in_features, out_features",
    [(16, 16), (257, 33), (600, 250)],
    ids=["16x16", "257x33", "600x250"],
)
def test_packed_products_are_pytorchs_for_any_rows_depth_and_width(rows, in_features, out_features):
    """Every block of rows (6, and the rest by 4 or fewer), one row by a loop of its own (four sums
    taking the input features in turn, depths not a multiple of 4), a last panel narrower than 16
    output features, depths past one stretch (256), and a ReLU applied after the last stretch
    only."""
    assert native.load() is None
    generator = torch.Generator().manual_seed(rows * in_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, 1, in_features, generator=generator)  # as a step's (rows, 1, d_model)
    packed = torch.ops.qkv.pack_linear(weight, bias)
    expected = F.linear(x, weight, bias)
    got = torch.ops.qkv.packed_linear(x, packed, out_features, 0)
    assert got.shape == (rows, 1, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    relu = torch.ops.qkv.packed_linear(x, packed, out_features, 1)
    assert (expected < 0).any()
    torch.testing.assert_close(relu, expected.clamp_min(0), rtol=1e-5, atol=1e-5)
    # Strided input (a view), and a module without bias.
    wide = torch.randn(rows, 2 * in_features, generator=generator)[:, ::2]
    module = PackedLinear(weight)
    torch.testing.assert_close(module(wide), F.linear(wide, weight), rtol=1e-5, atol=1e-5)


@needs_operator
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_a_product_shared_among_two_threads_is_one_threads_to_the_bit(rows):
    """This module runs with two threads (`threads(2)`, also under pytest-xdist, whose workers take
    one), so the products above were split among them; each output is one thread's work, so the
    split changes no bit."""
    assert native.load() is None and torch.get_num_threads() == 2
    generator = torch.Generator().manual_seed(rows)
    weight, bias = (
        torch.randn(1000, 512, generator=generator),
        torch.randn(1000, generator=generator),
    )
    x = torch.randn(rows, 1, 512, generator=generator)
    packed = torch.ops.qkv.pack_linear(weight, bias)
    shared = torch.ops.qkv.packed_linear(x, packed, 1000, 0)
    torch.set_num_threads(1)  # given back by conftest.threads_as_they_were
    assert torch.equal(torch.ops.qkv.packed_linear(x, packed, 1000, 0), shared)


@needs_operator
def test_the_packed_product_says_what_it_expects():
    assert native.load() is None
    packed = torch.ops.qkv.pack_linear(torch.ones(20, 8), torch.zeros(20))
    with pytest.raises(RuntimeError, match="as the packed weight"):
        torch.ops.qkv.packed_linear(torch.ones(2, 9), packed, 20, 0)
    with pytest.raises(RuntimeError, match="of out_features output features"):
        torch.ops.qkv.packed_linear(torch.ones(2, 8), packed, 40, 0)
    with pytest.raises(RuntimeError, match="bias: \\(out_features,\\)"):
        torch.ops.qkv.pack_linear(torch.ones(20, 8), torch.zeros(21))


PRODUCT = "aoti_torch_cpu_packed_linear"  # the C function a program calls for each product


@pytest.fixture
def products_here(monkeypatch):
    """qkv's products taken whatever the CPU's capability (they are AVX2's, which runs on AVX-512
    too); programs compiled quickly."""
    here = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(packed_linear, "NATIVE_PRODUCTS_ON", (here,))
    # 1-7 rows: Inductor's products, so that only the programs of many rows take qkv's
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", ())
    monkeypatch.setattr(packed_linear, "ONE_ROW_ON", ())
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)


@needs_compiled_step
@needs_operator
def test_a_greedy_program_of_32_rows_calls_qkvs_products_and_gives_the_eager_ids(
    products_here, monkeypatch
):
    monkeypatch.setattr(buckets, "SHRINK_TO", (8,))  # two programs to compile, not five
    model = random_model(seed=6, max_len=80)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    encoder_uncompiled(engine)
    assert engine.step_module(GREEDY, 32).products is not None
    assert engine.step_module(BEAMS, 8).products is not None
    assert engine.step_module(GREEDY, 5).products is None  # fewer rows: Inductor's own
    # 20 sentences, the program of 32 rows; limits of 51-70 tokens: from step 51, one ends a step.
    src = random_sources(list(range(1, 21)), seed=6)
    assert_same_greedy(engine, reference, src)
    # Then the program of 8 rows as the sentences finish, with qkv's products too, every one a C
    # function, not through the dispatcher: 6 a layer, and the output's where the search keeps
    # scores, each row's best token then by qkv's argmax (`qkv::biased_argmax`); without scores,
    # the output product screened (`qkv::screened_best_rows`). (Programs of fewer rows take
    # Inductor's: `step_module(GREEDY, 5)` above.)
    assert set(engine.programs) == {(r, k) for r in (32, 8) for k in (GREEDY, GREEDY_EVERY_LOGIT)}
    products = 6 * model.config.n_decoder_layers
    for kind, output, screens, argmaxes in ((GREEDY, 0, 1, 0), (GREEDY_EVERY_LOGIT, 1, 0, 1)):
        for rows in (32, 8):
            path = engine.package_path(rows, kind)
            assert c_calls(PRODUCT, path) == products + output
            assert c_calls("aoti_torch_cpu_screened_best_rows", path) == screens
            assert c_calls("aoti_torch_cpu_biased_argmax", path) == argmaxes
    # Programs with PyTorch's products are other programs: another key.
    key_of = {rows: engine.package_path(rows).stem.rsplit("-", 1)[1] for rows in (4, 8)}
    assert key_of[4] != key_of[8]


@needs_compiled_step
@needs_operator
def test_a_one_row_program_calls_qkvs_products_and_gives_the_eager_ids(monkeypatch):
    """As on an AVX2 CPU (`packed_linear.ONE_ROW_ON`), whatever this one is: greedy on one sentence
    steps by qkv's one-row products, every one a C function, finds its next token by screening the
    output product (`qkv::screened_best`, a C function too), and finds the eager engine's ids and
    scores (these from a program of its own that computes every logit and does not screen)."""
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)
    monkeypatch.setattr(packed_linear, "ONE_ROW_ON", (torch.backends.cpu.get_cpu_capability(),))
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", ())
    model = random_model(seed=8)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    encoder_uncompiled(engine)
    assert engine.step_module(GREEDY, 1).products is not None
    assert engine.step_module(GREEDY, 2).products is None  # FEW_ROWS_ON emptied above
    assert_same_greedy(engine, reference, random_sources([9], seed=8), max_len=20, min_len=20)
    assert set(engine.programs) == {(1, GREEDY), (1, GREEDY_EVERY_LOGIT)}
    screening, every_logit = (engine.package_path(1, k) for k in (GREEDY, GREEDY_EVERY_LOGIT))
    layers = model.config.n_decoder_layers
    assert c_calls(PRODUCT, screening) == 6 * layers
    assert c_calls("aoti_torch_cpu_screened_best", screening) == 1
    assert c_calls(PRODUCT, every_logit) == 6 * layers + 1
    assert c_calls("aoti_torch_cpu_screened_best", every_logit) == 0
    assert engine.step_module(GREEDY, 1).screens(1)
    assert not engine.step_module(GREEDY_EVERY_LOGIT, 1).screens(1)
    # (Programs of more rows screen too, whatever their products: test_compiled's
    # test_the_compiled_step_gives_the_eager_ids_and_is_compiled_once_and_kept.)
    assert engine.step_module(GREEDY, 2).screens(2)
    assert not engine.step_module(GREEDY_EVERY_LOGIT, 2).screens(2)


@needs_compiled_step
@needs_operator
def test_the_beam_program_calls_qkvs_products_and_gives_the_eager_beams(products_here, monkeypatch):
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (torch.backends.cpu.get_cpu_capability(),))
    model = random_model(seed=5)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    encoder_uncompiled(engine)
    assert_same_beams(engine, reference, random_sources([5, 8, 4, 6], seed=5), beam_size=4)
    assert engine.beam_programs.step.products is engine.decoder_products() is not None
    path = engine.beam_programs.package_path(4)
    assert c_calls(PRODUCT, path) == 6 * model.config.n_decoder_layers + 1


def test_where_qkvs_products_do_not_serve_it_says_why(monkeypatch):
    model = random_model()
    monkeypatch.setattr(packed_linear, "NATIVE_PRODUCTS_ON", ())
    monkeypatch.setattr(packed_linear, "MANY_ROWS_ON", ())
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", ())
    monkeypatch.setattr(packed_linear, "ONE_ROW_ON", ())
    here = torch.backends.cpu.get_cpu_capability()
    assert packed_linear.unavailable(model) == (
        f"qkv's products are for AVX2 and AVX-512; oneDNN's serve {here}"
    )
    engine = CompiledEngine(model)
    assert engine.decoder_products() is None and engine.step_module(GREEDY, 32).products is None
    assert packed_linear.unavailable(model.to(torch.bfloat16)) == (
        "qkv's products are for fp32 on the CPU"
    )


@pytest.mark.parametrize(
    "capability, version, rows_served",
    [
        ("AVX2", "2.13.0", [1, 2, 5, 7, 8, 16, 32, None]),
        ("AVX512", "2.13.0", [1, 2, 5, 7, 8, 16, 32]),
        ("AVX512", "2.9.1", [1, 2, 5, 7, 8, 16, 32]),
        ("AVX512", "2.8.0", [1, 2, 5, 7, 8, 16, 32, None]),
        ("DEFAULT", "2.13.0", []),
        ("DEFAULT", "2.8.0", []),
    ],
)
def test_which_programs_take_qkvs_products_follows_the_cpus_capability(
    monkeypatch, capability, version, rows_served
):
    """AVX2: every program (one row by the kernel's one-row loop, its output screened), the beam
    programs of many sentences (None) too; AVX-512: every program but those, whose 160 rows are bound
    by arithmetic, where oneDNN's wider vectors win; except on PyTorch 2.8, whose Inductor leaves
    their products to MKL unpacked (`inductor_hooks.packs_products_of_any_rows`)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch, "__version__", version)
    rows = [1, 2, 5, 7, 8, 16, 32, None]
    assert [r for r in rows if packed_linear.serves(r)] == rows_served


@needs_compiled_step
@needs_operator
@pytest.mark.parametrize("capability", ["AVX2", "AVX512", "DEFAULT"])
def test_one_sentences_encoder_takes_qkvs_products_on_avx2_and_avx512(monkeypatch, capability):
    """Its ~16 rows are where Inductor's products keep their sums in memory: on AVX2 and AVX-512
    its program multiplies by qkv's kernel (another key), with the eager encoder's memory and
    projection; elsewhere by PyTorch's. int8 keeps its own (`int8_products`)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model = random_model(seed=4)
    reference = prepare_for_decoding(model)
    engine = CompiledEngine(model, warn=lambda line: None)
    plain = CompiledEngine(model, warn=lambda line: None)
    plain.source._own_products = None  # as the engine was before
    assert engine.source.key != plain.source.key or capability == "DEFAULT"
    products = engine.source.module.products
    if capability == "DEFAULT":
        assert products is None and engine.source.key == plain.source.key
        return
    assert isinstance(products, packed_linear.EncoderProducts)
    assert plain.source.module.products is None
    assert engine.source.batch_module.products is None  # many sentences: oneDNN's
    src = random_sources([9])
    with torch.inference_mode():
        memory, projected = engine.source.module(src)  # its formula, run eagerly
        ref_memory, _ = reference.encode(src)
    torch.testing.assert_close(memory, ref_memory, rtol=0, atol=1e-5)
    torch.testing.assert_close(projected, engine.source.projection(ref_memory), rtol=0, atol=1e-5)


@needs_compiled_step
@needs_operator
def test_a_program_with_qkvs_products_that_fails_falls_back_on_pytorchs_products(
    products_here, monkeypatch
):
    """The step that runs after a failed program is the plain one: if qkv's operator was the
    cause, it must not run again."""

    def failing_program(arguments, kind=BEAMS):
        raise RuntimeError("qkv::packed_linear: as if the operator had failed")

    messages, steps_run = [], []
    model = random_model(seed=7)
    engine = CompiledEngine(model, warn=messages.append)
    reference = prepare_for_decoding(model)
    encoder_uncompiled(engine)
    monkeypatch.setattr(engine, "program", failing_program)
    step_module = engine.step_module
    monkeypatch.setattr(
        engine, "step_module", lambda *a: steps_run.append(step_module(*a)) or steps_run[-1]
    )
    assert engine.packed_steps()  # qkv's products serve here
    assert_same_greedy(engine, reference, random_sources(list(range(3, 13)), seed=7), max_len=12)
    assert len(messages) == 1 and "could not compile the decoder step" in messages[0], messages
    assert steps_run and all(step.products is None for step in steps_run)
