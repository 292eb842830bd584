"""qkv's own attention operator for the beam program (qkv.inference.native): the formula of
`attend_with_new_together` over `BeamCache`'s layout, built once and kept; where it cannot be built,
the beam step attends with PyTorch's operators and says so once."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.inference import native, prepare_for_decoding
from qkv.inference.beam_program import attend_with_new_together, split_heads
from test_compiled import assert_same_beams, uncompiled
from test_search import random_model, random_sources

needs_operator = pytest.mark.skipif(
    native.unavailable() is not None, reason=f"{native.unavailable()}"
)


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
        and said == ["building qkv's operators for beam search (once, ~10 s)"]
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
    command = native.build_command

    def broken(output):
        return [*command(output), "-DQKV_BROKEN", "-include", "no_such_header.h"]

    monkeypatch.setattr(native, "build_command", broken)
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


def test_switched_off_the_beam_step_attends_with_pytorchs_operators(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "0")
    model = random_model(seed=3)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    said = []
    engine.beam_programs.say = said.append
    engine.beam_programs.use_native()
    engine.beam_programs.use_native()
    assert said == ["QKV_NATIVE=0: beam search takes PyTorch's operators"]
    assert engine.beam_programs.step.native is False
    key_without = engine.beam_programs.package_path(4).name
    assert_same_beams(engine, reference, random_sources([5, 8, 4], seed=2), beam_size=4, max_len=8)
    if native.load() is None:  # with it, another program: another key
        monkeypatch.delenv(native.SWITCH)
        with_operator = uncompiled(model)
        with_operator.beam_programs.use_native()
        assert with_operator.beam_programs.step.native is True
        assert with_operator.beam_programs.package_path(4).name != key_without


@needs_operator
def test_the_beam_step_with_the_operator_gives_the_eager_engines_beams():
    model = random_model(seed=4, norm_first=True)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    engine.beam_programs.use_native()
    assert engine.beam_programs.step.native is True
    src = random_sources([5, 8, 4, 6], seed=3)
    assert_same_beams(engine, reference, src, beam_size=5, max_len=9, n_best=2)
