"""The decoding engine (qkv.inference) computes what the reference model computes, faster: its prepared
linear maps, its additive-mask attention, its decoder steps over the beam cache, and its top-k."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qkv import kernels
from qkv.attention import scaled_dot_product_attention
from qkv.inference import prepare_for_decoding
from qkv.inference import topk as topk_module
from qkv.inference.engine import attention_with_bias
from qkv.inference.linear import PreparedLinear
from qkv.model import Transformer, TransformerConfig

PAD, BOS, EOS = 0, 2, 3
ONEDNN_BF16 = "oneDNN computes no bf16 on this CPU (it needs AVX-512 or AVX-NE-CONVERT)"


def packable(dtype: torch.dtype):
    """`dtype` as a parameter, skipped where oneDNN cannot pack weights of it."""
    return pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not kernels.packing_works(dtype),
            reason=ONEDNN_BF16 if dtype == torch.bfloat16 else "no packed oneDNN weights",
        ),
    )


# --- prepared linear maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [packable(torch.float32), packable(torch.bfloat16)])
def test_prepared_weights_are_packed_once_with_the_same_results_for_any_number_of_rows(dtype):
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape).to(dtype) for shape in [(32, 1, 64), (100, 64), (100,)])
    expected = F.linear(x.double(), weight.double(), bias.double())
    prepared = PreparedLinear(weight, bias)
    assert prepared.packed.layout == torch._mkldnn
    with torch.inference_mode():
        outputs = [prepared(x) for _ in range(3)]
        one_row = prepared(x[:1])  # batch 1, greedy: one row
    tolerance = 2e-4 if dtype == torch.float32 else 0.25  # bf16: 8 bits of mantissa, 64 products
    for out in [*outputs, one_row]:
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected[: out.size(0)], rtol=0, atol=tolerance)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_relu_equals_relu_of_the_linear_map(dtype):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(40, 3, 64), torch.randn(96, 64), torch.randn(96)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.inference_mode():
        expected = PreparedLinear(weight, bias)(x).relu()
        assert (expected == 0).any() and (expected > 0).any()
        assert torch.equal(PreparedLinear(weight, bias, relu=True)(x), expected)


def test_int8_maps_are_close_to_fp32_relative_to_the_outputs_scale():
    from qkv.inference.linear import int8_works

    if int8_works() is not None:
        pytest.skip(int8_works())
    torch.manual_seed(0)
    x, weight, bias = torch.randn(7, 3, 256), torch.randn(512, 256) / 16, torch.randn(512)
    expected = F.linear(x, weight, bias)
    with torch.inference_mode():
        out = PreparedLinear(weight, bias, int8=True)(x)
        relu = PreparedLinear(weight, bias, relu=True, int8=True)(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    # 7-bit inputs (fbgemm on x86) and 8-bit weights: ~1% of the outputs' spread on average (measured
    # 1.2%, 7% at most; 0.7% and 3.4% with 8-bit inputs)
    spread = expected.std()
    assert (out - expected).abs().max() < 0.1 * spread
    assert (out - expected).abs().mean() < 0.02 * spread
    torch.testing.assert_close(relu, out.clamp_min(0), rtol=0, atol=0.1 * float(spread))
    assert (relu >= 0).all()


def test_the_int8_check_passes_every_honest_product_and_fails_wrong_ones():
    # The check once used fresh random inputs and an element-wise tolerance: one process in ~75
    # saw an honest product as wrong and translated in fp32.
    from qkv.inference import linear
    from qkv.inference.linear import _int8_product_is_close, _quantised_weight, _reduce_range

    if linear.int8_works() is not None:
        pytest.skip(linear.int8_works())
    assert all(linear.int8_works.__wrapped__() is None for _ in range(20))  # not the cached verdict
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        weight = torch.randn(16, 32, generator=generator)
        x = torch.randn(3, 32, generator=generator)
        packed = torch.ops.quantized.linear_prepack(_quantised_weight(weight), None)
        int8 = torch.ops.quantized.linear_dynamic(x, packed, _reduce_range())
        fp32 = F.linear(x, weight)
        assert _int8_product_is_close(int8, fp32)
        assert not _int8_product_is_close(torch.zeros_like(fp32), fp32)
        assert not _int8_product_is_close(int8.roll(1, dims=1), fp32)  # features out of place
        assert not _int8_product_is_close(int8 * 1.5, fp32)


def test_where_the_first_quantised_engine_fails_the_next_that_works_takes_over(quantised_engine):
    # As PyTorch 2.13's aarch64 wheel: it starts with 'x86', whose fbgemm kernels stop there
    linear = quantised_engine
    engines = torch.backends.quantized.supported_engines
    if "qnnpack" not in engines or "onednn" not in engines:
        pytest.skip(f"this PyTorch has the quantised engines {engines}")
    honest = linear._engine_fails
    failing = {"x86", "qnnpack"}  # qnnpack too: the next in the order then takes over

    def fails(engine):
        return (
            f"{engine!r} failed here: unknown architecure" if engine in failing else honest(engine)
        )

    torch.backends.quantized.engine = "x86"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear, "_engine_fails", fails)
        assert linear.int8_works() is None
    assert torch.backends.quantized.engine == "onednn"
    assert linear.int8_engine_switch() == (
        "int8 by PyTorch's quantised engine 'onednn': 'x86' failed here: unknown architecure"
    )
    assert not linear._reduce_range()  # 8-bit inputs: oneDNN has no 16-bit pairs to overflow
    torch.manual_seed(0)
    x, weight = torch.randn(5, 64), torch.randn(96, 64) / 8
    packed = torch.ops.quantized.linear_prepack(linear._quantised_weight(weight), None)
    out = torch.ops.quantized.linear_dynamic(x, packed, linear._reduce_range())
    assert linear._int8_product_is_close(out, F.linear(x, weight))


def test_where_every_quantised_engine_fails_int8_says_why_and_the_engine_stays(quantised_engine):
    linear = quantised_engine
    torch.backends.quantized.engine = "x86"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear, "_engine_fails", lambda engine: f"{engine!r} failed here")
        assert linear.int8_works() == "'x86' failed here"  # the engine PyTorch started with
    assert torch.backends.quantized.engine == "x86"
    assert linear.int8_engine_switch() is None


@pytest.mark.parametrize("norm_first", [False, True])
def test_an_int8_engine_gives_the_fp32_engines_logits_within_quantisation_error(norm_first):
    from qkv.inference.linear import int8_works

    if int8_works() is not None:
        pytest.skip(int8_works())
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=50, tgt_vocab_size=50, d_model=64,
                                          n_heads=4, d_ff=128, n_encoder_layers=2,
                                          n_decoder_layers=2, dropout=0.0, norm_first=norm_first))  # fmt: skip
    model.eval()
    src = torch.randint(4, 50, (3, 7))
    with torch.inference_mode():
        logits = {}
        for int8 in (False, True):
            engine = prepare_for_decoding(model, int8=int8)
            memory, src_mask = engine.encode(src)
            cache = engine.new_cache(max_beams=1)
            steps = []
            for token in ([BOS] * 3, [5, 6, 7], [8, 9, 10]):
                tokens = torch.tensor(token)
                steps.append(engine.step(tokens, memory, src_mask, cache))
            logits[int8] = torch.cat(steps, dim=1)
    error = (logits[True] - logits[False]).abs()
    assert error.max() < 0.1 * logits[False].std()
    # the model's choices barely move: the best next token is the same at (nearly) every position
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean()
    assert agree >= 0.85


def test_stacked_projections_give_each_projection_side_by_side():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(16, 16) for _ in range(3))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        stacked = PreparedLinear.stacked(q, k, v)(x).chunk(3, dim=-1)
        for got, linear in zip(stacked, (q, k, v), strict=True):
            torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)


def test_a_new_engine_sees_changed_weights():
    # Fused Adam changes parameters without bumping their version counters: an engine cannot tell
    # that its packed copies went stale, so it is prepared anew after a change (Translator does on
    # load_state_dict; training prepares one per validation).
    model = random_model(seed=1)
    src = random_sources([5, 3])
    with torch.inference_mode():
        before = first_step_logits(prepare_for_decoding(model), src)
        model.decoder.layers[-1].feed_forward.linear2.weight.mul_(2)
        after = first_step_logits(prepare_for_decoding(model), src)
        torch.testing.assert_close(after, model(src, torch.full((2, 1), BOS)))
    assert not torch.allclose(after, before)


# --- attention over the cache -------------------------------------------------------------------------


def test_attention_with_an_additive_mask_equals_the_boolean_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.rand(3, 1, 5, 7) < 0.6
    mask[..., 0] = True  # every query sees a key (the additive form's precondition)
    bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    expected, _ = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(attention_with_bias(q, k, v, bias), expected)
    # What the engine runs on GPUs: PyTorch's kernel with the same float mask.
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)
    unmasked, _ = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_with_bias(q, k, v, None), unmasked)


# --- the engine against the reference model ---------------------------------------------------------


def random_model(seed=0, vocab=30, **overrides) -> Transformer:
    torch.manual_seed(seed)
    settings = dict(src_vocab_size=vocab, tgt_vocab_size=vocab, dropout=0.0, max_len=64)
    return Transformer(TransformerConfig.preset("tiny", **{**settings, **overrides})).eval()


def random_sources(lengths, vocab=30, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for row, n in enumerate(lengths):
        src[row, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=generator)
        src[row, n - 1] = EOS
    return src


def first_step_logits(engine, src):
    memory, src_mask = engine.encode(src)
    bos = torch.full((src.size(0),), BOS)
    return engine.step(bos, memory, src_mask, engine.new_cache())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_first": True},
        {"activation": "gelu"},
        {"positional": "learned", "share_embeddings": False, "tie_output": False},
    ],
    ids=["post-LN", "pre-LN", "gelu", "learned-positions-untied"],
)
def test_engine_steps_equal_one_full_forward_pass_of_the_reference_model(overrides):
    model = random_model(seed=5, **overrides)
    src = random_sources([7, 4, 6], seed=5)
    tgt = torch.randint(4, 30, (3, 6), generator=torch.Generator().manual_seed(5))
    tgt[:, 0] = BOS
    with torch.inference_mode():
        full = model(src, tgt)  # (3, 6, vocab)
        reference_memory = model.encode(src)
        engine = prepare_for_decoding(model)
        memory, src_mask = engine.encode(src)
        cache = engine.new_cache()
        steps = [engine.step(tgt[:, t], memory, src_mask, cache) for t in range(tgt.size(1))]
        assert len(cache) == tgt.size(1)
    torch.testing.assert_close(memory, reference_memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "lengths, max_scores, written_out",
    [
        ([7, 4, 6], None, True),  # small scores: the additive bias, written out
        ([7, 4, 6], 0, False),  # "large" scores: PyTorch's fused kernel
        ([7, 1, 6], None, False),  # a source of padding alone: the boolean mask
    ],
    ids=["written-out", "fused", "empty-source"],
)
def test_the_engines_encoder_equals_the_models_whichever_attention_it_takes(
    lengths, max_scores, written_out, monkeypatch
):
    from qkv.inference import engine as engine_module

    if max_scores is not None:
        monkeypatch.setattr(engine_module, "WRITTEN_OUT_MAX_SCORES", max_scores)
    model = random_model(seed=7)
    src = random_sources(lengths, seed=7)
    if lengths[1] == 1:
        src[1] = PAD  # not even EOS
    taken = []
    monkeypatch.setattr(
        engine_module, "attention_with_bias", lambda *a: taken.append(1) or attention_with_bias(*a)
    )
    with torch.inference_mode():
        engine = prepare_for_decoding(model)
        memory, src_mask = engine.encode(src)
        reference = model.encode(src)
    assert bool(taken) == written_out
    real = src_mask[:, 0, 0, :, None]  # the output at padding positions is never read
    torch.testing.assert_close(memory * real, reference * real, rtol=1e-5, atol=1e-5)
    assert not memory.isnan().any()


def test_the_encoder_output_is_projected_for_cross_attention_once():
    model = random_model(seed=6)
    src = random_sources([5, 7], seed=6)
    with torch.inference_mode():
        engine = prepare_for_decoding(model)
        memory, src_mask = engine.encode(src)
        cache = engine.new_cache()
        engine.step(torch.full((2,), BOS), memory, src_mask, cache)
        projected = [entry.key for entry in cache.cross_attn]
        # Later steps read the cache: they need neither the encoder output nor the mask.
        engine.step(torch.full((2,), 5), None, None, cache)
    assert all(entry.key is key for entry, key in zip(cache.cross_attn, projected, strict=True))


def test_a_source_without_tokens_gives_no_nan():
    model = random_model(seed=4)
    src = random_sources([4, 6], seed=4)
    src[1] = PAD  # a row that is all padding: cross-attention has nothing to attend to
    with torch.inference_mode():
        logits = first_step_logits(prepare_for_decoding(model), src)
        reference = model(src, torch.full((2, 1), BOS))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_the_engine_leaves_the_model_as_it_was():
    model = random_model(seed=7)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    classes = [type(module) for module in model.modules()]
    prepare_for_decoding(model)
    assert [type(module) for module in model.modules()] == classes
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# --- top-k ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "length", "k"),
    [(32, 40000, 10), (3, 8000, 2), (5, 4096 * 3, 7), (2, 160 * 40, 10)],
)
def test_topk_equals_torch_topk(rows, length, k):
    assert topk_module._topk_chunk(length, k) is not None  # the chunked path, not the fallback
    generator = torch.Generator().manual_seed(length + k)
    x = torch.randn(rows, length, generator=generator)
    x[0, :] = x[0].sort().values  # the k best in one chunk
    x[-1, ::97] += 5.0  # the k best spread over many chunks
    if rows > 2:
        x[1, length // 2 :] = -torch.inf  # as the dead beams of a search's first step
    values, indices = topk_module.topk(x, k)
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
        assert topk_module._topk_chunk(length, k, rows_per_group) is not None
    else:
        monkeypatch.setattr(topk_module, "_topk_chunk", lambda *args: None)
    generator = torch.Generator().manual_seed(length + k)
    groups = 4
    x = torch.log_softmax(torch.randn(groups * rows_per_group, length, generator=generator), 1)
    offsets = -10 * torch.rand(groups * rows_per_group, generator=generator)
    if rows_per_group > 1:
        offsets[1] = -torch.inf  # a dead beam (a group of dead beams only would be all ties)
    x[-1, ::97] += 5.0  # the k best of the last group spread over many chunks
    values, indices = topk_module.topk(x, k, offsets, rows_per_group)
    sums = (x + offsets[:, None]).view(groups, rows_per_group * length)
    expected_values, expected_indices = sums.topk(k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize(("rows", "length", "k"), [(5, 8000, 10), (1, 4800, 10), (3, 1000, 6)])
def test_row_topk_equals_torch_topk(rows, length, k):
    """Each row's k best as a compiled program finds them (`row_topk`): `topk`'s chunks where they
    pay (8000, 4800), PyTorch's own top-k where they do not (1000)."""
    chunked = length != 1000
    assert (topk_module._topk_chunk(length, k) is not None) == chunked
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(rows, length, generator=generator)
    x[0, :] = x[0].sort().values  # the k best in one chunk
    x[-1, ::97] += 5.0  # the k best spread over many chunks
    values, indices = topk_module.row_topk(x, k)
    expected_values, expected_indices = x.topk(k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize(("beams", "length", "k"), [(5, 8000, 10), (1, 8000, 10), (4, 30, 6)])
def test_candidates_from_each_rows_best_are_the_best_extensions(beams, length, k):
    """A beam search's candidates from each row's k best tokens only (what a compiled program
    returns) are those of the whole rows: the same sums, beams and tokens."""
    generator = torch.Generator().manual_seed(length + beams)
    sentences = 3
    log_probs = torch.log_softmax(torch.randn(sentences * beams, length, generator=generator), 1)
    beam_scores = -10 * torch.rand(sentences, beams, generator=generator)
    if beams > 1:
        beam_scores[1, 1:] = -torch.inf  # dead beams, as at the first step of a small vocabulary
    log_probs[-1, ::7] += 3.0  # many of one sentence's best from its last beam
    row_values, row_tokens = topk_module.row_topk(log_probs, k)
    got = topk_module.extensions_of_rows(row_values, row_tokens, beam_scores, k)
    expected = topk_module.best_extensions(log_probs, beam_scores, k)
    for got_part, expected_part in zip(got, expected, strict=True):
        assert torch.equal(got_part, expected_part)
    sums, beam, token = got
    flat_rows = torch.arange(sentences)[:, None] * beams + beam
    assert torch.equal(sums, log_probs[flat_rows, token] + beam_scores.gather(1, beam))


@pytest.mark.parametrize("rows", [1, topk_module.ARGMAX_MIN_ROWS, 40])
def test_argmax_equals_torch_argmax(rows):
    x = torch.randn(rows, 8000, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(topk_module.argmax(x), x.argmax(dim=1))


def test_topk_with_ties_returns_the_tied_values_at_valid_indices():
    x = torch.zeros(4, 8000)
    x[:, 100:105] = 1.0
    values, indices = topk_module.topk(x, 10)
    assert torch.equal(values, x.topk(10, dim=1).values)
    assert torch.equal(x.gather(1, indices), values)
    assert indices.unique(dim=1).size(1) == 10  # no index twice


def test_topk_falls_back_to_torch_topk_where_chunks_do_not_pay():
    assert topk_module._topk_chunk(1000, 10) is None  # a short row
    assert topk_module._topk_chunk(8009, 10) is None  # a prime length: no chunk divides it
    assert topk_module._topk_chunk(4096, 40) is None  # too few chunks of at least 32 for k = 40
    x = torch.randn(3, 8009)
    values, indices = topk_module.topk(x, 5)
    assert torch.equal(values, x.topk(5, dim=1).values)
    assert torch.equal(indices, x.topk(5, dim=1).indices)
    y = torch.randn(8000, 3).t()  # not contiguous
    assert torch.equal(topk_module.topk(y, 5)[1], y.topk(5, dim=1).indices)
