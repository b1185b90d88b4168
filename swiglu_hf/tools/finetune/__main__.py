"""`python -m swiglu_hf.tools.finetune ...` = `swiglu-hf finetune ...` (also under `accelerate launch -m`)."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
