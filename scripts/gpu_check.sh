#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR: the prepared GPU run (one H200, no network), under 8 minutes.
#
# Steps, each under its own `timeout`, all under one deadline (GPU_CHECK_BUDGET_S, default 450 s,
# of which the last 15 s are kept for the summary):
#   install   wheels found in ./.whl (e.g. liger-kernel), then this project: editable, no deps,
#             no build isolation, no index (nothing is downloaded)
#   env       nvidia-smi, versions, git commit / tree fingerprint       -> OUTDIR/env.txt
#   tests     TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py       -> OUTDIR/gpu_tests.log
#   kernel    swiglu-hf bench kernel                                   -> OUTDIR/kernel.json, kernel.md
#   memory    swiglu-hf bench memory, if that subcommand exists        -> OUTDIR/memory.md
#   mlp       swiglu-hf bench mlp (time + peak memory, T=8k/32k)       -> appended to OUTDIR/memory.md
#   finetune  swiglu-hf finetune, if that subcommand exists            -> OUTDIR/finetune/results.{md,json}
#   summary   every step's exit status and duration, key numbers       -> OUTDIR/summary.md
# A failing step does not stop the later ones. Only the 8 files above are written to OUTDIR (the
# device tool returns at most 8 files, at most 2 folders deep); other logs stay in a scratch
# folder and the tail of a failed step's log is quoted in summary.md. Extra finetune files
# (plots) are zipped into OUTDIR/finetune/extras.zip only when fewer than 8 files came out.
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
# Without it the liger columns say "not importable" and the finetune run drops its liger variant.
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
RESERVE=15
T0=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEPS="$SCRATCH/steps.tsv"  # name, rc, seconds, limit, note, log
: >"$STEPS"
CLI=("$PY" -m swiglu_hf.cli)
# tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU suite: every step here needs the
# compiled kernels. Unbuffered output, so a step killed at its limit still leaves its log.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
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
    # SIGINT first, so pytest and the benchmarks stop cleanly and print what they have.
    if timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1; then rc=0; else rc=$?; fi
    secs=$(($(date +%s) - start))
    if ((rc == 124 || rc == 137)); then note="timed out after ${limit}s"; fi
    if ((rc != 0)); then FAILED=1; fi
    record "$name" "$rc" "$secs" "$limit" "$note" "$log"
    echo "[gpu_check] $name: exit $rc after ${secs}s" >&2
}

has_subcommand() {  # has_subcommand WORDS...: `swiglu-hf WORDS --help` exits 0
    "${CLI[@]}" "$@" --help >"$SCRATCH/help.txt" 2>&1
}

write_summary() {
    "$PY" - "$OUT" "$STEPS" "$BUDGET" "$(($(date +%s) - T0))" <<'PYEOF' || {
import json, os, re, sys

out, steps_path, budget, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
lines = ["# GPU check summary", "", f"Total {elapsed} s of a {budget} s budget.", "",
         "| step | exit | seconds | limit s | note |", "|---|---:|---:|---:|---|"]
steps = [l.rstrip("\n").split("\t") for l in open(steps_path) if l.strip()]
for name, rc, secs, limit, note, _ in steps:
    lines.append(f"| {name} | {rc} | {secs} | {limit} | {note} |")

log = os.path.join(out, "gpu_tests.log")
if os.path.exists(log):
    text = open(log, errors="replace").read().splitlines()
    final = [l for l in text if re.match(r"^=+ .*\b(passed|failed|skipped|error|errors|no tests ran)\b.* =+$", l)]
    failed = [l for l in text if l.startswith(("FAILED ", "ERROR "))]
    lines += ["", "## GPU tests", "", f"`{final[-1].strip('= ')}`" if final else "no pytest summary line"]
    lines += [f"- {l}" for l in failed[:40]]

kj = os.path.join(out, "kernel.json")
if os.path.exists(kj):
    k = json.load(open(kj))
    copy = k.get("copy_gbps") or 0
    impls = list(dict.fromkeys(r["impl"] for r in k["rows"]))
    lines += ["", "## Kernel bandwidth (GB/s, % of copy)", "",
              f"{k.get('device')}, {k.get('dtype')}, torch {k.get('torch')}, triton {k.get('triton')}, "
              f"liger-kernel {k.get('liger') or 'absent'}; device copy {copy:.0f} GB/s.", ""]
    for d in ("fwd", "bwd"):
        lines += [f"{'Forward' if d == 'fwd' else 'Backward'}:", "",
                  "| I | T | " + " | ".join(impls) + " |", "|---:|---:|" + "---:|" * len(impls)]
        sizes = list(dict.fromkeys((r["intermediate"], r["tokens"]) for r in k["rows"]))
        for I, T in sizes:
            cells = []
            for impl in impls:
                r = next((r for r in k["rows"] if (r["intermediate"], r["tokens"], r["impl"]) == (I, T, impl)), None)
                g = r and r.get(f"{d}_gbps")
                cells.append(f"{g:.0f} ({100 * g / copy:.0f}%)" if g and copy else "-")
            lines.append(f"| {I} | {T} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = sorted({f"{r['impl']}: {r['note']}" for r in k["rows"] if r.get("note")})
    lines += [f"- {n}" for n in notes[:10]]

for name, path in (("Memory", "memory.md"), ("Fine-tuning", os.path.join("finetune", "results.md"))):
    p = os.path.join(out, path)
    if os.path.exists(p):
        body = open(p, errors="replace").read().splitlines()
        lines += ["", f"## {name} ({path}, first lines)", ""] + body[:80]

for name, rc, secs, limit, note, logpath in steps:
    if rc not in ("0", "skip") and logpath and os.path.exists(logpath):
        tail = open(logpath, errors="replace").read().splitlines()[-30:]
        lines += ["", f"## {name}: last lines of its log", "", "```"] + tail + ["```"]

files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
lines += ["", "## Files", ""] + [f"- {f}" for f in files + (["summary.md"] if "summary.md" not in files else [])]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
PYEOF
        {   # the interpreter itself is broken: a plain summary from bash
            echo "# GPU check summary (python could not write it)"
            echo
            echo "| step | exit | seconds | limit s | note |"
            echo "|---|---:|---:|---:|---|"
            while IFS=$'\t' read -r n rc s l note _; do echo "| $n | $rc | $s | $l | $note |"; done <"$STEPS"
        } >"$OUT/summary.md"
    }
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
    step install 90 "$SCRATCH/install.log" env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        PIP_BREAK_SYSTEM_PACKAGES=1 bash -c '
        set -e
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$0" -m pip install -q --no-index --no-deps .whl/*.whl || echo "wheel install failed; going on"
        fi
        "$0" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    ' "$PY"
fi
if ! "$PY" -c "import swiglu_hf.patches, swiglu_hf.cli" >>"$SCRATCH/install.log" 2>&1; then
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
    if "$PY" -c "import swiglu_hf.patches, swiglu_hf.cli" >>"$SCRATCH/install.log" 2>&1; then
        record import-fallback 0 0 0 "package not installed; imported from the tree via PYTHONPATH" "$SCRATCH/install.log"
    else
        record import-fallback 1 0 0 "swiglu_hf cannot be imported" "$SCRATCH/install.log"
        FAILED=1
    fi
fi

# ---- env -----------------------------------------------------------------------------------
{
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
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi failed or is absent"
    echo
    echo "## python"
    timeout 60 "$PY" - <<'PYEOF' 2>&1 || echo "version probe failed"
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
} >"$OUT/env.txt" 2>&1
record env 0 0 0 "" ""

# ---- GPU tests -----------------------------------------------------------------------------
step tests 180 "$OUT/gpu_tests.log" "$PY" -m pytest -m gpu tests/test_gpu.py \
    -v -p no:cacheprovider --tb=short --durations=15

# ---- kernel bandwidth ----------------------------------------------------------------------
mkdir -p "$SCRATCH/kernel"
step kernel 130 "$SCRATCH/kernel.log" "${CLI[@]}" bench kernel \
    --warmup 10 --rep 50 --json "$SCRATCH/kernel/kernel.json" --md "$SCRATCH/kernel/kernel.md"
for f in kernel.json kernel.md; do  # rewritten after each size: a timeout still leaves results
    if [[ -f "$SCRATCH/kernel/$f" ]]; then cp "$SCRATCH/kernel/$f" "$OUT/$f"; fi
done

# ---- activation memory (written by another module; run only if it exists) -----------------
if has_subcommand bench memory; then
    args=()
    if grep -q -- '--hidden' "$SCRATCH/help.txt"; then args+=(--hidden 4096); fi
    if grep -q -- '--intermediate' "$SCRATCH/help.txt"; then args+=(--intermediate 14336); fi
    if grep -q -- '--budget-gb' "$SCRATCH/help.txt"; then args+=(--budget-gb 20 --layers 32); fi
    md_flag=0
    if grep -q -- '--md' "$SCRATCH/help.txt"; then args+=(--md "$SCRATCH/memory.md"); md_flag=1; fi
    step memory 60 "$SCRATCH/memory.log" "${CLI[@]}" bench memory "${args[@]}"
    if ((md_flag)) && [[ -f "$SCRATCH/memory.md" ]]; then
        cp "$SCRATCH/memory.md" "$OUT/memory.md"
    elif [[ -f "$SCRATCH/memory.log" ]]; then
        cp "$SCRATCH/memory.log" "$OUT/memory.md"
    fi
else
    record memory skip 0 0 "not run: no 'swiglu-hf bench memory' in this tree" ""
fi

# ---- one MLP layer fwd+bwd, time and peak memory, Llama-3-8B shape (appended to memory.md) ---
if has_subcommand bench mlp; then
    step mlp 75 "$SCRATCH/mlp.log" "${CLI[@]}" bench mlp --hidden 4096 --intermediate 14336 --tokens 8k,32k
    if [[ -f "$SCRATCH/mlp.log" ]]; then
        { echo; echo "## One MLP layer, fwd+bwd (swiglu-hf bench mlp)"; echo; cat "$SCRATCH/mlp.log"; } >>"$OUT/memory.md"
    fi
else
    record mlp skip 0 0 "not run: no 'swiglu-hf bench mlp' in this tree" ""
fi

# ---- fine-tuning comparison (written by another module; run only if it exists) -------------
if has_subcommand finetune; then
    variants=stock,patched,tiled,liger,compile
    if ! timeout 60 "$PY" -c "import liger_kernel.ops.swiglu" >/dev/null 2>&1; then
        variants=stock,patched,tiled,compile
        echo "liger-kernel not importable: variant liger dropped" >>"$SCRATCH/finetune.log"
    fi
    step finetune 240 "$SCRATCH/finetune.log" "${CLI[@]}" finetune \
        --preset llama-3.2-1b --variants "$variants" --seq-len 2048 --steps 12 --out "$SCRATCH/finetune"
    mkdir -p "$OUT/finetune"
    for ext in md json; do
        src="$SCRATCH/finetune/results.$ext"
        if [[ ! -f $src ]]; then  # another name: take the first file of that kind
            src=$(find "$SCRATCH/finetune" -maxdepth 2 -type f -name "*.$ext" 2>/dev/null | LC_ALL=C sort | head -1 || true)
        fi
        if [[ -n $src && -f $src ]]; then cp "$src" "$OUT/finetune/results.$ext"; fi
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
else
    record finetune skip 0 0 "not run: no 'swiglu-hf finetune' in this tree" ""
fi
