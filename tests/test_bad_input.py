"""No traceback on any input: random bytes on stdin and random text as arguments give a translation
per line or one clear `qkv: error:` line (exit code 2), never a traceback."""

import io
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import qkv_env
from qkv.cli import main

# Lines of anything: random bytes (often not UTF-8), text with NUL and control characters, lone
# surrogates as a careless encoder writes them, and long lines.
LINE = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.text(alphabet="\x00\x01\x1b\t\r\x7f\u2028ab ", max_size=20).map(str.encode),
    st.just(("a b c " * 400).encode()),
)
FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Stdin:
    """What `qkv translate` reads: sys.stdin.buffer."""

    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


def first_bad_line(lines: list[bytes]) -> int | None:
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return None


@FUZZ
@given(lines=st.lists(LINE, max_size=6))
def test_translate_answers_random_bytes_on_stdin_with_lines_or_one_error(
    lines, toy_run, capsys, monkeypatch
):
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", Stdin(b"".join(line + b"\n" for line in lines)))
    code = main(["translate", str(toy_run), "--beam", "1", "--quiet"])
    out, err = capsys.readouterr()
    # A line is what lies between newlines: the fuzzed lines may hold newlines of their own.
    real_lines = b"".join(line + b"\n" for line in lines).split(b"\n")[:-1]
    bad = first_bad_line(real_lines)
    if bad is None:
        assert code == 0, err
        assert len(out.split("\n")) - 1 == len(real_lines)
    else:
        assert code == 2
        assert err.strip().splitlines()[-1] == f"qkv: error: stdin:{bad}: not valid UTF-8"
        assert len(out.split("\n")) - 1 == bad - 1  # the lines before it are translated
    assert "Traceback" not in err


# Text as a command line delivers it: any character, and lone surrogates where bytes were not UTF-8.
ARGUMENT = st.lists(
    st.sampled_from([chr(0xDC80), chr(0xDCFF), chr(0xD800)]) | st.characters(),
    min_size=1,
    max_size=40,
).map("".join)


@FUZZ
@given(text=ARGUMENT)
def test_explain_answers_any_text_argument_with_a_walk_through_or_one_error(text, capsys):
    capsys.readouterr()
    code = main(["explain", text])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("qkv: error: ") and len(err.strip().splitlines()) == 1
    else:
        assert out


def test_translate_names_the_line_of_stdin_that_is_not_utf8_after_translating_the_others(
    run_qkv, toy_run
):
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "translate", str(toy_run), "--beam", "2"],
        input=b"a b c\n\xff\xfe\np o\n",
        capture_output=True,
        env=qkv_env(),
    )
    assert result.returncode == 2
    assert result.stdout == b"c b a\n"
    assert result.stderr.decode().splitlines()[-1] == "qkv: error: stdin:2: not valid UTF-8"


def test_an_argument_that_is_not_utf8_is_a_clear_error(toy_run, tmp_path):
    """Such bytes reach Python as lone surrogates, on which SentencePiece raised a traceback."""
    for args in (
        ["attention", toy_run, b"a \xff c", "-o", tmp_path / "a.png"],
        ["explain", toy_run, b"\xff"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "qkv", *args], capture_output=True, env=qkv_env()
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.decode().startswith("qkv: error: not valid UTF-8 text (byte ff")
        assert b"Traceback" not in result.stderr


@FUZZ
@given(src=st.lists(LINE, max_size=4), ref=st.lists(LINE, max_size=4))
def test_evaluate_answers_random_files_with_scores_or_one_error(
    src, ref, toy_run, capsys, tmp_path
):
    capsys.readouterr()
    files = []
    for name, lines in (("src.txt", src), ("ref.txt", ref)):
        path = tmp_path / name
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        files.append(str(path))
    code = main(["evaluate", str(toy_run), "--src", files[0], "--ref", files[1], "--beam", "1",
                 "--quiet", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("qkv: error: ") and len(err.strip().splitlines()) == 1, err
    else:
        assert '"bleu"' in out.lower()
