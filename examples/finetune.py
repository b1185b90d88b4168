"""Fine-tune stock vs patched (vs peers) with accelerate and compare speed, memory and loss.

    python examples/finetune.py                                   # shipped tiny model + corpus, ~1 min on CPU
    python examples/finetune.py --variants stock,patched,liger,compile --preset llama-3.2-1b --seq-len 2048
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --device cpu --steps 3   # DDP (gloo)

Same as `swiglu-hf finetune`; see `--help` and swiglu_hf/tools/finetune.py.
"""

import sys

from swiglu_hf.tools.finetune import main

if __name__ == "__main__":
    sys.exit(main())
