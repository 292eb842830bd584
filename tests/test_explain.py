"""The step-by-step of attention: its last matrix equals the attention sublayer's output in the model's
own forward pass (post-LN and pre-LN, encoder, decoder and cross-attention), its input X is what the
paper says it is, and both renderers show every step."""

import pytest
import torch

from qkv import explain
from qkv.cli import main
from qkv.model import Transformer, TransformerConfig
from tiny_run import SENTENCE, make_tiny_run

SRC, TGT = [5, 6, 7, 3], [2, 8, 9, 10, 11]
SRC_LABELS, TGT_LABELS = ["thinking", "machines", "think", "</s>"], ["<s>", "a", "b", "c", "d"]


def tiny_model(norm_first: bool) -> Transformer:
    torch.manual_seed(1)
    config = TransformerConfig.preset(
        "tiny", src_vocab_size=20, tgt_vocab_size=20, norm_first=norm_first
    )
    return Transformer(config).eval()


def forward_output(model, kind, layer) -> torch.Tensor:
    """What the sublayer returns in a plain forward pass, seen by a hook: (q_len, d_model)."""
    module = explain.attention_module(model, kind, layer)
    seen = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out[0]))
    with torch.no_grad():
        model(torch.tensor([SRC]), torch.tensor([TGT]))
    handle.remove()
    return seen[0][0]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "cross"])
@pytest.mark.parametrize("layer", [0, 1])
def test_the_last_step_equals_the_forward_pass(norm_first, kind, layer):
    model = tiny_model(norm_first)
    result = explain.explain(model, SRC, SRC_LABELS, kind, layer, None, TGT, TGT_LABELS)
    expected = forward_output(model, kind, layer)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.steps[-1].matrices[0].values, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_x_of_the_first_layer_is_embeddings_plus_positions(norm_first):
    model = tiny_model(norm_first)
    result = explain.explain(model, SRC, SRC_LABELS, "encoder", 0)
    with torch.no_grad():
        x = model.src_embed.embedding.weight[SRC] * 64**0.5 + model.src_positions.table[: len(SRC)]
        if norm_first:  # pre-LN: attention sees the layer-normalised input
            x = model.encoder.layers[0].norm1(x)
    torch.testing.assert_close(result.steps[0].matrices[0].values, x)
    assert ("LayerNorm" in result.steps[0].description) == norm_first


def step(result, name_start):
    return next(s for s in result.steps if s.name.startswith(name_start))


def test_steps_follow_the_formula():
    model = tiny_model(False)
    result = explain.explain(model, SRC, SRC_LABELS, "decoder", 1, None, TGT, TGT_LABELS)
    scores = step(result, "Q K^T").matrices
    scaled = step(result, "/ sqrt").matrices
    weights = step(result, "softmax").matrices
    assert len(weights) == 4, "every head shown by default"
    for s, sc, w in zip(scores, scaled, weights, strict=True):
        torch.testing.assert_close(sc.values, s.values / 4.0)  # d_k = 64 / 4 = 16
        torch.testing.assert_close(w.values.sum(-1), torch.ones(len(TGT)))
        assert (w.values.triu(diagonal=1) == 0).all(), "a target token sees no later token"
    z = step(result, "Z =").matrices
    concat = step(result, "Concat(Z").matrices[0].values
    torch.testing.assert_close(concat, torch.cat([m.values for m in z], dim=-1))


def test_cross_attention_asks_from_target_into_source():
    result = explain.explain(tiny_model(True), SRC, SRC_LABELS, "cross", 0, [1], TGT, TGT_LABELS)
    weights = step(result, "softmax").matrices
    assert [m.label for m in weights] == ["softmax(Q K^T / sqrt(d_k)), head 2"]
    assert weights[0].row_labels == TGT_LABELS and weights[0].col_labels == SRC_LABELS
    assert weights[0].values.shape == (len(TGT), len(SRC))


def test_text_shows_every_step_and_elides_wide_matrices():
    result = explain.explain(tiny_model(False), SRC, SRC_LABELS, "encoder", 0, [0])
    text = explain.render_text(result)
    for s in result.steps:
        assert s.name in text and s.description in text
    assert "…" in text, "64 features do not fit: the middle columns are elided"
    assert "thinking" in text and "head 1" in text and "head 2" not in text
    assert f"{float(result.output[0, 0]):.2f}" in text


def test_html_shows_every_step_and_loads_nothing():
    result = explain.explain(tiny_model(False), SRC, SRC_LABELS, "encoder", 1, [0])
    page = explain.render_html(result)
    for s in result.steps:
        assert s.name.replace("<", "&lt;") in page
    for reference in ("http://", "https://", "//cdn", "src=", "href="):
        assert reference not in page
    assert (
        "QKV.steps(" in page and "<table" not in page
    )  # drawn as grids (tests/test_page.py looks)


def test_bad_layer_or_head_is_refused():
    model = tiny_model(False)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        explain.explain(model, SRC, SRC_LABELS, "encoder", 2)
    with pytest.raises(ValueError, match="head 5 does not exist"):
        explain.explain(model, SRC, SRC_LABELS, "encoder", 0, [4])
    with pytest.raises(ValueError, match="needs the decoder input"):
        explain.explain(model, SRC, SRC_LABELS, "cross", 0)


def test_qkv_explain_without_run_dir_says_the_model_is_random(run_qkv, tmp_path):
    page = tmp_path / "explain.html"
    result = run_qkv("explain", "thinking machines", "--html", page)
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stdout
    for name in ("X", "Q = X W^Q", "K = X W^K", "V = X W^V", "Q K^T", "/ sqrt(d_k)", "softmax"):
        assert name in result.stdout
    for name in ("Z = softmax(...) V", "Concat(Z_1, ..., Z_h)", "Concat(...) W^O"):
        assert name in result.stdout
    assert "thinking" in page.read_text(encoding="utf-8")


def test_qkv_explain_with_a_run_dir(tmp_path, capsys):
    run_dir = make_tiny_run(tmp_path / "run", norm_first=True)
    assert main(["explain", str(run_dir), SENTENCE, "--layer", "2", "--heads", "1,3"]) == 0
    out = capsys.readouterr().out
    assert f"the model of {run_dir}" in out
    assert "▁nineteen" in out and "</s>" in out
    assert "head 3" in out and "head 2," not in out
    assert "LayerNorm of the output of encoder layer 1 (pre-LN)" in out
    assert main(["explain", str(run_dir), SENTENCE, "--kind", "cross", "--layer", "2"]) == 0
    out = capsys.readouterr().out
    assert "Encoder-decoder attention, layer 2" in out and "over its translation" in out
    assert "K = M W^K" in out
    assert main(["explain", SENTENCE, "--kind", "decoder"]) == 2
    assert "needs a RUN_DIR" in capsys.readouterr().err
    assert main(["explain", str(run_dir), SENTENCE, "--heads", "x"]) == 2
    assert "--heads takes numbers" in capsys.readouterr().err
    assert main(["explain", "a", "b", "c"]) == 2
    capsys.readouterr()
    assert main(["explain", str(run_dir), SENTENCE, "--heads", "1,1"]) == 2  # shown twice
    assert capsys.readouterr().err.strip() == "qkv: error: --heads names a head twice: 1,1"
    assert main(["explain", str(run_dir)]) == 2  # a random model explained the words of the path
    assert capsys.readouterr().err.strip() == (
        f"qkv: error: {run_dir} is a run: give the text to explain after it (explain RUN_DIR TEXT)"
    )
    checkpoint = run_dir / "best.pt"
    assert main(["explain", str(checkpoint)]) == 2  # nor those of a checkpoint's
    assert capsys.readouterr().err.strip() == (
        f"qkv: error: {checkpoint} is a checkpoint: give the text to explain after it "
        "(explain RUN_DIR TEXT)"
    )
