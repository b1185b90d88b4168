#!/usr/bin/env bash
# The main job and the example script under every accelerate config in examples/accelerate_configs/,
# 2 processes each, exactly the README's "Multi-GPU and multi-node" commands; then one table.
#
#   bash scripts/engine_matrix.sh OUT [PYTHON_ENV_BIN]     # e.g. OUT=runs/engines, bin=.venv/bin
#
# On a CPU-only machine it runs the engines for real over gloo (DS_ACCELERATOR=cpu; the tools switch
# accelerate to the named engine, see the README). Needs the deepspeed extra for zero2/zero3.
# Per engine: OUT/<engine>/finetune (results.json of stock,patched,tiled) and OUT/<engine>/example_{patched,stock}
# (examples/finetune.py with and without the patch, on the tiny checkpoint). Exit 1 if anything differs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: engine_matrix.sh OUT [ENV_BIN]}
bin=${2:-.venv/bin}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
ckpt="$out/tiny-llama"
[ -d "$ckpt" ] || "$bin/python" -m swiglu_hf.tools.tiny_checkpoint "$ckpt" >/dev/null
device=()
"$bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || device=(--device cpu)

for cfg in examples/accelerate_configs/*.yaml; do
    engine=$(basename "$cfg" .yaml)
    start=$(date +%s)
    "$bin/accelerate" launch --config_file "$cfg" -m swiglu_hf.cli finetune --variants stock,patched,tiled \
        --steps 3 --batch-size 2 --seq-len 64 --eval-batches 1 "${device[@]}" --out "$out/$engine/finetune" \
        > "$out/$engine.finetune.log" 2>&1
    for variant in patched stock; do
        flag=(); [ "$variant" = stock ] && flag=(--no-patch)
        "$bin/accelerate" launch --config_file "$cfg" examples/finetune.py --model "$ckpt" \
            --data swiglu_hf/tools/data/corpus.txt --seq-len 64 --batch-size 2 --grad-accum 1 --max-steps 3 \
            --out "$out/$engine/example_$variant" "${flag[@]}" > "$out/$engine.example_$variant.log" 2>&1
    done
    echo "$engine: $(( $(date +%s) - start )) s"
done

"$bin/python" - "$out" <<'EOF'
import hashlib, json, sys
from pathlib import Path

out, bad = Path(sys.argv[1]), 0
print("| config | engine that ran | procs | wrapped by | MLPs patched | max abs loss diff vs stock (patched, tiled) "
      "| saved bytes stock / patched / tiled | example: weights equal |")
print("|---|---|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if (p / "finetune" / "results.json").exists()):
    r = json.loads((run / "finetune" / "results.json").read_text())
    v = r["variants"]
    diffs = [v[n]["max_abs_loss_diff_vs_stock"] for n in ("patched", "tiled")]
    digest = lambda d: hashlib.sha256(b"".join(f.read_bytes() for f in sorted(d.glob("*.safetensors")))).hexdigest()
    same = digest(run / "example_patched") == digest(run / "example_stock")
    bad += any(diffs) or not same
    saved = " / ".join(f"{v[n]['saved_activation_bytes']:,}" for n in ("stock", "patched", "tiled"))
    print(f"| {run.name} | {r['engine']['name']} | {r['num_processes']} | {v['patched'].get('wrapped_by', '-')} "
          f"| {v['patched']['patched_modules']} | {diffs[0]:g}, {diffs[1]:g} | {saved} | {same} |")
sys.exit(1 if bad else 0)
EOF
