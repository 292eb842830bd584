import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FORKED_QKV = Path(__file__).resolve().parent / "forked_qkv.py"
# Put before a command: it runs with Ctrl-C (SIGINT) as at a terminal, whatever this suite inherited.
# A shell without job control starts `pytest ... &` with SIGINT ignored, every process under it
# inherits that, and Python then installs no KeyboardInterrupt: a test of Ctrl-C would wait forever.
AT_A_TERMINAL = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]  # fmt: skip


def _remove_by(pid: int, folder: str) -> None:
    if os.getpid() == pid:  # not in a child forked from this process
        shutil.rmtree(folder, ignore_errors=True)


# qkv's own operators (qkv.inference.native) are built once for the whole run, never in the user's
# cache; subprocesses inherit the folder, removed as the run ends.
if "QKV_NATIVE_CACHE" not in os.environ:
    os.environ["QKV_NATIVE_CACHE"] = tempfile.mkdtemp(prefix="qkv-native-")
    atexit.register(_remove_by, os.getpid(), os.environ["QKV_NATIVE_CACHE"])

# Under pytest-xdist (`pytest -n`, as the README runs the suite) each worker takes one thread, and
# the commands it runs too: with two each, two workers on two cores waited on each other's threads
# (training tests 3-9x slower, the suite 8:55 against 6:21). Tests of code that shares its work
# among threads are marked `threads(2)` and take two all the same (`threads_as_they_were`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The environment as the session starts, before any test sets a variable: the one `qkv_command`
# forks commands from.
ENVIRONMENT_AT_START = dict(os.environ)

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def threads_as_they_were(request, monkeypatch):
    """Each test leaves PyTorch's threads as it found them (`qkv.train.train` sets them as its config
    says): a compiled program's key holds them, and a test after it would compile another program
    than its `qkv` commands, which start with the default.

    A test marked `threads(n)` runs with n threads, and so do the commands it runs (OMP_NUM_THREADS,
    which they read as they import torch): qkv's operators and compiled programs split their work
    among threads, and one thread would never run the split."""
    threads = torch.get_num_threads()
    marker = request.node.get_closest_marker("threads")
    if marker is not None and marker.args[0] != threads:
        monkeypatch.setenv("OMP_NUM_THREADS", str(marker.args[0]))
        torch.set_num_threads(marker.args[0])
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def qkv_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for running this checkout's qkv in a subprocess (no install needed): `base` (by
    default this process's environment as it is now), and `extra`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("QKV_DATA_DIR", str(SHARED_DATA))
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def qkv_command(tmp_path_factory) -> list[str]:
    """The command line that runs `qkv`: a caller of a server that imported torch once and forks
    each command (forked_qkv.py), or `python -m qkv` where the server does not start."""
    folder = tmp_path_factory.mktemp("forked_qkv")
    socket_path = folder / "socket"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            # the commands it forks take Ctrl-C as `python -m qkv` at a terminal would
            [*AT_A_TERMINAL, sys.executable, str(FORKED_QKV), "--serve", str(socket_path)],
            env=qkv_env(ENVIRONMENT_AT_START), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=log, text=True,
        )  # fmt: skip
    if server.stdout.readline().strip() != "ready":
        server.kill()
        yield [sys.executable, "-m", "qkv"]
        return
    yield [sys.executable, str(FORKED_QKV), str(socket_path)]
    server.kill()
    server.wait()


@pytest.fixture
def run_qkv(qkv_command):
    """Run `qkv ARGS...` from this checkout as `python -m qkv` would (forked from a process that
    imported torch: `qkv_command`); returns the CompletedProcess."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout=600):
        return subprocess.run(
            [*qkv_command, *map(str, args)],
            input=input,
            capture_output=True,
            text=True,
            env=env or qkv_env(),
            timeout=timeout,
        )

    return run


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "multi30k").is_dir():
        pytest.skip(f"no Multi30k copy at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A run directory (tokenizer.model, best.pt, last.pt, checkpoint_100.pt, checkpoint_200.pt) whose
    model has learned to reverse sequences of letters: "a b c" -> "c b a". Built once per session."""
    from toy_task import build_toy_run

    return build_toy_run(tmp_path_factory.mktemp("toy_run"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`qkv demo` with no argument, in a fresh folder, as the Quick start runs it (the whole recipe,
    ~10 s): (the folder, with runs/demo in it; the CompletedProcess). Built once per session."""
    cwd = tmp_path_factory.mktemp("newcomer")
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "demo"],
        cwd=cwd, env=qkv_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


@pytest.fixture
def quantised_engine(monkeypatch):
    """`int8_works` checked afresh, and PyTorch's quantised engine put back afterwards."""
    from qkv.inference import linear

    engine = torch.backends.quantized.engine
    linear.int8_works.cache_clear()
    monkeypatch.setattr(linear, "_switch", None)
    yield linear
    torch.backends.quantized.engine = engine
    linear.int8_works.cache_clear()
