#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR: the prepared GPU run, one H200 and no network, in 7.5 minutes.
#
# The device session has 15 minutes of device time, of which the machine's start takes 1-2; the
# script runs once, so it must fit with room left: run it with the device tool's timeout_s >= 480.
# Steps run in this order, each under its own `timeout` (SIGINT first, so pytest and the
# benchmarks stop cleanly and print what they have; SIGKILL 10 s later), all under one deadline
# (GPU_CHECK_BUDGET_S, default 450 s, of which the last 15 s are kept for the kill grace and the
# summary). A step gets min(its cap, time left); the fine-tuning comparison, the project's main
# job, runs last and gets all the time that is left (~10 s if every step used its whole cap;
# more in practice, as the steps after the warm-up no longer compile kernels):
#   step      cap s  what                                                   -> OUTDIR/...
#   install      30  wheels in ./.whl (e.g. liger-kernel), then this project: editable, no deps,
#                    no build isolation, no index (nothing is downloaded)
#   env          10  nvidia-smi, versions, git commit / tree fingerprint    -> env.txt
#   warmup       60  compile every Triton specialization the later steps launch (dtype x
#                    activation x split/packed x fwd/bwd/bwd-with-h x the shape classes the JIT
#                    specializes on), 12 processes in parallel, into Triton's on-disk cache, so
#                    a cold cache cannot push the timed steps past their caps (exit status and
#                    seconds in summary.md; its log's tail there if it fails)
#   tests       100  TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py     -> gpu_tests.log
#   kernel       70  swiglu-hf bench kernel, I = 8192/14336/28672 x T = 4k/64k
#                                                                           -> kernel.json, kernel.md
#   mlp          50  swiglu-hf bench mlp: one Llama-3-8B MLP layer fwd+bwd, time and peak memory,
#                    T = 8k/32k                                             -> memory.md (2nd part)
#   memory       20  swiglu-hf bench memory: saved-for-backward bytes/token -> memory.md (1st part)
#   overhead     25  swiglu-hf bench overhead --device cuda: host time per MLP call (the Triton
#                    launcher's cost; T = 1 and 128) and greedy-decode tokens/s of the tiny Llama,
#                    stock vs patched                                       -> memory.md (5th part)
#   verify8b     60  swiglu_hf.verify on a random-weight Llama-3.1-8B-shaped model in bf16 (built
#                    on the GPU from the public config's shape, no download): whole model patched
#                    vs stock, each MLP vs float64, greedy tokens, verify's peak
#                    (max_memory_allocated; goal: weights + grads + one MLP in float64 + batch)
#                                                                           -> memory.md (3rd part)
#   plancheck    40  swiglu-hf plan's predicted peak vs max_memory_allocated, Llama-3.2-1B shape,
#                    bf16, stock/patched/tiled: LoRA + checkpointing at 4k tokens, full at 1k
#                                                                           -> memory.md (4th part)
#   finetune   rest  swiglu-hf finetune --preset llama-3.2-1b --seq-len 2048 --steps 8, variants
#                    stock,patched,tiled,liger,compile (compile last: the slowest to start; liger
#                    is skipped, with its reason, when not importable)
#                                                                  -> finetune/results.{md,json}
#   summary          every step's exit status and duration, key numbers    -> summary.md
#                    (scripts/gpu_summary.py, written from the exit trap whatever happened)
# A failing step does not stop the later ones. Only the 8 files above are written to OUTDIR (the
# device tool returns at most 8 files, at most 2 folders deep); other logs stay in a scratch
# folder and the tail of a failed step's log is quoted in summary.md. The benchmarks rewrite
# their outputs as they go (kernel.json after each size, finetune's results after each variant),
# so a step stopped at its cap still leaves what it finished. Extra finetune files (plots) are
# zipped into OUTDIR/finetune/extras.zip only when fewer than 8 files came out.
#
# Exit status: 0 when every step that ran passed, 1 otherwise; summary.md is written either way.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450), SKIP_INSTALL=1 (use
# the environment as it is), GIT_COMMIT (recorded when the copy has no .git).
#
# Carrying liger-kernel to the box (it has no network): liger-kernel is a pure-Python wheel
# (liger_kernel-0.8.5-py3-none-any.whl, ~0.9 MB), so one file works with any Python and platform.
# Where PyPI is reachable, run scripts/build_wheels.sh, which does
#     pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_17_x86_64 -d .whl liger-kernel==0.8.5
# and let .whl/ travel with the working tree (untracked and not git-ignored, or in `carry`).
# Without it the liger columns say "not importable" and the finetune run skips its liger variant.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=15  # the last step's SIGKILL grace (10 s) and the summary
T0=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEPS="$SCRATCH/steps.tsv"  # name, rc, seconds, limit, note, log
: >"$STEPS"
CLI=("$PY" -m swiglu_hf.cli)
# tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU suite: every step here needs the
# compiled kernels. Unbuffered output, so a step killed at its limit still leaves its log.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PY
FAILED=0
FINISHED=0

record() {  # name rc seconds limit note log
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" "$6" >>"$STEPS"
}

# step NAME CAP_SECONDS LOG CMD...: run CMD under min(CAP, time left), log to LOG, record the result.
step() {
    local name=$1 cap=$2 log=$3 left limit start rc secs note=""
    shift 3
    left=$((T0 + BUDGET - RESERVE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        record "$name" skip 0 0 "not run: no time left in the ${BUDGET}s budget" ""
        return 0
    fi
    echo "[gpu_check] $name (limit ${limit}s): $*" >&2
    echo "\$ $* (limit ${limit}s)" >>"$log"
    start=$(date +%s)
    if timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1; then rc=0; else rc=$?; fi
    secs=$(($(date +%s) - start))
    if ((rc == 124 || rc == 137)); then note="timed out after ${limit}s"; fi
    if ((rc != 0)); then FAILED=1; fi
    record "$name" "$rc" "$secs" "$limit" "$note" "$log"
    echo "[gpu_check] $name: exit $rc after ${secs}s" >&2
}

write_summary() {
    if ! "$PY" "$ROOT/scripts/gpu_summary.py" "$OUT" "$STEPS" "$BUDGET" "$(($(date +%s) - T0))"; then
        {   # the interpreter itself is broken: a plain summary from bash
            echo "# GPU check summary (python could not write it)"
            echo
            echo "| step | exit | seconds | limit s | note |"
            echo "|---|---:|---:|---:|---|"
            while IFS=$'\t' read -r n rc s l note _; do echo "| $n | $rc | $s | $l | $note |"; done <"$STEPS"
        } >"$OUT/summary.md"
    fi
}

finish() {
    local rc=$?
    ((FINISHED)) && return
    FINISHED=1
    if ((rc != 0)); then
        record "gpu_check.sh" "$rc" "$(($(date +%s) - T0))" "$BUDGET" "the script itself stopped early" ""
        FAILED=1
    fi
    rm -f "$OUT"/*.tmp "$OUT"/finetune/*.tmp 2>/dev/null || true
    write_summary
    head -120 "$OUT/summary.md" || true  # also in the command's output, in case files do not come back
    echo "[gpu_check] summary: $OUT/summary.md ($(($(date +%s) - T0)) s)" >&2
    rm -rf "$SCRATCH"
    exit "$FAILED"
}
trap finish EXIT

# ---- install -------------------------------------------------------------------------------
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    # shellcheck disable=SC2016  # expanded by the inner bash
    step install 30 "$SCRATCH/install.log" env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        PIP_BREAK_SYSTEM_PACKAGES=1 bash -c '
        set -e
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$0" -m pip install -q --no-index --no-deps .whl/*.whl || echo "wheel install failed; going on"
        fi
        "$0" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    ' "$PY"
fi
if ! timeout 30 "$PY" -c "import swiglu_hf.patches, swiglu_hf.cli" >>"$SCRATCH/install.log" 2>&1; then
    # Not installed (e.g. no setuptools): import from the tree, mapping swiglu_hf.patches to
    # patches/ the way the editable install does.
    mkdir -p "$SCRATCH/shim"
    cat >"$SCRATCH/shim/sitecustomize.py" <<'PYEOF'
import importlib.abc, importlib.util, os, sys

_PATCHES = os.path.join(os.environ["SWIGLU_HF_ROOT"], "patches")


class _PatchesFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "swiglu_hf.patches":
            return None
        init = os.path.join(_PATCHES, "__init__.py")
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[_PATCHES])


sys.meta_path.append(_PatchesFinder())
PYEOF
    export SWIGLU_HF_ROOT="$ROOT"
    export PYTHONPATH="$SCRATCH/shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if timeout 30 "$PY" -c "import swiglu_hf.patches, swiglu_hf.cli" >>"$SCRATCH/install.log" 2>&1; then
        record import-fallback 0 0 0 "package not installed; imported from the tree via PYTHONPATH" "$SCRATCH/install.log"
    else
        record import-fallback 1 0 0 "swiglu_hf cannot be imported" "$SCRATCH/install.log"
        FAILED=1
    fi
fi

# ---- env -----------------------------------------------------------------------------------
env_report() {  # run by `step` in a child bash (exported below): PY comes from the environment
    echo "# gpu_check environment, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname 2>/dev/null || echo unknown-host)"
    echo
    echo "## source"
    echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo "${GIT_COMMIT:-unknown (no .git here)}")"
    git status --short 2>/dev/null | head -40 || true
    echo "tree fingerprint (sha256 of swiglu_hf/ patches/ tests/ scripts/ sources): $(
        find swiglu_hf patches tests scripts -type f \( -name '*.py' -o -name '*.sh' \) 2>/dev/null \
            | LC_ALL=C sort | xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16)"
    echo
    echo "## nvidia-smi"
    timeout 4 nvidia-smi 2>&1 || echo "nvidia-smi failed or is absent"
    echo
    echo "## python"
    "$PY" - <<'PYEOF' 2>&1 || echo "version probe failed"
import importlib.metadata as md, os, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "transformers", "accelerate", "peft", "liger-kernel", "swiglu-hf",
             "pytest", "setuptools", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} absent")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"memory {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import swiglu_hf
print("swiglu_hf from", os.path.dirname(swiglu_hf.__file__))
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
PYEOF
}
export -f env_report
: >"$OUT/env.txt"
step env 10 "$OUT/env.txt" bash -c env_report

# ---- warm-up: compile every kernel specialization the steps below launch ---------------------
# Triton compiles a kernel per specialization on its first launch (a second or more each, ~130 of
# them for the GPU tests alone) and keeps it in its on-disk cache (TRITON_CACHE_DIR, default
# ~/.triton/cache), keyed by: dtype, the constexprs (activation, STORE_H, BLOCK_M x BLOCK_N, which
# follow from the row width N), and per argument whether an integer is 1 or a multiple of 16 and
# whether a pointer is 16-byte aligned (the up half of a packed tensor with odd N is not). Real
# launches on small tensors of each class fill the same cache entries as the big ones, in parallel
# processes; the later steps then load cubins instead of compiling. Cases (keep in sync with
# tests/test_gpu.py and the bench/finetune commands below):
#   tests (a)/(c)  N=781 (odd), M not %16: every activation, bf16/fp16/fp32, split + packed
#   tests (a)      N=1024, M %16: silu, gelu_tanh, bf16/fp16, split + packed
#   tests (d), kernel/mlp benches, finetune: N >= 2048 (one block shape), M %16 and not: bf16 silu
#   tests (e)/(f)  the tiny models' I, M %16 and not (prompt, decode): bf16, llama/gemma/phi3
#   tests (g)      N=781, M not %16: the gate specs of tests/test_gpu.py (SPEC_EAGER), bf16/fp16,
#                  split + packed (interleaved for GPT-OSS)
cat >"$SCRATCH/warmup.py" <<'PYEOF'
import os, subprocess, sys, time

sys.path.insert(0, os.getcwd())  # the checkout (gpu_check.sh runs from its root), as for the steps
DEVICE = os.environ.get("WARMUP_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a dry run
ACTS = ("silu", "gelu", "gelu_tanh", "sigmoid", "relu")


def cases():
    """(dtype, activation, packed, M, N): one per JIT specialization class used later."""
    try:
        from swiglu_hf.tools.models import _COMMON
        tiny_i = _COMMON["intermediate_size"]
    except (ImportError, KeyError):
        tiny_i = 96
    out = [(d, a, p, 17, 781) for d in ("bfloat16", "float16", "float32") for a in ACTS for p in (False, True)]
    out += [(d, a, p, 16, 1024) for d in ("bfloat16", "float16") for a in ("silu", "gelu_tanh") for p in (False, True)]
    out += [("bfloat16", "silu", p, m, 2048) for p in (False, True) for m in (16, 17)]
    out += [("bfloat16", a, p, m, tiny_i) for a, p in (("silu", False), ("gelu_tanh", False), ("silu", True))
            for m in (16, 17)]
    try:  # gate-spec keys: the values are runtime arguments, so one case per spec covers them
        from tests.test_gpu import SPEC_EAGER
        keys = [key for key, _, _ in SPEC_EAGER.values()]
    except Exception:  # noqa: BLE001 - no test file: warm what the tests would launch anyway
        keys = []
    out += [(d, k, p, 17, 781) for d in ("bfloat16", "float16") for k in keys for p in (False, True)]
    return out


def warm(case):
    import torch
    from swiglu_hf import ops

    dtype, act, packed, m, n = case
    dt = getattr(torch, dtype)
    dh = torch.randn(m, n, device=DEVICE, dtype=dt)
    if packed:
        x = torch.randn(m, 2 * n, device=DEVICE, dtype=dt)
        ops.glu_packed_fwd(x, act, "triton")
        ops.glu_packed_bwd(dh, x, act, "triton")
        ops.glu_packed_bwd_with_h(dh, x, act, "triton")
    else:
        g, u = (torch.randn(m, n, device=DEVICE, dtype=dt) for _ in range(2))
        ops.glu_fwd(g, u, act, "triton")
        ops.glu_bwd(dh, g, u, act, "triton")
        ops.glu_bwd_with_h(dh, g, u, act, "triton")
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def worker(shard, of):
    failed = 0
    for i, case in enumerate(cases()):
        if i % of != shard:
            continue
        t0 = time.perf_counter()
        try:
            warm(case)
            print(f"[{shard}] {case}: {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # report and go on: the step fails, the other cases still warm
            failed += 1
            print(f"[{shard}] {case}: FAILED {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


def main(jobs):
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--shard", str(i), str(jobs)]) for i in range(jobs)]
    try:
        rcs = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the step's timeout: stop the workers, keep what they compiled
        for p in procs:
            p.terminate()
        raise
    print(f"warm-up: {len(cases())} cases x 3 kernels (fwd, bwd, bwd with h) in {jobs} processes, "
          f"{time.perf_counter() - t0:.0f} s, worker exit codes {rcs}", flush=True)
    return 1 if any(rcs) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--shard"]:
        sys.exit(worker(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
PYEOF
step warmup 60 "$SCRATCH/warmup.log" "$PY" "$SCRATCH/warmup.py" 12

# ---- GPU tests -----------------------------------------------------------------------------
step tests 100 "$OUT/gpu_tests.log" "$PY" -m pytest -m gpu tests/test_gpu.py \
    -v -p no:cacheprovider --tb=short --durations=15

# ---- kernel bandwidth: 3 intermediate sizes (Llama-3.2-1B, -3-8B, -3-70B) x 2 token counts ----
mkdir -p "$SCRATCH/kernel"
step kernel 70 "$SCRATCH/kernel.log" "${CLI[@]}" bench kernel --tokens 4k,64k \
    --warmup 10 --rep 50 --json "$SCRATCH/kernel/kernel.json" --md "$SCRATCH/kernel/kernel.md"
for f in kernel.json kernel.md; do  # rewritten after each size: a timeout still leaves results
    if [[ -f "$SCRATCH/kernel/$f" ]]; then cp "$SCRATCH/kernel/$f" "$OUT/$f"; fi
done

# ---- one MLP layer fwd+bwd, time and peak memory, Llama-3-8B shape --------------------------
step mlp 50 "$SCRATCH/mlp.log" "${CLI[@]}" bench mlp --hidden 4096 --intermediate 14336 --tokens 8k,32k

# ---- activation bytes saved for backward (exact counts; rows printed as measured) -----------
step memory 20 "$SCRATCH/memory.log" "${CLI[@]}" bench memory --hidden 4096 --intermediate 14336 \
    --budget-gb 20 --layers 32

# ---- host time per patched call on CUDA, and decoding (where the GPU waits on the host) -----------
step overhead 25 "$SCRATCH/overhead.log" "${CLI[@]}" bench overhead --device cuda --batches 7 --batch-ms 10 \
    --decode-tokens 32
# ---- verify at the Llama-3.1-8B shape: one copy of the weights, its peak GPU memory ------------
cat >"$SCRATCH/verify8b.py" <<'PYEOF'
import os, sys, time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swiglu_hf import verify

DEVICE = os.environ.get("VERIFY8B_DEVICE", "cuda")  # "cpu" with VERIFY8B_LAYERS=1 VERIFY8B_VOCAB=1024: a dry run
shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=int(os.environ.get("VERIFY8B_LAYERS", 32)),
             num_attention_heads=32, num_key_value_heads=8, vocab_size=int(os.environ.get("VERIFY8B_VOCAB", 128256)),
             max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
t = time.perf_counter()
with torch.device(DEVICE):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), dtype=torch.bfloat16).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"random Llama-3.1-8B shape {shape}: {weights / 2**30:.2f} GiB of bf16 weights, built in {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
report = verify(model, device=DEVICE, label="random Llama-3.1-8B shape")
print(report.table())
mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
print(f"verify: {time.perf_counter() - t:.1f} s; peak {report.peak_bytes / 2**30:.2f} GiB = {report.peak_bytes / weights:.2f}x "
      f"the weights (goal: <= weights + grads (2x) + one MLP in float64 ({8 * mlp / 2**30:.2f} GiB) + the batch)")
sys.exit(0 if report.ok else 1)
PYEOF
step verify8b 60 "$SCRATCH/verify8b.log" "$PY" "$SCRATCH/verify8b.py"

# ---- swiglu-hf plan vs this GPU: predicted peak / max_memory_allocated, Llama-3.2-1B shape ----------
# One steady-state training step per variant (the 2nd; peak counters reset after the 1st), bf16 weights,
# batch 1: LoRA + gradient checkpointing at 4096 tokens, then full fine-tuning at 1024. The prediction
# is `swiglu-hf plan --model llama-3.2-1b ... --no-search` (meta device); the ratio measured/predicted
# goes into memory.md (4th part). Dry run on CPU: PLANCHECK_DEVICE=cpu PLANCHECK_MODEL=tiny-llama (compares
# with the main job's CPU tracker).
cat >"$SCRATCH/plancheck.py" <<'PYEOF'
import gc, os, time

import torch

from swiglu_hf.tools.finetune.config import FinetuneConfig
from swiglu_hf.tools.finetune.memory import PeakMemory
from swiglu_hf.tools.finetune.model import apply_variant, prepare_base
from swiglu_hf.tools.plan.search import PlanConfig, load_config, run_plan
from transformers import AutoModelForCausalLM

DEVICE = torch.device(os.environ.get("PLANCHECK_DEVICE", "cuda"))
MODEL = os.environ.get("PLANCHECK_MODEL", "llama-3.2-1b")
cuda = DEVICE.type == "cuda"
print(f"| setting | variant | predicted GiB | measured GiB | measured / predicted | peak is (predicted) |")
print(f"|---|---|---:|---:|---:|---|")
for lora, seq in ((True, 4096), (False, 1024)):
    setting = dict(lora=lora, gradient_checkpointing=lora)
    plan = run_plan(PlanConfig(model=MODEL, dtype="bf16", batch_size=1, seq_len=seq, steps=2, search=False,
                               target="cuda" if cuda else "cpu", **setting))
    for variant, row in plan["variants"].items():
        t = time.perf_counter()
        with torch.device(DEVICE):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(load_config(MODEL)[0], dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        model = apply_variant(variant, prepare_base(model, FinetuneConfig(**setting)).to(DEVICE), DEVICE)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device=DEVICE)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the first step makes AdamW's state; the prediction is for the steady state
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
        else:
            with PeakMemory(DEVICE, model, opt) as tracker:
                step()
            measured = tracker.result()["peak_memory_bytes"]
        name = ("LoRA+GC" if lora else "full") + f" T={seq}"
        print(f"| {name} | {variant} | {row['peak_bytes'] / 2**30:.3f} | {measured / 2**30:.3f} | "
              f"{measured / row['peak_bytes']:.4f} | {row['peak_is']} ({time.perf_counter() - t:.0f} s) |", flush=True)
        del model, opt, ids
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
PYEOF
step plancheck 40 "$SCRATCH/plancheck.log" "$PY" "$SCRATCH/plancheck.py"

{
    echo "# Memory"
    for part in "memory:Saved for backward per token per MLP layer (swiglu-hf bench memory)" \
        "mlp:One MLP layer fwd+bwd, time and peak memory (swiglu-hf bench mlp)" \
        "verify8b:verify on a random Llama-3.1-8B-shaped model, bf16 (swiglu_hf.verify)" \
        "plancheck:swiglu-hf plan's predicted peak vs max_memory_allocated, Llama-3.2-1B shape, bf16" \
        "overhead:Host time per MLP call and greedy decode, CUDA (swiglu-hf bench overhead --device cuda)"; do
        echo
        echo "## ${part#*:}"
        echo
        if [[ -f "$SCRATCH/${part%%:*}.log" ]]; then cat "$SCRATCH/${part%%:*}.log"; else echo "(not run)"; fi
    done
} >"$OUT/memory.md"

# ---- fine-tuning comparison: all the time that is left --------------------------------------
step finetune "$BUDGET" "$SCRATCH/finetune.log" "${CLI[@]}" finetune --preset llama-3.2-1b \
    --variants stock,patched,tiled,liger,compile --seq-len 2048 --steps 8 --warmup-steps 2 \
    --out "$SCRATCH/finetune"
mkdir -p "$OUT/finetune"
for ext in md json; do  # rewritten after each variant: a timeout keeps the variants it finished
    if [[ -f "$SCRATCH/finetune/results.$ext" ]]; then cp "$SCRATCH/finetune/results.$ext" "$OUT/finetune/"; fi
done
if [[ ! -f "$OUT/finetune/results.md" && -f "$SCRATCH/finetune.log" ]]; then  # no results: keep its log
    tail -200 "$SCRATCH/finetune.log" >"$OUT/finetune/results.md"
fi
# Plots and other outputs: zipped into one file, only if the 8-file limit leaves room.
n_out=$(find "$OUT" -type f | wc -l)  # summary.md comes later: room for a zip if n_out <= 6
if [[ -d "$SCRATCH/finetune" ]] && ((n_out <= 6)); then
    (cd "$SCRATCH/finetune" && find . -type f ! -name 'results.md' ! -name 'results.json' | LC_ALL=C sort \
        >"$SCRATCH/extras.txt")
    if [[ -s "$SCRATCH/extras.txt" ]]; then
        (cd "$SCRATCH/finetune" && "$PY" -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for line in open(sys.argv[2]):
        z.write(line.strip())' "$OUT/finetune/extras.zip" "$SCRATCH/extras.txt") || true
    fi
fi
