import gzip
import unicodedata

import pytest

from conftest import SHARED_DATA
from qkv.data import read_lines
from qkv.datasets import synthetic_pairs
from qkv.errors import QkvError
from qkv.tokenizer import SPECIALS, Tokenizer


@pytest.fixture(scope="module")
def multi30k_sample():
    """2000 sentences a side of Multi30k train: enough for a small vocabulary, trained in ms."""
    folder = SHARED_DATA / "multi30k"
    if not folder.is_dir():
        pytest.skip(f"no Multi30k copy at {SHARED_DATA}")
    return [read_lines(folder / f"train.{lang}.gz")[:2000] for lang in ("de", "en")]


@pytest.fixture(scope="module")
def tokenizer(multi30k_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train(multi30k_sample, out, vocab_size=1000)


def test_special_ids_are_fixed_and_exported(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.specials == SPECIALS
    assert tokenizer.specials.as_dict() == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert tokenizer.vocab_size == 1000


def test_encode_decode_round_trip_on_ordinary_text(tokenizer, shared_data):
    sentences = read_lines(shared_data / "multi30k" / "val.de.gz")[:300]
    sentences += read_lines(shared_data / "multi30k" / "val.en.gz")[:300]
    for sentence in sentences:
        ids = tokenizer.encode(sentence)
        assert all(i not in (0, 2, 3) for i in ids), "encode adds no special ids"
        # SentencePiece normalises with NFKC (a no-break space becomes a space), nothing else.
        assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", sentence)


def test_decode_ignores_pad_bos_eos(tokenizer):
    ids = tokenizer.encode("Ein Hund läuft.")
    padded = [tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]
    assert tokenizer.decode(padded) == "Ein Hund läuft."


def test_pieces_name_the_ids(tokenizer):
    text = "Two dogs play in the snow."
    pieces = tokenizer.encode_as_pieces(text)
    assert pieces == [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]
    assert "".join(pieces).replace("▁", " ").strip() == text


def test_training_is_joint_over_both_languages(tokenizer):
    # Frequent words of each language are whole pieces of the one shared vocabulary.
    assert "▁Hund" in tokenizer.encode_as_pieces("Hund")
    assert "▁dog" in tokenizer.encode_as_pieces("dog")


def test_saved_model_loads_with_the_same_encoding(tokenizer):
    loaded = Tokenizer.load(tokenizer.path.parent)  # a folder holding tokenizer.model works too
    assert loaded.path == tokenizer.path
    assert tokenizer.path.with_suffix(".vocab").is_file()
    text = "Eine Frau mit einem roten Hut."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert not [p for p in tokenizer.path.parent.iterdir() if p.name.startswith(".")], (
        "no leftovers"
    )


def test_trains_from_gzip_files_and_unigram(tmp_path):
    lines = [f"{words} {iso}" for words, iso in synthetic_pairs(500, seed=1)]
    path = tmp_path / "text.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    tokenizer = Tokenizer.train(path, tmp_path / "uni", vocab_size=80, model_type="unigram")
    assert tokenizer.path == tmp_path / "uni.model"
    assert tokenizer.vocab_size == 80
    assert tokenizer.decode(tokenizer.encode(lines[0])) == lines[0]


def test_vocabulary_too_large_for_the_text_is_a_clear_error(tmp_path):
    with pytest.raises(
        QkvError,
        match=r"training the tokenizer failed: --vocab-size 8000 is more than this text gives",
    ):
        Tokenizer.train([["a b c", "b c d"]], tmp_path / "t", vocab_size=8000)
    assert not list(tmp_path.iterdir()), "a failed training leaves no files"


def test_unknown_model_type_is_rejected(tmp_path):
    with pytest.raises(QkvError, match=r"unknown tokenizer type 'word'"):
        Tokenizer.train([["a b"]], tmp_path / "t", model_type="word")


def test_loading_a_missing_or_broken_model_names_the_file(tmp_path):
    with pytest.raises(QkvError, match=r"nothing\.model: no such tokenizer model"):
        Tokenizer.load(tmp_path / "nothing.model")
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(QkvError, match=r"broken\.model: not a SentencePiece model"):
        Tokenizer.load(broken)
