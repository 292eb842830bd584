"""qkv never writes over a file it did not create, nor over its own inputs: `prepare --out`,
`translate -o`, `evaluate -o`, `average -o`. Each refusal comes before any work, names the file, says
what to do, and leaves every file as it was."""

import pytest

import qkv.prepare
from qkv.datasets import synthetic_pairs
from qkv.errors import QkvError
from qkv.outputs import check_output_file
from qkv.prepare import prepare
from qkv.prepared import is_prepared, load_prepared, write_split
from test_prepare import write_corpus


def prepare_files(prefix, out, **options):
    return prepare(
        out, trainpref=prefix, src_lang="de", tgt_lang="en", vocab_size=120, valid_size=30,
        progress=False, **options,
    )  # fmt: skip


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_prepare_refuses_the_folder_of_its_inputs_and_leaves_them_whole(tmp_path):
    """It once replaced the user's train.de/train.en (300 pairs) by the filtered copy (270)."""
    prefix = write_corpus(tmp_path, "train", synthetic_pairs(300, seed=1))
    before = snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(
            QkvError, match=r"holds the input .*train\.(de|en).*choose another --out"
        ):
            prepare_files(prefix, tmp_path, force=force)
    assert snapshot(tmp_path) == before


def test_prepare_replaces_an_earlier_prepared_folder_only_with_force(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", "train", synthetic_pairs(300, seed=1))
    out = tmp_path / "prepared"
    prepare_files(prefix, out)
    before = snapshot(out)
    with pytest.raises(QkvError, match=r"already holds prepared data .*pass --force"):
        prepare_files(prefix, out, seed=5)
    assert snapshot(out) == before
    prepare_files(prefix, out, seed=5, force=True)
    assert snapshot(out)["val.de"] != before["val.de"]  # another held-out slice


def test_a_prepare_that_stops_half_way_leaves_a_folder_that_is_not_read(tmp_path, monkeypatch):
    """`--force` over a prepared folder, stopped after its first split (a full disk, a kill), left
    the new train.pt beside the old tokenizer and prepare.json: a folder that loaded as whole."""
    prefix = write_corpus(tmp_path / "corpus", "train", synthetic_pairs(300, seed=1))
    out = tmp_path / "prepared"
    prepare_files(prefix, out)
    assert is_prepared(out)
    written = []

    def write_one_split_then_stop(folder, name, *args):
        if written:
            raise OSError(28, "No space left on device")
        written.append(name)
        write_split(folder, name, *args)

    monkeypatch.setattr(qkv.prepare, "write_split", write_one_split_then_stop)
    with pytest.raises(OSError, match="No space left"):
        prepare_files(prefix, out, seed=5, force=True)
    assert not is_prepared(out)
    with pytest.raises(QkvError) as error:
        load_prepared(out)
    assert str(error.value) == (
        f"{out}: a qkv prepare stopped while writing it (prepare.partial is there): run qkv "
        "prepare again, which replaces what it left"
    )
    monkeypatch.undo()
    cut_short = out / ".val.pt.k2j4h5g6.partial"  # what a kill inside a write leaves
    cut_short.write_bytes(b"half a split")
    # What it left is replaced without --force: `qkv train` prepares its run's data folder so.
    prepare_files(prefix, out, seed=5)
    assert is_prepared(out) and not (out / "prepare.partial").exists()
    assert not cut_short.exists()
    assert len(load_prepared(out).val.src) == 30


def test_prepare_never_replaces_a_file_it_did_not_write(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", "train", synthetic_pairs(300, seed=1))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.model").write_text("my own tokenizer")
    for force in (False, True):
        with pytest.raises(
            QkvError, match=r"holds tokenizer\.model, which qkv prepare did not write"
        ):
            prepare_files(prefix, out, force=force)
    assert (out / "tokenizer.model").read_text() == "my own tokenizer"
    # Files prepare does not write are no obstacle, and stay.
    (out / "tokenizer.model").unlink()
    (out / "notes.txt").write_text("keep me")
    prepare_files(prefix, out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "prepare.json").is_file()


def test_a_prepared_folder_of_other_languages_does_not_license_replacing_other_files(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", "train", synthetic_pairs(300, seed=1))
    out = tmp_path / "prepared"
    prepare_files(prefix, out)
    (out / "train.fr").write_text("à moi\n")
    fr_prefix = write_corpus(tmp_path / "fr", "train", synthetic_pairs(300, seed=2), ("de", "fr"))
    with pytest.raises(QkvError, match=r"holds train\.fr, which qkv prepare did not write"):
        prepare(out, trainpref=fr_prefix, src_lang="de", tgt_lang="fr", vocab_size=120,
                valid_size=30, progress=False, force=True)  # fmt: skip
    assert (out / "train.fr").read_text() == "à moi\n"


def test_an_output_file_is_never_an_input_and_replaces_a_file_only_with_force(tmp_path):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("a\n")
    check_output_file(output, [source])  # new: fine
    for force in (False, True):
        with pytest.raises(QkvError, match=r"-o .*in\.txt is also an input"):
            check_output_file(tmp_path / "." / "in.txt", [source], force=force)
    output.write_text("old\n")
    with pytest.raises(QkvError, match=r"out\.txt exists: pass --force to replace it"):
        check_output_file(output, [source])
    check_output_file(output, [source], force=True)
    with pytest.raises(QkvError, match="is a folder"):
        check_output_file(tmp_path, [source], force=True)


def test_cli_prepare_refuses_without_a_traceback(run_qkv, tmp_path):
    prefix = write_corpus(tmp_path, "train", synthetic_pairs(300, seed=1))
    result = run_qkv("prepare", "--trainpref", prefix, "--src-lang", "de", "--tgt-lang", "en",
                     "--out", tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("qkv: error: --out ") and "holds the input" in result.stderr
    assert len((tmp_path / "train.de").read_text().splitlines()) == 300


def test_cli_translate_never_writes_over_its_input_and_asks_before_replacing(
    run_qkv, toy_run, tmp_path
):
    source = tmp_path / "in.txt"
    source.write_text("a b c\n")
    same = run_qkv("translate", toy_run, "-i", source, "-o", source, "--force")
    assert same.returncode == 2 and "is also an input" in same.stderr
    assert source.read_text() == "a b c\n"
    checkpoint = run_qkv("translate", toy_run, "-i", source, "-o", toy_run / "best.pt", "--force")
    assert checkpoint.returncode == 2 and "is also an input" in checkpoint.stderr
    output = tmp_path / "out.txt"
    output.write_text("keep\n")
    kept = run_qkv("translate", toy_run, "-i", source, "-o", output)
    assert kept.returncode == 2 and "exists: pass --force" in kept.stderr
    assert output.read_text() == "keep\n"
    replaced = run_qkv("translate", toy_run, "-i", source, "-o", output, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert output.read_text() == "c b a\n"


def test_cli_evaluate_never_writes_over_its_references(run_qkv, toy_run, tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("a b c\n")
    ref.write_text("c b a\n")
    result = run_qkv("evaluate", toy_run, "--src", src, "--ref", ref, "-o", ref, "--force")
    assert result.returncode == 2 and "is also an input" in result.stderr
    assert ref.read_text() == "c b a\n"


def test_cli_average_never_writes_over_a_checkpoint_it_averages(run_qkv, toy_run, tmp_path):
    target = toy_run / "checkpoint_200.pt"
    before = target.read_bytes()
    result = run_qkv("average", toy_run, "--last", "2", "-o", target, "--force")
    assert result.returncode == 2 and "is also an input" in result.stderr
    assert target.read_bytes() == before
    existing = tmp_path / "avg.pt"
    existing.write_bytes(b"mine")
    refused = run_qkv("average", toy_run, "--last", "2", "-o", existing)
    assert refused.returncode == 2 and "exists: pass --force" in refused.stderr
    assert existing.read_bytes() == b"mine"


def test_cli_attention_and_explain_ask_before_replacing_a_picture_or_page(
    run_qkv, toy_run, tmp_path
):
    page, picture = tmp_path / "page.html", tmp_path / "picture.png"
    page.write_text("mine")
    picture.write_text("mine")
    for args in (
        ["attention", toy_run, "a b c", "-o", picture],
        ["attention", toy_run, "a b c", "-o", tmp_path / "new.png", "--html", page],
        ["explain", toy_run, "a b c", "--html", page],
    ):
        result = run_qkv(*args)
        assert result.returncode == 2 and "exists: pass --force" in result.stderr, result.stderr
    assert page.read_text() == picture.read_text() == "mine"
    replaced = run_qkv("explain", toy_run, "a b c", "--html", page, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert page.read_text() != "mine"


def test_train_never_replaces_files_in_an_out_folder_without_resume(run_qkv, tmp_path):
    """A run killed before its first checkpoint, or a folder that is not a run: config.toml and the
    rest would be written over."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.toml").write_text("# my notes\n")
    result = run_qkv("train", "demo", "--out", out, "--set", "train.max_steps=1")
    assert result.returncode == 2
    assert "holds config.toml, which training would replace" in result.stderr
    assert (out / "config.toml").read_text() == "# my notes\n"
