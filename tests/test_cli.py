import os
import signal
import subprocess
import sys

from conftest import AT_A_TERMINAL, qkv_env
from qkv import __version__
from qkv.cli import COMMANDS
from torch_versions import needs_compiled_step


def test_version(run_qkv):
    result = run_qkv("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qkv {__version__}"


def test_help_lists_usage(run_qkv):
    result = run_qkv("--help")
    assert result.returncode == 0
    assert "usage: qkv" in result.stdout
    # One optional run directory and one text, not argparse's "[[RUN_DIR] TEXT ...]"
    explain = run_qkv("explain", "--help").stdout
    assert "[--force] [RUN_DIR] TEXT\n" in explain and "[[RUN_DIR]" not in explain
    bare = run_qkv()  # no command: the usage on stderr, and the exit status of a usage error
    assert bare.returncode == 2 and "usage: qkv" in bare.stderr and bare.stdout == ""


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter, with qkv importable."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=qkv_env()
    )


def test_help_of_every_command_imports_no_torch():
    """The parser is built without torch (~2 s of imports): `qkv --help` and each command's
    `--help` come at once."""
    code = (
        "import sys\n"
        "from qkv.cli import COMMANDS, main\n"
        "names = [c.__name__.removeprefix('_add_') for c in COMMANDS]\n"
        "for argv in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print(len(names), 'torch' in sys.modules, file=sys.stderr)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.split()[-2:] == [str(len(COMMANDS)), "False"]
    assert "usage: qkv export" in result.stdout and "--quantization" in result.stdout


def test_torch_is_imported_out_of_the_cycle_collectors_reach():
    # `qkv translate`, `evaluate` and `serve` call it first: full collections walked PyTorch's
    # objects, 10-45 ms each, before the first translation (`import_torch`)
    result = run_python(
        "import gc, sys\n"
        "from qkv.cli.common import import_torch\n"
        "import_torch()\n"
        "print(gc.isenabled(), 'torch' in sys.modules, gc.get_freeze_count(), len(gc.get_objects()))"
    )
    enabled, imported, frozen, collected = result.stdout.split()
    assert (enabled, imported) == ("True", "True") and int(frozen) > 100_000 > int(collected)


def test_the_tests_forked_commands_answer_as_python_m_qkv_does(qkv_command, toy_run, tmp_path):
    """conftest runs `qkv` forked from a process that imported torch (forked_qkv.py): its output,
    errors, exit status and death by a signal are those of `python -m qkv`."""
    assert qkv_command[1].endswith("forked_qkv.py"), "the server did not start"
    out = tmp_path / "out.txt"
    cases = [
        (["translate", str(toy_run), "--precision", "fp32"], "a b c\r\n\nd e\n"),
        (["translate", str(toy_run), "--beam", "0"], ""),  # a clear error: 2
        (["translate", str(toy_run), "-o", str(out), "--force"], "f g\n"),  # to a file
        (["no-such-command"], ""),  # argparse's error: 2
    ]
    for args, stdin in cases:
        runs = [
            subprocess.run(
                [*command, *args], input=stdin, capture_output=True, text=True, env=qkv_env()
            )
            for command in (qkv_command, [sys.executable, "-m", "qkv"])
        ]
        forked, plain = [(r.returncode, r.stdout, r.stderr) for r in runs]
        assert forked == plain, args
    assert out.read_text() == "g f\n"
    # A command interrupted while it waits for its input (Ctrl-C: SIGINT): the caller passes the
    # signal on, and the command says so and ends as it does (130).
    ends = []
    for command in (qkv_command, [sys.executable, "-m", "qkv"]):
        process = subprocess.Popen(
            [*AT_A_TERMINAL, *command, "translate", str(toy_run), "--precision", "fp32"],
            env=qkv_env(),
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stderr.readline() == "qkv: precision fp32\n"  # loaded: reading its input
        process.send_signal(signal.SIGINT)
        ends.append((process.wait(timeout=60), process.stderr.read()))
    assert ends[0] == ends[1] == (130, "qkv: interrupted\n"), ends
    # Without a server (or where `forkable` says no): `python -m qkv` itself.
    alone = subprocess.run(
        [*qkv_command[:2], str(tmp_path / "no-server"), "--version"],
        capture_output=True, text=True, env=qkv_env(),
    )  # fmt: skip
    assert alone.returncode == 0 and alone.stdout == f"qkv {__version__}\n", alone.stderr


def test_a_command_is_forked_only_where_the_environment_leaves_imports_as_they_were():
    from forked_qkv import forkable

    server = {"PATH": "/bin", "QKV_DATA_DIR": "/data", "OMP_NUM_THREADS": "2"}
    assert forkable(server, dict(server, QKV_DATA_DIR="/other", PYTEST_CURRENT_TEST="x"))
    assert forkable(server, dict(server, QKV_COMPILE_AUTOTUNE="0"))
    assert not forkable(server, dict(server, OMP_NUM_THREADS="1"))
    assert not forkable(server, dict(server, ATEN_CPU_CAPABILITY="avx2"))
    assert not forkable(server, dict(server, QKV_FAST_KERNELS="0"))  # read as qkv.kernels imports
    assert not forkable(server, {k: v for k, v in server.items() if k != "PATH"})


@needs_compiled_step
def test_commands_are_still_forked_after_inductor_compiled_in_the_test_process(monkeypatch):
    """Inductor sets variables of its own in the environment of a process that compiled (most of the
    suite's commands run after such a test): they must not stop the commands from being forked."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from forked_qkv import forkable

    for name in ("TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"):
        monkeypatch.setenv(name, "")  # undone as the test ends, whatever Inductor writes over it
        monkeypatch.delenv(name)
    server_env = qkv_env()  # as the server starts, before any compile
    cache_dir()  # what compiling does first
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = "140000000000"  # as loading does
    assert "TORCHINDUCTOR_CACHE_DIR" in os.environ
    assert forkable(server_env, qkv_env())


def test_lines_written_to_a_gz_file_are_gzipped_and_to_others_plain(tmp_path):
    import gzip

    from qkv.cli.common import write_lines

    write_lines(["ein Hund", "läuft"], tmp_path / "out.en.gz")
    assert gzip.decompress((tmp_path / "out.en.gz").read_bytes()) == "ein Hund\nläuft\n".encode()
    write_lines(["ein Hund"], tmp_path / "out.en")
    assert (tmp_path / "out.en").read_text(encoding="utf-8") == "ein Hund\n"
