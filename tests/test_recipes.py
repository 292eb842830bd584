"""The recipes for machines CI does not have: recipes/arm_check.py runs on any CPU (CI's x86 one too),
and recipes/arm_emulated.sh, which needs root and an emulator, is at least valid bash; so is
recipes/torch_versions.sh, which CI runs on the oldest PyTorch (.ci/run)."""

import subprocess
import sys

from conftest import REPO, qkv_env


def test_the_arm_check_passes_on_this_cpu():
    result = subprocess.run(
        [sys.executable, "recipes/arm_check.py", "--no-compile"],
        cwd=REPO, env=qkv_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].endswith("all checks passed")
    assert any("ok: the eager engine's beams = the model's own" in line for line in lines)
    assert not any("FAILED" in line for line in lines)


def test_the_arm_emulation_script_is_valid_bash():
    result = subprocess.run(
        ["bash", "-n", "recipes/arm_emulated.sh"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_torch_versions_recipe_is_valid_bash_and_asks_for_a_version():
    script = "recipes/torch_versions.sh"
    syntax = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    bare = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True)
    assert bare.returncode == 2 and bare.stderr.startswith(
        "usage: recipes/torch_versions.sh VERSION"
    )
