#!/usr/bin/env bash
# qkv's tests on other releases of PyTorch than the one the install steps pin (2.13.0): each in a
# virtual environment of its own, with qkv from this checkout (editable), then the README's test
# command. pyproject.toml accepts torch>=2.4, and `.ci/run` runs this with the oldest, 2.4.1, on every
# commit; `--compile` needs 2.8 or later (`qkv.inference.static_step.COMPILED_FROM_TORCH`), and
# says so in one line on an older one.
#
#   recipes/torch_versions.sh VERSION ... [-- PYTEST_ARGUMENT ...]
#   recipes/torch_versions.sh 2.4.1
#   recipes/torch_versions.sh 2.8.0 2.15.0 -- tests/test_compiled.py
#
# Held to AVX2, set the variables of `qkv.hardware.AVX2_ENVIRONMENT` before it (`.ci/run` does so for
# 2.8.0, whose Inductor got int64 floor division wrong in AVX2 code: session 58).
#
# PyPI's wheels other than 2.13.0+cpu are its CUDA builds (they run on the CPU too): each
# environment takes ~5.5 GB with NVIDIA's libraries, downloaded from PyPI (~1-2 minutes at 60 MB/s),
# under QKV_TORCH_VENVS (default: a temporary folder, removed at the end; a folder named there is
# kept, and an environment in it is used again). A pip constraint that caps torch below the version
# asked for stops pip; `PIP_CONSTRAINT=/dev/null` lifts it for the run. Session 57 ran the suite this
# way on a 2-core AMD EPYC Zen 4: 2.4.1, 2.8.0, 2.14.1 and 2.15.0 (README.md, "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."
versions=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    versions+=("$1")
    shift
done
[ $# -gt 0 ] && shift # the "--"
if [ ${#versions[@]} = 0 ]; then
    echo "usage: recipes/torch_versions.sh VERSION ... [-- PYTEST_ARGUMENT ...]" >&2
    exit 2
fi
if [ -n "${QKV_TORCH_VENVS:-}" ]; then
    venvs=$QKV_TORCH_VENVS
    mkdir -p "$venvs"
else
    venvs=$(mktemp -d)
    trap 'rm -rf "$venvs"' EXIT
fi
for version in "${versions[@]}"; do
    venv=$venvs/torch-$version
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        # Not through the machine's pip cache: gigabytes each, used once.
        "$venv/bin/pip" install --quiet --no-cache-dir "torch==$version"
    fi
    "$venv/bin/pip" install --quiet --no-cache-dir -e ".[dev,serve,export]"
    found=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
    case "$found" in
    "$version" | "$version"+*) ;;
    *)
        echo "asked for PyTorch $version, the environment has $found" >&2
        exit 1
        ;;
    esac
    echo "PyTorch $found:"
    # Inductor's cache of its own: by default one folder serves every release, and 2.13.0 loaded a
    # kernel that 2.8.0 had compiled there (a ZeroDivisionError, session 58).
    TORCHINDUCTOR_CACHE_DIR="$venv/inductor-cache" \
        "$venv/bin/python" -m pytest -q -n auto --maxprocesses 4 "$@"
done
