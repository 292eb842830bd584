"""What this PyTorch can run of qkv's: the suite runs on the oldest PyTorch that pyproject.toml
accepts too (.ci/run), where the compiled step is not there and `--compile` says so."""

import pytest

from qkv.inference.static_step import COMPILED_FROM_TORCH, torch_older_than

TOO_OLD_TO_COMPILE = torch_older_than(COMPILED_FROM_TORCH)  # this PyTorch's version, or None

# For the tests of what the compiled step does: on an older PyTorch, decoding is the eager engine's
# (tests/test_translate.py checks that it says so and translates the same).
needs_compiled_step = pytest.mark.skipif(
    TOO_OLD_TO_COMPILE is not None,
    reason=f"the compiled step needs PyTorch {'.'.join(map(str, COMPILED_FROM_TORCH))} or later",
)

__all__ = ["TOO_OLD_TO_COMPILE", "needs_compiled_step", "torch_older_than"]
