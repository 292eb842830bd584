import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# qkv's own operators (qkv.inference.native) are built once for the whole run, never in the user's
# cache; subprocesses inherit the folder.
os.environ.setdefault("QKV_NATIVE_CACHE", tempfile.mkdtemp(prefix="qkv-native-"))

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def threads_as_they_were():
    """Each test leaves PyTorch's threads as it found them (`qkv.train.train` sets them as its config
    says): a compiled program's key holds them, and a test after it would compile another program
    than its `qkv` commands, which start with the default."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def qkv_env(**extra: str) -> dict[str, str]:
    """Environment for running this checkout's qkv in a subprocess (no install needed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("QKV_DATA_DIR", str(SHARED_DATA))
    env.update(extra)
    return env


@pytest.fixture
def run_qkv():
    """Run `python -m qkv ARGS...` from this checkout; returns the CompletedProcess."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout=600):
        return subprocess.run(
            [sys.executable, "-m", "qkv", *map(str, args)],
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
