#!/usr/bin/env bash
# Install swiglu_hf with its test extra into a virtualenv and run the test suite.
# Default (the README's test command, .ci/run): ./.venv with the pinned, tested set in tests/constraints.txt.
# SWIGLU_HF_LATEST=1 (scripts/test_latest.sh): ./.venv-latest with the newest releases of everything but
# torch, which stays at 2.13.0 (the CPU build; a bare upgrade would pull a multi-GB CUDA build).
# TRITON_INTERPRET=1 runs the real Triton kernels on CPU; GPU tests (-m gpu) skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SWIGLU_HF_LATEST:-0}" = 1 ]; then
    venv=.venv-latest
    pins=(--upgrade --upgrade-strategy eager)
else
    venv=.venv
    pins=(-c tests/constraints.txt)
fi
python3 -m venv "$venv"
"$venv"/bin/python -m pip install -q --upgrade pip
"$venv"/bin/python -m pip install -q "${pins[@]}" "torch==2.13.0" -e ".[test]"
if [ "$venv" = .venv-latest ]; then
    echo "versions that differ from tests/constraints.txt (< pinned, > installed now):"
    diff <(grep -v '^#' tests/constraints.txt) <("$venv"/bin/python -m pip freeze --exclude-editable | sed 's/+cpu//') || true
fi
export TRITON_INTERPRET=1
status=0
"$venv"/bin/python -m pytest -q -p no:cacheprovider -m "not gpu" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
