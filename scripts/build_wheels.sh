#!/usr/bin/env bash
# scripts/build_wheels.sh [DIR]: fetch the wheels that scripts/gpu_check.sh installs offline.
#
# Run where PyPI is reachable; the GPU box has no network. Fills DIR (default .whl/) with:
#   liger-kernel 0.8.5   pure Python (liger_kernel-0.8.5-py3-none-any.whl, about 0.9 MB), so one
#                        wheel fits every Python/platform; its deps (torch, triton) are on the box
#                        already and are not downloaded (--no-deps).
# The platform flags below only matter if a binary wheel is ever added to the list.
# .whl/ must then travel with the working tree: leave it untracked and not git-ignored, or name
# it in the device tool's `carry`. Do not commit the wheels.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_17_x86_64 \
    -d "$DIR" "liger-kernel==0.8.5"
ls -l "$DIR"
