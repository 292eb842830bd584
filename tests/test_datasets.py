import datetime
import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from qkv import datasets
from qkv.datasets import (
    MULTI30K_LANGS,
    MULTI30K_SHA256,
    MULTI30K_SPLITS,
    multi30k_file,
    resolve_data_dir,
    synthetic_pairs,
)
from qkv.errors import QkvError

# Nothing listens on port 9 (discard): any attempt to download fails at once, offline.
UNREACHABLE = "http://127.0.0.1:9/multi30k"


@pytest.fixture
def served(tmp_path):
    """A local HTTP server on 127.0.0.1 serving the folder it yields, plus its base URL."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_data_dir_argument_beats_env_beats_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QKV_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("QKV_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "qkv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == Path.home() / ".cache" / "qkv"


def test_local_copy_is_used_without_network(shared_data, monkeypatch):
    monkeypatch.setenv("QKV_MULTI30K_URL", UNREACHABLE)
    path = multi30k_file("train", "de", data_dir=shared_data)
    assert path == shared_data / "multi30k" / "train.de.gz"
    monkeypatch.setenv("QKV_DATA_DIR", str(shared_data))
    assert multi30k_file("val", "cs") == shared_data / "multi30k" / "val.cs.gz"


def test_checksums_in_the_code_match_the_shared_copy(shared_data):
    sums = (shared_data / "multi30k" / "SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2], strict=True))
    for name, digest in expected.items():
        assert MULTI30K_SHA256[name] == digest, name


def test_split_and_language_tables():
    assert MULTI30K_LANGS == ("de", "en", "fr", "cs")
    assert MULTI30K_SPLITS[:3] == ("train", "val", "test_2016_flickr")
    assert "test_2017_flickr.cs.gz" not in MULTI30K_SHA256  # the 2017 sets have no Czech
    assert "test_2018_flickr.cs.gz" in MULTI30K_SHA256


@pytest.mark.parametrize(
    ("split", "lang", "message"),
    [
        ("dev", "de", "multi30k has no split 'dev'; splits: train, val, test_2016_flickr,"),
        ("train", "es", "multi30k has no language 'es'; languages: de, en, fr, cs"),
        (
            "test_2017_mscoco",
            "cs",
            "multi30k has no test_2017_mscoco set in 'cs', only in de, en, fr",
        ),
    ],
)
def test_unknown_split_or_language(split, lang, message, tmp_path):
    with pytest.raises(QkvError) as error:
        multi30k_file(split, lang, data_dir=tmp_path)
    assert str(error.value).startswith(message)


def test_missing_file_is_downloaded_atomically_with_its_checksum(
    served, tmp_path, shared_data, capfd
):
    folder, url = served
    shutil.copy(shared_data / "multi30k" / "val.en.gz", folder / "val.en.gz")
    data = tmp_path / "data"
    path = multi30k_file("val", "en", data_dir=data, base_url=url)
    assert path == data / "multi30k" / "val.en.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MULTI30K_SHA256["val.en.gz"]
    assert "val.en.gz" in capfd.readouterr().err, "a progress bar on stderr"
    assert [p.name for p in path.parent.iterdir()] == ["val.en.gz"], "no temporary files left"


def test_download_url_comes_from_the_environment_too(served, tmp_path, shared_data, monkeypatch):
    folder, url = served
    shutil.copy(shared_data / "multi30k" / "val.de.gz", folder / "val.de.gz")
    monkeypatch.setenv("QKV_MULTI30K_URL", url)
    assert multi30k_file("val", "de", data_dir=tmp_path, progress=False).is_file()


def test_corrupted_download_is_rejected_and_not_kept(served, tmp_path, shared_data):
    folder, url = served
    good = (shared_data / "multi30k" / "val.fr.gz").read_bytes()
    (folder / "val.fr.gz").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped
    with pytest.raises(QkvError) as error:
        multi30k_file("val", "fr", data_dir=tmp_path, base_url=url, progress=False)
    message = str(error.value)
    assert message.startswith(f"{url}/val.fr.gz: downloaded file has sha256 ")
    assert f"but val.fr.gz should have {MULTI30K_SHA256['val.fr.gz']}; it was not kept" in message
    assert not (tmp_path / "multi30k").exists(), "neither the file, a temporary, nor the folder"


def test_offline_error_says_what_where_why_and_how(tmp_path):
    with pytest.raises(QkvError) as error:
        multi30k_file("train", "de", data_dir=tmp_path, base_url=UNREACHABLE, progress=False)
    message = str(error.value)
    assert message.startswith(
        f"multi30k file train.de.gz is missing: looked for {tmp_path / 'multi30k' / 'train.de.gz'}; "
        f"downloading {UNREACHABLE}/train.de.gz failed ("
    )
    assert "Connection refused" in message
    assert message.endswith(
        "set QKV_DATA_DIR (or --data-dir) to the folder that holds multi30k/train.de.gz"
    )
    assert not (tmp_path / "multi30k").exists()  # the folder it made for the download, gone
    (tmp_path / "multi30k").mkdir()  # a folder that was there stays
    with pytest.raises(QkvError):
        multi30k_file("train", "de", data_dir=tmp_path, base_url=UNREACHABLE, progress=False)
    assert (tmp_path / "multi30k").is_dir()


def test_missing_file_on_the_server(served, tmp_path):
    _, url = served
    with pytest.raises(QkvError, match=r"downloading .*/val\.cs\.gz failed \(File not found\)"):
        multi30k_file("val", "cs", data_dir=tmp_path, base_url=url, progress=False)


# --- the built-in task -----------------------------------------------------------------------


def test_synthetic_task_is_reproducible_from_its_seed():
    assert synthetic_pairs(50, seed=3) == synthetic_pairs(50, seed=3)
    assert synthetic_pairs(50, seed=3) != synthetic_pairs(50, seed=4)
    pairs = synthetic_pairs(3000, seed=0)
    assert len(set(pairs)) == 3000, "pairs are distinct, so slices never overlap"


def test_synthetic_targets_are_the_iso_dates_of_the_words():
    months = datasets._MONTHS
    for words, iso in synthetic_pairs(300, seed=5):
        date = datetime.date.fromisoformat(iso)  # a real calendar date
        assert months[date.month - 1] in words.split()
        assert datetime.date(1900, 1, 1) <= date <= datetime.date(2099, 12, 31)


def test_synthetic_task_needs_reordering():
    pairs = synthetic_pairs(300, seed=0)
    # The year is spoken last but written first, and day and month come in three orders.
    assert all(words.split()[0] not in ("nineteen", "twenty", "two") for words, _ in pairs)
    starts = {words.split()[0] in datasets._MONTHS for words, _ in pairs}
    assert starts == {True, False}
    assert any(words.startswith("the ") for words, _ in pairs)


def test_spoken_forms():
    assert (
        datasets.date_in_words(datetime.date(1994, 3, 3), 0)
        == "the third of march nineteen ninety-four"
    )
    assert (
        datasets.date_in_words(datetime.date(2005, 11, 21), 1)
        == "november the twenty-first two thousand and five"
    )
    assert (
        datasets.date_in_words(datetime.date(1900, 12, 30), 2)
        == "thirtieth december nineteen hundred"
    )
    assert (
        datasets.date_in_words(datetime.date(1907, 1, 12), 2) == "twelfth january nineteen oh seven"
    )
    assert (
        datasets.date_in_words(datetime.date(2000, 2, 29), 2)
        == "twenty-ninth february two thousand"
    )
    assert (
        datasets.date_in_words(datetime.date(2031, 5, 20), 2) == "twentieth may twenty thirty-one"
    )


def test_too_many_synthetic_pairs_asked():
    with pytest.raises(
        QkvError, match=r"^the synthetic task has 219147 distinct pairs; asked for 10000000"
    ):
        synthetic_pairs(10_000_000)
