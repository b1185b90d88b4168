#!/usr/bin/env bash
# swiglu_hf where users already train, for real, on CPU: axolotl (the plugin) and TRL, or LLaMA-Factory.
#
#   bash scripts/axolotl_check.sh                # axolotl 0.19.0 + TRL in .venv-axolotl (built once: ~5 min, ~4.3 GB)
#   bash scripts/axolotl_check.sh llamafactory   # LLaMA-Factory 0.9.5 in .venv-llamafactory (built once: ~3 min, ~3 GB)
#   bash scripts/axolotl_check.sh --install [llamafactory]   # only build / refresh the virtualenv
#
# Each framework pins its own transformers / peft / trl, so each gets its own cached virtualenv (rebuilt
# when the pins below change) with this checkout installed editable. torch is installed first and kept
# by a constraint, so pip never swaps it for another build. The checks are scripts/axolotl_run.py and
# scripts/llamafactory_run.py (outside tests/: the main pytest run never collects them). Not in .ci/run:
# the installs alone are several GB.
set -euo pipefail
cd "$(dirname "$0")/.."

install_only=0
if [ "${1:-}" = "--install" ]; then install_only=1; shift; fi
target=${1:-axolotl}
if [ $# -gt 0 ]; then shift; fi  # the rest goes to the run script (axolotl_run.py: full lora typos trl)
PYTHON=${CHECK_PYTHON:-python3.11}  # axolotl 0.19.0 supports Python 3.11; 0.20+ need 3.12
TORCH_VERSION=2.13.0
case "$target" in
    axolotl) VENV=.venv-axolotl; want="axolotl==0.19.0"; run=scripts/axolotl_run.py
             probe="import axolotl, trl; print('axolotl', axolotl.__version__, '| trl', trl.__version__)" ;;
    llamafactory) VENV=.venv-llamafactory; want="llamafactory==0.9.5"; run=scripts/llamafactory_run.py
             probe="import llamafactory; print('llamafactory', llamafactory.__version__)" ;;
    *) echo "usage: $0 [--install] [axolotl|llamafactory]" >&2; exit 2 ;;
esac
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }  # quiet local-index noise

if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$want torch==$TORCH_VERSION" ]; then
    echo "building $VENV ($want, torch==$TORCH_VERSION)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
    pip install -q "torch==$TORCH_VERSION"
    pip install -q -c "$VENV/constraints.txt" "$want" -e .
    if [ "$target" = llamafactory ]; then
        # pip pairs torch 2.13.0 with a torchvision whose operators do not register on it, and then
        # `from transformers import PreTrainedModel` fails; a text-only run needs no torchvision
        pip uninstall -y -q torchvision
    fi
    echo "$want torch==$TORCH_VERSION" > "$VENV/.installed"
else
    pip install -q --no-deps -e .  # the cached venv runs this checkout
fi
"$VENV/bin/python" -W ignore -c "import torch, transformers, peft; $probe; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
[ "$install_only" = 1 ] && exit 0

# The PyTorch path and the real Triton kernels (interpreter, fp32) both run.
TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -W ignore "$run" "$@"
