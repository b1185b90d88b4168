#!/usr/bin/env bash
# Fine-tune a tiny Llama through axolotl with swiglu_hf's plugin, for real, on CPU; and the TRL recipe.
#
#   bash scripts/axolotl_check.sh            # builds .venv-axolotl once (~5 min, ~4.3 GB), then runs
#   bash scripts/axolotl_check.sh --install  # only build / refresh the virtualenv
#
# axolotl pins its own transformers and peft, so it gets its own virtualenv (cached; rebuilt when the
# pinned versions below change). torch is installed first and kept by a constraint, so pip never swaps
# it for another build. The checks themselves are in scripts/axolotl_run.py (outside tests/, so the
# main pytest run never collects them). Not part of .ci/run: the install alone is ~4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AXOLOTL_VENV:-.venv-axolotl}
PYTHON=${AXOLOTL_PYTHON:-python3.11}  # axolotl 0.19.0 supports Python 3.11; 0.20+ need 3.12
AXOLOTL_VERSION=0.19.0
TORCH_VERSION=2.13.0
want="axolotl==$AXOLOTL_VERSION torch==$TORCH_VERSION"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }  # quiet local-index noise

if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$want" ]; then
    echo "building $VENV ($want)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
    pip install -q "torch==$TORCH_VERSION"
    pip install -q -c "$VENV/constraints.txt" "axolotl==$AXOLOTL_VERSION" -e .
    echo "$want" > "$VENV/.installed"
else
    # the cached venv runs this checkout (editable install); refresh it in case the checkout moved
    pip install -q --no-deps -e .
fi
"$VENV/bin/python" -W ignore -c "import axolotl, torch, transformers, peft, trl, swiglu_hf; print('axolotl', axolotl.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
[ "${1:-}" = "--install" ] && exit 0

# Both the PyTorch path and the real Triton kernels (interpreter, fp32) are run.
TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" scripts/axolotl_run.py "$@"
