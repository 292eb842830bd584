"""Attention pictures: the weights are the model's (rows sum to 1, masked positions are 0), the PNG is a
real picture of the expected size and panel count, the HTML page holds tokens and weights and loads
nothing from the network; `qkv attention` writes both from a run directory."""

import json
import re

import matplotlib.image
import pytest
import torch

from qkv import visualize
from qkv.cli import main
from qkv.model import Transformer, TransformerConfig
from qkv.search import greedy_search
from tiny_run import SENTENCE, make_tiny_run

SRC_LABELS = ["▁Ein", "▁Mann", "▁fährt", "▁Fahr", "rad.", "</s>"]
TGT_LABELS = [
    "<s>",
    "▁A",
    "▁man",
    "▁rides",
    "</script>",
]  # a label that would end an inlined script


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig.preset("tiny", src_vocab_size=30, tgt_vocab_size=30, **overrides)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def maps():
    return visualize.collect_attention(
        tiny_model(), [5, 6, 7, 8, 9, 3], [2, 10, 11, 12, 13], SRC_LABELS, TGT_LABELS
    )


def test_weights_have_one_map_per_kind_layer_and_head(maps):
    assert maps.weights["encoder"].shape == (2, 4, 6, 6)  # (layers, heads, query, key)
    assert maps.weights["decoder"].shape == (2, 4, 5, 5)
    assert maps.weights["cross"].shape == (2, 4, 5, 6)  # target queries, source keys
    assert maps.labels("cross") == (TGT_LABELS, SRC_LABELS)


def test_rows_sum_to_one_and_later_target_positions_are_masked(maps):
    for kind, weights in maps.weights.items():
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), msg=kind)
    later = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    assert (maps.weights["decoder"][..., later] == 0).all()


def test_padding_gets_zero_weight_from_the_model_api():
    model = tiny_model()
    src = torch.tensor([[5, 6, 7, 3], [5, 3, 0, 0]])  # second sentence padded
    tgt = torch.tensor([[2, 10, 11], [2, 10, 0]])
    with torch.no_grad():
        _, weights = model(src, tgt, return_attention=True)
    for kind in ("encoder", "cross"):
        for layer in weights[kind]:
            assert (layer[1, :, :, 2:] == 0).all(), kind  # padded source keys
            torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))


def panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize(
    "kinds, layer, head, n_panels",
    [
        (visualize.KINDS, None, None, 3 * 2 * 4),  # everything: rows (kind, layer) x heads
        (["encoder"], None, None, 2 * 4),  # one kind: layers x heads
        (["cross"], 1, None, 4),  # one layer: a panel per head
        (["decoder"], 0, 2, 1),  # one head
        (visualize.KINDS, 1, 0, 3),  # one layer and head, all kinds
    ],
)
def test_png_is_a_picture_of_the_expected_size_and_panels(
    maps, tmp_path, kinds, layer, head, n_panels
):
    fig = visualize.plot_attention(maps, kinds, layer, head, caption="Ein Mann fährt Fahrrad.")
    assert len(panels(fig)) == n_panels
    assert len(fig.axes) == n_panels + 1, "one shared colour bar"
    width, height = (fig.get_size_inches() * 100).round().astype(int)
    path = visualize.save_figure(fig, tmp_path / "attention.png", dpi=100)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05, "not a blank image"
    assert width >= 300 and height >= 300


def test_panels_carry_the_tokens_and_a_title_that_says_how_to_read_them(maps):
    fig = visualize.plot_attention(maps, ["cross"], 1, 2)
    (ax,) = panels(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == SRC_LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == TGT_LABELS
    title = fig.get_suptitle().replace("\n", " ")
    assert "Encoder-decoder attention, layer 2, head 3" in title
    assert "each row is a query token" in title


def test_a_layer_or_head_that_does_not_exist_is_refused(maps):
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        visualize.select(maps, ["encoder"], layer=2)
    with pytest.raises(ValueError, match="head 5 does not exist"):
        visualize.select(maps, head=4)
    with pytest.raises(ValueError, match="unknown attention kind"):
        visualize.select(maps, ["self"])


def inlined_data(page: str) -> dict:
    match = re.search(
        r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S
    )
    return json.loads(match.group(1))


def test_html_holds_tokens_and_weights_and_nothing_from_the_network(maps, tmp_path):
    path = visualize.write_attention_html(
        tmp_path / "a.html", maps, "Attention <inside>", "Ein → A"
    )
    page = path.read_text(encoding="utf-8")
    for reference in ("http://", "https://", "//cdn", "src=", "href=", "@import", "url("):
        assert reference not in page
    assert "<script>" in page and "addEventListener" in page, "the script is inlined"
    assert "Attention &lt;inside&gt;" in page
    data = inlined_data(page)  # the label "</script>" did not end the data early
    assert data["kinds"]["cross"]["queries"] == TGT_LABELS
    assert data["kinds"]["cross"]["keys"] == SRC_LABELS
    for kind, weights in maps.weights.items():
        inlined = torch.tensor(data["kinds"][kind]["weights"])
        torch.testing.assert_close(inlined, weights, atol=5e-5, rtol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_qkv_attention_writes_png_and_html(run_qkv, run_dir, tmp_path):
    png, page = tmp_path / "attention.png", tmp_path / "attention.html"
    result = run_qkv("attention", run_dir, SENTENCE, "--layer", "2", "-o", png, "--html", page)
    assert result.returncode == 0, result.stderr
    assert "▁nineteen" in result.stdout and "translation:" in result.stdout
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 800 and height > 600  # 3 kinds x 4 heads
    data = inlined_data(page.read_text(encoding="utf-8"))
    assert "▁nineteen" in data["kinds"]["encoder"]["keys"]
    assert len(data["kinds"]["encoder"]["weights"]) == 2  # the page keeps every layer


def test_qkv_attention_one_head_and_bad_layer(run_qkv, run_dir, tmp_path, capsys):
    png = tmp_path / "one.png"
    result = run_qkv(
        "attention",
        run_dir,
        "the third",
        "--kind",
        "encoder",
        "--layer",
        "1",
        "--head",
        "4",
        "-o",
        png,
    )
    assert result.returncode == 0, result.stderr
    assert png.is_file() and not (tmp_path / "attention.html").exists()
    # Errors in-process: a subprocess costs two seconds of importing torch.
    bad_layer = ["attention", str(run_dir), "the third", "--layer", "7", "-o", str(png), "--force"]
    assert main(bad_layer) == 2
    said = capsys.readouterr()
    assert "layer 7 does not exist" in said.err
    assert "translation:" not in said.out  # said before the sentence is translated
    assert main([*bad_layer[:3], "--head", "9"]) == 2
    assert "head 9 does not exist" in capsys.readouterr().err
    assert main(["attention", str(tmp_path / "missing"), "the third"]) == 2
    assert "missing" in capsys.readouterr().err


def test_a_model_trained_to_reverse_looks_at_the_mirrored_source_token():
    """The rows and columns mean what the titles say: a model that learned to reverse a sequence shows
    the anti-diagonal in encoder-decoder attention (about 3 s of training)."""
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=16, tgt_vocab_size=16, d_model=32, n_heads=2, d_ff=64,
        n_encoder_layers=1, n_decoder_layers=1, dropout=0.0, max_len=16,
    )  # fmt: skip
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    eos = torch.full((64, 1), 3)
    for _ in range(400):
        x = torch.randint(4, 16, (64, 7))
        src, tgt = torch.cat([x, eos], 1), torch.cat([x.flip(1), eos], 1)
        tgt_in = torch.cat([torch.full((64, 1), 2), tgt[:, :-1]], 1)
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten())
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    src = [4, 5, 6, 7, 8, 9, 10, 3]
    out = greedy_search(model.eval(), torch.tensor([src]))[0][0].tolist()
    assert out == [10, 9, 8, 7, 6, 5, 4, 3], "the model learned to reverse"
    labels = [str(i) for i in src]
    maps = visualize.collect_attention(
        model, src, [2, *out[:-1]], labels, ["<s>", *labels[::-1][1:]]
    )
    looked_at = (
        maps.weights["cross"][0].mean(0).argmax(-1)
    )  # (tgt_len,): the key each query favours
    # Decoder position t (input: the t-th output token) predicts output token t+1 = source token 6 - t.
    assert looked_at[1:7].tolist() == [5, 4, 3, 2, 1, 0]
