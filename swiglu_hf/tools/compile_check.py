"""`swiglu-hf compile`: compile the gated-MLP kernels ahead of time for GPU targets and inspect them.

Every specialization the launchers in `swiglu_hf.kernels` (`glu_fwd`, `glu_bwd`) can request is
compiled with `triton.compile` for a `GPUTarget` (no GPU needed: Triton's LLVM and the ptxas that
ships in the triton wheel run on any x86 machine), and the PTX/cubin is checked:

* a cubin comes out (the kernels compile at all: plain-float globals, for instance, only fail here);
* no local memory: `LOCAL:0 STACK:0` in `cuobjdump -res-usage` and no `.local` in the PTX
  (`n_spills` in Triton's metadata is only filled in when a GPU driver loads the binary);
* 128-bit global loads and stores on aligned inputs (`ld.global.v4.b32` / `st.global.v4.b32`:
  Triton moves 16 bytes as four 32-bit words for fp32 and for packed fp16/bf16 alike);
* the accurate path: IEEE `div.rn.f32` for silu/sigmoid, libdevice `expf` (its range reduction
  rounds x*log2(e) toward -inf with `fma.rm.f32`), never tl.exp's `mul` + `ex2.approx.f32`, nor
  `div.full.f32` / `div.approx` / `tanh.approx`;
* denormals kept: the only `.ftz` instructions are `ex2.approx.ftz.f32` / `rcp.approx.ftz.f32`,
  which libdevice's non-flushing code uses itself on range-reduced arguments (see LAUNCH_OPTIONS in
  kernels.py: Triton's default enable_reflect_ftz=True would put `.ftz` on libdevice's arithmetic);
* the compile options are the launchers' (`kernels.LAUNCH_OPTIONS`: enable_fp_fusion=True,
  enable_reflect_ftz=False, num_warps=4) and took effect.

It prints one row per specialization (kernel, arch, dtype, activation, BLOCK_MxBLOCK_N, registers,
spill bytes, global load/store vector width in bits, instructions per element) and a summary.
Instructions per element: static SASS instructions, NOPs excluded, counted in the cubin's code
section (16-byte instructions from Volta on; the same count as `cuobjdump -sass`, whose
disassembly costs more than the compilation; PTX instructions if that fails, and the table says
which), divided by the elements a thread handles (BLOCK_M*BLOCK_N / (32*num_warps) = 16). The
kernels have no loops, so that is the per-element work, except that rarely-taken slow paths
(div.rn's subnormal/special-value branch) are counted too.

Gate specs. `activation` may also be a gate-spec key (swiglu_hf.gate_spec: clamps, alpha, up + 1, a
multiplier, interleaved), compiled as the launchers pass it: absent fields as constexpr None,
present ones as fp32 arguments (one specialization for every value), UP_PLUS_ONE and the column
stride COL as constexprs. SPEC_GATES lists the ones the models in docs/SUPPORTED_MODELS.md use
(`--activation spec` selects them). An interleaved spec (COL = 2) loads a contiguous
(BLOCK_M, 2 BLOCK_N) tile of the packed row and splits it into the even (gate) and odd (up)
columns in registers (and joins dgate/dup the same way for one store), so its accesses are
128-bit too; the up/dup pointer (one element after gate/dgate, never 16-byte aligned) is passed
but unused.

Specializations. The launchers pick BLOCK_N = min(next_pow2(N), 2048), BLOCK_M = 2048 // BLOCK_N;
the grid covers the rest. The table defaults to BLOCK_N in 16..2048: smaller ones only arise for
N < 16, which is never a multiple of 16 and so never gets the aligned (vectorized) specialization.
Besides dtype, activation, kernel (forward, backward, backward that also stores h) and block shape,
the JIT specializes on its arguments: pointers 16-byte aligned or not, N / M / strides multiples of
16 or not, an integer argument equal to 1 (M == 1: decoding one token) becoming a constant, and
i64 instead of i32 above 2**31. Rows here use the arguments the JIT sees for aligned tensors with
M = 4096 (`aligned`), or nothing aligned at all (`aligned=False`: N and strides odd, pointers at a
4-byte offset), or M = 1; `--rows` picks M.

Cache. `triton.compile` always writes its result into Triton's on-disk cache (TRITON_CACHE_DIR,
default ~/.triton/cache), under a key of the kernel source (and the source of every function and
constexpr global it uses), signature, divisibility attributes, constexprs, compile options, target,
the triton version, ptxas version and the cache-invalidating environment variables (e.g.
TRITON_DEFAULT_FP_FUSION). The JIT launch path calls the same `triton.compile` with the same key,
and this module builds signature, attributes and options exactly as `JITFunction.run` does (the
tests check the hash against a JIT warmup). So running it on a login node does warm the cache of
the GPU jobs, but only for: the same cache directory (shared filesystem), the same triton/ptxas,
the same environment variables, the GPU's exact arch (an H100 is sm_90, an A100 sm_80, a B200
sm_100), and the argument specializations compiled here (aligned tensors with M % 16 == 0 by
default; `--rows 1,4096,4097` adds M == 1 and M % 16 != 0). Anything else compiles on first launch
as before. Only the on-disk cache is warmed: each process still loads the cubin on first use.

Under TRITON_INTERPRET=1 (the CPU test setup) `@triton.jit` yields interpreter objects that cannot
be compiled, so the compilation then runs in subprocesses with TRITON_INTERPRET removed; it also
runs in subprocesses to use several cores (--jobs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

# the kernels' activations (swiglu_hf.activations' table: kernels.ACT_IDS without importing triton)
from swiglu_hf.activations import ACTIVATIONS, SPEC_ONLY as SPEC_ACTIVATIONS

DTYPES = ("fp32", "fp16", "bf16")
KERNELS = ("fwd", "bwd", "bwd_h")  # glu_fwd; glu_bwd without h (STORE_H=False); glu_bwd with h
BLOCK_NS = (16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_ARCHS = ("sm_80", "sm_90")
TILE = 2048  # kernels._blocks() outside the interpreter
# Gate specs as the models' modules give them (swiglu_hf.gate_spec keys; the values are runtime fp32
# arguments, so these stand for every limit / alpha / multiplier)
SPEC_GATES = (
    "silu_alpha|alpha=1.702|gate_max=7.0|up_limit=7.0|up_plus_one=True|interleaved=True",  # GPT-OSS experts
    "silu_alpha|alpha=1.702|gate_max=7.0|up_limit=7.0|up_plus_one=True",  # MiniMax-M3 (halves)
    "silu|gate_max=10.0|up_limit=10.0",  # DeepSeek-V4
    "silu|gate_mul=0.88",  # Falcon-H1
    "relu2",  # BitNet
)
EXP_ACTS = {"silu", "sigmoid", "silu_alpha"}  # activations whose forward calls exp (gelu's backward does too)
DIV_ACTS = {"silu", "sigmoid", "silu_alpha"}  # activations whose forward divides (tl.div_rn)
# .ftz instructions that libdevice's non-FTZ branch uses itself (on range-reduced arguments)
ALLOWED_FTZ = frozenset({"ex2.approx.ftz.f32", "rcp.approx.ftz.f32"})

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
                  "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Spec:
    """One compiled specialization: what a launch with such arguments would compile."""

    kernel: str  # "fwd" | "bwd" | "bwd_h"
    arch: int  # 80, 90, 100, ...
    dtype: str  # "fp32" | "fp16" | "bf16"
    activation: str  # a plain activation or a gate-spec key (SPEC_GATES)
    block_n: int
    aligned: bool = True
    m: int = 4096  # rows (M); only its JIT specialization matters: == 1, % 16 == 0, or neither
    accurate: bool = True  # ACCURATE constexpr; the launchers pass True whenever they compile
    options: tuple = field(default_factory=tuple)  # (key, value) overrides of LAUNCH_OPTIONS

    @property
    def block_m(self) -> int:
        return max(1, TILE // self.block_n)


def parse_arch(text: str) -> int:
    m = re.fullmatch(r"(?:sm_?|cuda:)?(\d+)a?", text.strip())
    if not m:
        raise ValueError(f"bad arch {text!r}: expected e.g. sm_90")
    return int(m.group(1))


def specializations(archs, dtypes=DTYPES, activations=ACTIVATIONS, kernels=KERNELS, block_ns=BLOCK_NS,
                    rows=(4096,), aligned=(True,)) -> list[Spec]:
    """The cross product, in a stable order (BLOCK_N < 16 is always unaligned: N < 16)."""
    specs = (Spec(k, parse_arch(a) if isinstance(a, str) else int(a), d, act, bn, al and bn >= 16, m)
             for a in archs for d in dtypes for act in activations for k in kernels for bn in block_ns
             for al in aligned for m in rows)
    return list(dict.fromkeys(specs))


def compile_table(archs=DEFAULT_ARCHS, dtypes=DTYPES, activations=ACTIVATIONS, kernels=KERNELS,
                  block_ns=BLOCK_NS, *, rows=(4096,), specs=None, jobs=None,
                  verify_jit_key=False, disassemble=False) -> list[dict]:
    """Compile and inspect every specialization (or `specs`); one dict per spec, in order.

    A spec that fails to compile gets a row with `error` set rather than raising; `problems(row)`
    lists what a row violates. `jobs` subprocesses share the work (default: the CPU count).
    verify_jit_key adds `jit_hash`, the hash a JIT launch computes (equal to `hash` when the cache
    entry written here is the one the JIT looks up); disassemble adds `listing_instructions`, the
    instruction count from `cuobjdump -sass` (slow), to cross-check `instructions`.
    """
    if specs is None:
        specs = specializations(archs, dtypes, activations, kernels, block_ns, rows)
    specs = list(specs)
    if not specs:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    if jobs == 1 and _can_compile_here():
        return _compile_specs(specs, verify_jit_key, disassemble)
    shards = [specs[i::jobs] for i in range(jobs)]  # interleaved: heavy and light kernels mixed
    results = _run_shards(shards, verify_jit_key, disassemble)
    out = [None] * len(specs)
    for i, shard_rows in enumerate(results):
        out[i::jobs] = shard_rows
    return out


# ---- checks -----------------------------------------------------------------------------------

def problems(row: dict) -> list[str]:
    """What is wrong with one compiled specialization (empty: nothing)."""
    if row.get("error"):
        return [f"compile failed: {row['error']}"]
    out = []
    if not row["cubin_bytes"]:
        out.append("no cubin")
    if row["local_bytes"] or row["stack_bytes"] or row["ptx_local"]:
        out.append(f"local memory: LOCAL {row['local_bytes']} B, STACK {row['stack_bytes']} B, "
                   f"{row['ptx_local']} .local uses in PTX")
    if row["aligned"] and min(row["ld_bits"], row["st_bits"]) < 128:
        out.append(f"global accesses narrower than 128 bits: loads {row['ld_bits']}, stores {row['st_bits']}")
    if row["accurate"]:
        out += accuracy_problems(row)
    bad_ftz = sorted(set(row["ftz_ops"]) - ALLOWED_FTZ)
    if bad_ftz:
        out.append(f"flush-to-zero instructions: {', '.join(bad_ftz)}")
    for key, want in row["requested_options"].items():
        if key in row["compiled_options"] and row["compiled_options"][key] != want:
            out.append(f"option {key}={want} requested, compiled with {row['compiled_options'][key]}")
    return out


def accuracy_problems(row: dict) -> list[str]:
    """Why a row is not the accurate (ACCURATE=True, eager-CUDA-equivalent) math, if it is not."""
    out = []
    if row["fast_exp"]:
        out.append(f"{row['fast_exp']} ex2.approx.f32 (tl.exp's fast path)")
    if row["fast_div"]:
        out.append(f"{row['fast_div']} approximate divisions (div.full/div.approx)")
    if row["fast_tanh"]:
        out.append("tanh.approx")
    act = base_activation(row["activation"])
    if act in DIV_ACTS and not row["div_rn"]:
        out.append("no div.rn.f32 (IEEE division) for silu/sigmoid/silu_alpha")
    uses_exp = act in EXP_ACTS or (act == "gelu" and row["kernel"] != "fwd")
    if uses_exp and not row["libdevice_expf"]:
        out.append("no libdevice expf (fma.rm.f32 range reduction) where exp is computed")
    return out


def base_activation(key: str) -> str:
    """The activation of a plain name or gate-spec key."""
    return key.split("|", 1)[0]


def interleaved(key: str) -> bool:
    return "interleaved=True" in key.split("|")


def check_activation(key: str) -> str:
    """A plain activation or a gate-spec key the kernels implement (ValueError otherwise)."""
    if key in ACTIVATIONS:
        return key
    from swiglu_hf import gate_spec as gate

    try:
        spec = gate.parse(key)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad gate key {key!r}: {e}") from None
    if spec.activation not in ACTIVATIONS + SPEC_ACTIVATIONS:
        raise ValueError(f"unknown activation in {key!r}; known: {', '.join(ACTIVATIONS + SPEC_ACTIVATIONS)}")
    return spec.key()


# ---- printing / CLI ---------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    src = {r.get("instr_source") for r in rows if not r.get("error")}
    unit = "SASS" if src == {"sass"} else "PTX" if src == {"ptx"} else "SASS/PTX"
    w = max([10] + [len(r["activation"]) for r in rows])
    head = (f"{'kernel':<6} {'arch':<6} {'dtype':<5} {'activation':<{w}} {'BMxBN':>7} {'align':<5} {'M':>5} "
            f"{'regs':>4} {'spill':>5} {'ld':>4} {'st':>4} {'instr/el':>8}  problems")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['block_m']}x{r['block_n']}"
        left = (f"{r['kernel']:<6} sm_{r['arch']:<3} {r['dtype']:<5} {r['activation']:<{w}} {shape:>7} "
                f"{'yes' if r['aligned'] else 'no':<5} {r['m']:>5} ")
        if r.get("error"):
            lines.append(left + f"ERROR: {r['error']}")
            continue
        p = problems(r)
        lines.append(left + f"{_fmt(r['regs']):>4} {r['local_bytes'] + r['stack_bytes']:>5} {r['ld_bits']:>4} "
                     f"{r['st_bits']:>4} {r['instr_per_elem']:>8.1f}  {'; '.join(p) if p else 'ok'}")
    lines.append(f"(ld/st: narrowest global load/store in bits; instr/el: static {unit} instructions per "
                 f"element, NOPs excluded)")
    lines.append(summary(rows))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if not r.get("error")]
    per_arch = {}
    for r in rows:
        per_arch[r["arch"]] = per_arch.get(r["arch"], 0) + 1
    regs = [r["regs"] for r in ok if r["regs"] is not None]
    aligned = [r for r in ok if r["aligned"]]
    ipe = [r["instr_per_elem"] for r in ok]
    bad = sum(1 for r in rows if problems(r))
    min_width = min((min(r["ld_bits"], r["st_bits"]) for r in aligned), default="-")
    return (f"summary: {len(rows)} specializations ("
            + ", ".join(f"sm_{a}: {n}" for a, n in sorted(per_arch.items()))
            + f"), {len(rows) - len(ok)} failed, max registers {max(regs) if regs else '?'}, "
            f"spills {sum(r['local_bytes'] + r['stack_bytes'] for r in ok)} B total, "
            f"min vector width on aligned inputs {min_width} bits, "
            f"instructions/element {min(ipe, default=0):.1f}..{max(ipe, default=0):.1f}, "
            f"{bad} with problems")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile the kernels ahead of time for GPU archs and check registers/spills/vectorization",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="comma-separated, e.g. sm_80,sm_90,sm_100")
    p.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated: fp32,fp16,bf16")
    p.add_argument("--activation", default=",".join(ACTIVATIONS),
                   help="comma-separated activations or gate-spec keys (quote the '|'); 'spec' adds SPEC_GATES")
    p.add_argument("--block-n", default=",".join(map(str, BLOCK_NS)),
                   help="comma-separated BLOCK_N values (BLOCK_M = 2048 // BLOCK_N)")
    p.add_argument("--rows", default="4096", help="comma-separated M values to specialize for (1: decode)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_main)


def _main(args) -> int:
    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    try:
        archs = [parse_arch(a) for a in split(args.arch)]
        bad = [d for d in split(args.dtype) if d.lower() not in _DTYPE_ALIASES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; known: {', '.join(DTYPES)}")
        dtypes = [_DTYPE_ALIASES[d.lower()] for d in split(args.dtype)]
        acts = [a for t in split(args.activation) for a in (SPEC_GATES if t == "spec" else (t,))]
        acts = [check_activation(a) for a in acts]
        block_ns = [int(b) for b in split(args.block_n)]
        if any(b < 1 or b > TILE or b & (b - 1) for b in block_ns):
            raise ValueError(f"BLOCK_N must be powers of two in 1..{TILE}")
        rows_m = [int(m) for m in split(args.rows)]
    except ValueError as e:
        print(f"swiglu-hf compile: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = compile_table(archs, dtypes, acts, KERNELS, block_ns, rows=rows_m, jobs=args.jobs)
    print(format_table(rows))
    from triton import knobs

    print(f"compiled in {time.perf_counter() - t0:.0f} s; results cached in {knobs.cache.dir} "
          "(used by JIT launches with the same arguments' specialization, arch, triton and environment)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(problems(r) for r in rows) else 0


def _fmt(v):
    return "?" if v is None else v


# ---- compilation (needs triton; runs where @triton.jit gives JITFunctions) --------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def _can_compile_here() -> bool:
    if _interpreting():
        return False
    mod = sys.modules.get("swiglu_hf.kernels")
    if mod is None:
        return True
    from triton.runtime.jit import JITFunction

    return isinstance(mod._glu_fwd_kernel, JITFunction)  # imported under the interpreter otherwise


def _run_shards(shards, verify_jit_key, disassemble) -> list[list[dict]]:
    """Compile each shard in a fresh interpreter without TRITON_INTERPRET; all shards in parallel."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)  # this checkout's kernels
    tmp = tempfile.mkdtemp(prefix="swiglu_compile_")
    try:
        procs = []
        for i, shard in enumerate(shards):
            src, dst = os.path.join(tmp, f"in{i}.json"), os.path.join(tmp, f"out{i}.json")
            with open(src, "w") as f:
                json.dump({"specs": [asdict(s) for s in shard], "verify_jit_key": verify_jit_key,
                           "disassemble": disassemble}, f)
            code = "import sys; from swiglu_hf.tools.compile_check import _worker; _worker(sys.argv[1], sys.argv[2])"
            procs.append((subprocess.Popen([sys.executable, "-c", code, src, dst], env=env, cwd=root,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), dst))
        out = []
        for proc, dst in procs:
            log, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n{log[-4000:]}")
            with open(dst) as f:
                out.append(json.load(f))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _worker(src: str, dst: str) -> None:
    with open(src) as f:
        job = json.load(f)
    specs = [Spec(**{**s, "options": tuple(tuple(kv) for kv in s["options"])}) for s in job["specs"]]
    rows = _compile_specs(specs, job["verify_jit_key"], job["disassemble"])
    with open(dst, "w") as f:
        json.dump(rows, f)


class _Ptr:
    """What the JIT looks at in a tensor argument: its dtype and address."""

    def __init__(self, dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def _launch_args(spec: Spec):
    """(kernel fn, positional args, constexpr kwargs) as glu_fwd / glu_bwd would pass them."""
    import torch

    from swiglu_hf import kernels

    dtype = getattr(torch, _TORCH_DTYPES[spec.dtype])
    base = (1 << 20) if spec.aligned else (1 << 20) + 4
    ptr = _Ptr(dtype, base)
    # N in (block_n / 2, block_n] so that _blocks(N) gives block_n: a multiple of 16 when aligned,
    # odd when not (2 for block_n 2; N == 1 becomes a constexpr, as in the JIT)
    n = spec.block_n - 1 if not spec.aligned and spec.block_n >= 4 else spec.block_n
    if spec.aligned and (n % 16 or spec.block_n < 16):
        raise ValueError(f"BLOCK_N={spec.block_n} only arises for N < 16, never 16-aligned: use aligned=False")
    stride = 2 * n if spec.aligned else n  # packed gate_up rows when aligned; odd otherwise
    if spec.activation in ACTIVATIONS:
        gate_args = kernels.spec_args(spec.activation)
    else:
        from swiglu_hf import gate_spec as gate

        gate_args = kernels.spec_args(gate.parse(spec.activation))
    col = 2 if interleaved(spec.activation) and n > 1 else 1
    # interleaved: gate (dgate) at the packed row's start, up (dup) one element later, rows of 2N
    second = _Ptr(dtype, base + torch.tensor([], dtype=dtype).element_size()) if col == 2 else ptr
    if col == 2:
        stride = 2 * n
    floats = [gate_args[k] for k in ("alpha", "gate_mul", "gate_max", "up_limit")]  # spec_args is cached: read, never pop
    const = {k: v for k, v in gate_args.items() if k not in ("alpha", "gate_mul", "gate_max", "up_limit")}
    const.update(ACCURATE=spec.accurate, COL=col, BLOCK_M=spec.block_m, BLOCK_N=spec.block_n)
    if spec.kernel == "fwd":
        return kernels._glu_fwd_kernel, [ptr, second, ptr, spec.m, n, stride, stride, n, *floats], const
    store_h = spec.kernel == "bwd_h"
    h_stride = n if store_h else 0
    args = [ptr, ptr, second, ptr, second, ptr, spec.m, n, n, stride, stride, stride, stride, h_stride, *floats]
    return kernels._glu_bwd_kernel, args, {**const, "STORE_H": store_h}


def _jit_source(fn, args, const, backend):
    """signature, constexprs, attrs exactly as JITFunction.run / _pack_args build them."""
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # other triton versions: the same rules, restated (verify_jit_key checks them)
        native_specialize_impl = _specialize_fallback

    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip([p.name for p in fn.params if not p.is_constexpr], args), **const)
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            ty, desc = "constexpr", ""
        else:
            ty, desc = native_specialize_impl(type(backend), v, p.is_const, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            if ty == "constexpr":  # an integer equal to 1
                desc = ""
        sig[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        if isinstance(desc, str):  # as the JIT: a float argument (fp32) has no attribute
            attrs[(i,)] = backend.parse_attr(desc)
    return sig, constexprs, attrs


def _specialize_fallback(backend_cls, v, is_const, specialize, align):
    if isinstance(v, _Ptr):
        name = {v_: k for k, v_ in _TORCH_DTYPES.items()}[str(v.dtype).removeprefix("torch.")]
        return f"*{name}", "D" if align and v.data_ptr() % 16 == 0 else ""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"unexpected launch argument {v!r}")
    if specialize and v == 1:
        return "constexpr", 1
    ty = "i32" if -(2**31) <= v < 2**31 else "u64" if v >= 2**63 else "i64"
    return ty, "D" if specialize and align and v % 16 == 0 else ""


def _launch_options(spec: Spec) -> dict:
    """The keyword options glu_fwd / glu_bwd launch with, plus the spec's overrides."""
    from swiglu_hf import kernels

    return {**kernels.LAUNCH_OPTIONS, **dict(spec.options)}


def _jit_options(spec: Spec) -> dict:
    from triton import knobs

    opts = _launch_options(spec)
    # JITFunction.run adds these before parse_options
    opts["debug"] = opts.get("debug") or knobs.runtime.debug
    opts["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    opts["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return opts


def _compile_specs(specs, verify_jit_key=False, disassemble=False) -> list[dict]:
    rows = []
    for spec in specs:
        try:
            rows.append(_compile_one(spec, verify_jit_key, disassemble))
        except Exception as e:  # reported per row: one failing specialization must not hide the rest
            row = {**asdict(spec), "block_m": spec.block_m, "options": [list(kv) for kv in spec.options]}
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
            rows.append(row)
    return rows


def _compile_one(spec: Spec, verify_jit_key: bool, disassemble: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", spec.arch, 32)
    backend = make_backend(target)
    fn, args, const = _launch_args(spec)
    sig, constexprs, attrs = _jit_source(fn, args, const, backend)
    requested = _jit_options(spec)
    options = backend.parse_options(dict(requested))
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    md = kernel.metadata
    row = {**asdict(spec), "block_m": spec.block_m, "options": [list(kv) for kv in spec.options], "error": None,
           "name": md.name, "hash": md.hash, "cubin_bytes": len(cubin), "compile_s": round(seconds, 3),
           "num_warps": md.num_warps, "shared": md.shared,
           "requested_options": {k: requested[k] for k in ("enable_fp_fusion", "enable_reflect_ftz", "num_warps")
                                 if k in requested},
           "compiled_options": {"enable_fp_fusion": md.enable_fp_fusion,
                                "enable_reflect_ftz": getattr(md, "enable_reflect_ftz", None),
                                "num_warps": md.num_warps}}
    row.update(_inspect_ptx(ptx))
    row.update(_inspect_cubin(cubin, md.name, ptx, spec.arch, disassemble))
    threads = 32 * md.num_warps
    row["elems_per_thread"] = max(1, spec.block_m * spec.block_n // threads)
    row["instr_per_elem"] = round(row["instructions"] / row["elems_per_thread"], 2)
    if verify_jit_key:
        row["jit_hash"] = _jit_warmup_hash(spec, fn, args, const)
    return row


_LDST = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s")


def _inspect_ptx(ptx: str) -> dict:
    body = ptx.split("\t.file")[0]  # drop the DWARF sections
    code = [ln.strip() for ln in body.splitlines()]
    ld_bits, st_bits = [], []
    for ln in code:
        m = _LDST.search(ln)
        if not m:
            continue
        mods = m.group(2).split(".")
        vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
        bits = next((int(x[1:]) for x in reversed(mods) if re.fullmatch(r"[bfus]\d+", x)), 0)
        (ld_bits if m.group(1) == "ld" else st_bits).append(vec * bits)
    ops = [re.sub(r"^@!?%p\d+\s+", "", ln).split()[0] for ln in code
           if ln and not ln.startswith(("//", ".", "$", "{", "}", ")", "(")) and re.match(r"^(@!?%p\d+\s+)?[a-z]", ln)]
    ops = [o.rstrip(";") for o in ops]
    return {
        "ld_bits": min(ld_bits, default=0), "st_bits": min(st_bits, default=0),
        "ld_max": max(ld_bits, default=0), "st_max": max(st_bits, default=0),
        "n_ld": len(ld_bits), "n_st": len(st_bits),
        "ptx_instructions": len(ops),
        "ptx_local": len(re.findall(r"\.local\b", body)),
        "div_rn": sum(o.startswith("div.rn.") for o in ops),
        "fast_div": sum(o.startswith(("div.full.", "div.approx.")) for o in ops),
        "fast_exp": sum(o == "ex2.approx.f32" for o in ops),
        "fast_tanh": sum(o.startswith("tanh.approx") for o in ops),
        "libdevice_expf": sum(o.startswith("fma.rm.") for o in ops),
        "ftz_ops": sorted({o for o in ops if ".ftz" in o}),
    }


def _nvidia_tool(name: str):
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
    except Exception:
        return None
    return path if path and os.path.exists(path) else None


def _inspect_cubin(cubin: bytes, name: str, ptx: str, arch: int, disassemble: bool = False) -> dict:
    """Registers and local/stack bytes (cuobjdump -res-usage), static SASS instruction count."""
    out = {"regs": None, "local_bytes": 0, "stack_bytes": 0, "instr_source": "ptx", "instructions": None}
    tool = _nvidia_tool("cuobjdump")
    if tool:
        fd, path = tempfile.mkstemp(suffix=".cubin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
            if disassemble:  # slow (~0.8 s a kernel): only to cross-check _sass_instructions
                listing = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
                ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", listing, re.M)
                out["listing_instructions"] = sum(1 for op in ops if op != "NOP")
        finally:
            os.remove(path)
        m = re.search(r"Function \S*?" + re.escape(name) + r"\S*:\s*\n\s*(.*)", res)
        if m:
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1)))
            out["regs"] = int(usage.get("REG", 0))
            out["local_bytes"] = int(usage.get("LOCAL", 0))
            out["stack_bytes"] = int(usage.get("STACK", 0))
    n = _sass_instructions(cubin, name) if arch >= 70 else None
    if n is not None:
        out["instr_source"], out["instructions"] = "sass", n
    else:
        out["instructions"] = _inspect_ptx(ptx)["ptx_instructions"]
    return out


def _sass_instructions(cubin: bytes, name: str):
    """Non-NOP SASS instructions of `name`, counted in the cubin (ELF64) without disassembling.

    From Volta on every instruction is 16 bytes and the opcode is the low 12 bits of the first 8,
    NOP being 0x918; the count equals `cuobjdump -sass`'s (cross-checked by the tests), at a
    fraction of the cost (disassembling takes ~0.8 s a kernel, more than compiling it).
    """
    import struct

    try:
        if cubin[:6] != b"\x7fELF\x02\x01":
            return None
        (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
        headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
        strtab = headers[shstrndx][4]
        for h in headers:
            start = strtab + h[0]
            if cubin[start:cubin.index(b"\0", start)] == f".text.{name}".encode():
                offset, size = h[4], h[5]
                words = struct.unpack_from(f"<{size // 8}Q", cubin, offset)[::2]
                return sum(1 for w in words if w & 0xFFF != 0x918)
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _jit_warmup_hash(spec: Spec, fn, args, const) -> str:
    """The cache key hash a JIT launch with these arguments computes (warmup with a stub driver)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _StubDriver:  # the JIT asks the driver for target, device and stream, nothing else on warmup
        def get_current_target(self):
            return GPUTarget("cuda", spec.arch, 32)

        def get_current_device(self):
            return spec.arch  # one JIT device cache per arch

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    saved = driver._active  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(_StubDriver())
    try:
        kernel = fn.warmup(*args, grid=(1,), **const, **_launch_options(spec))
    finally:
        driver._active = saved
    return kernel.hash
