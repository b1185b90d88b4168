#!/usr/bin/env bash
# The suite against the newest releases of swiglu_hf's dependencies (./.venv-latest), to learn early what
# tomorrow's fresh install will meet; it prints which versions differ from the pinned set first.
# A green run is the time to refresh tests/constraints.txt (see its header) and README's compatibility table.
set -euo pipefail
SWIGLU_HF_LATEST=1 exec bash "$(dirname "$0")/test.sh" "$@"
