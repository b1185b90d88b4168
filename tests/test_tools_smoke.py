"""CPU smoke tests of the benchmark tools' logic: argument parsing, shapes, bandwidth arithmetic,
result formatting, the variant plumbing, and a tiny `bench overhead` run.

`bench kernel` and `bench mlp` time compiled kernels on a GPU; what runs here is everything around
the timing, with bench.kernel's DEVICE pointed at the CPU, the Triton kernels through the
interpreter (tests/conftest.py), and a fake do_bench returning a known time, so every number
asserted is computed from a known time and shape.
"""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from swiglu_hf.tools.bench import args as bench_args
from swiglu_hf.tools.bench import kernel as bench_kernel
from swiglu_hf.tools.bench import mlp as bench_mlp
from swiglu_hf.tools.bench import overhead as bench_overhead
from swiglu_hf.tools.peers import PeerUnavailable


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(argv)


def fake_do_bench(ms: float, calls: list | None = None):
    """A triton.testing.do_bench stand-in: runs fn once (so failures surface), returns `ms`."""

    def do_bench(fn, warmup=None, rep=None, return_mode=None, grad_to_none=None):
        fn()
        if calls is not None:
            calls.append((warmup, rep, return_mode))
        return ms

    return do_bench


# ---- bench kernel: parsing --------------------------------------------------------------------

def test_int_list_parses_k_suffix_and_rejects_junk():
    assert bench_args.int_list("1k,4096, 64K,") == (1024, 4096, 65536)
    for bad in ("abc", "0", "", "4k,-1", "1.5k"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_args.int_list(bad)


def test_impl_list_validates_names():
    assert bench_kernel._impl_list("eager, liger") == ("eager", "liger")
    for bad in ("eager,cudnn", "", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernel._impl_list(bad)


def test_kernel_parser_defaults_and_options():
    args = _parse(bench_kernel, ["kernel"])
    assert (args.tokens, args.intermediate, args.dtype, args.impls) == (None, None, "bfloat16", bench_kernel.IMPLS)
    assert (args.warmup, args.rep, args.quick) == (25, 100, False)
    args = _parse(bench_kernel, ["kernel", "--tokens", "4k,64k", "--intermediate", "8192", "--dtype", "float16",
                                 "--impls", "eager,compile", "--quick", "--warmup", "10", "--rep", "50"])
    assert args.tokens == (4096, 65536) and args.intermediate == (8192,) and args.dtype == "float16"
    assert args.impls == ("eager", "compile") and args.quick and (args.warmup, args.rep) == (10, 50)
    assert args.func is bench_kernel._main
    with pytest.raises(SystemExit):
        _parse(bench_kernel, ["kernel", "--impls", "nope"])


def test_kernel_main_without_cuda_measures_nothing(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_kernel._main(_parse(bench_kernel, ["kernel"])) == 2
    assert bench_kernel.NO_CUDA in capsys.readouterr().err


# ---- bench kernel: arithmetic ------------------------------------------------------------------

def test_gbps_formula():
    # Llama-3-8B, T=4096, bf16 forward: 3 tensors of 4096 x 14336 x 2 B = 352,321,536 B in 0.1 ms
    n_bytes = bench_kernel.FWD_TENSORS * 4096 * 14336 * 2
    assert n_bytes == 352_321_536
    assert bench_kernel._gbps(n_bytes, 0.1) == pytest.approx(3523.21536, rel=1e-12)
    assert bench_kernel._gbps(10**9, 1000.0) == pytest.approx(1.0, rel=1e-12)  # 1 GB in 1 s


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    monkeypatch.setattr(bench_kernel, "DEVICE", "cpu")
    monkeypatch.setattr(bench_kernel, "COPY_BYTES", 1 << 20)
    calls = []
    gbps = bench_kernel.copy_bandwidth(fake_do_bench(2.0, calls), warmup=3, rep=7)
    assert gbps == pytest.approx(2 * 2**20 / 2e-3 / 1e9, rel=1e-12)  # 1.048576 GB/s
    assert calls == [(3, 7, "median")]


def test_bench_size_rows_on_cpu(monkeypatch):
    """Every implementation's row at a tiny (T, I): bytes, GB/s from the fake time, speedups, notes."""
    monkeypatch.setattr(bench_kernel, "DEVICE", "cpu")
    T, I, ms = 3, 40, 0.5

    def broken(gate, up):
        raise RuntimeError("no kernel image\nsecond line")

    fns = {"liger": (None, "liger-kernel is not installed"), "compile": (bench_kernel._eager, ""),
           "broken": (broken, "")}
    impls = ("swiglu_hf", "swiglu_hf_packed", "eager", "liger", "compile", "broken")
    rows = bench_kernel.bench_size(T, I, torch.float32, impls, fns, fake_do_bench(ms), 1, 1)
    by = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == list(impls)
    for r in rows:
        assert (r["tokens"], r["intermediate"], r["model"]) == (T, I, "")
        assert (r["fwd_bytes"], r["bwd_bytes"]) == (3 * T * I * 4, 5 * T * I * 4)
    for name in ("swiglu_hf", "swiglu_hf_packed", "eager", "compile"):
        r = by[name]
        assert (r["fwd_ms"], r["bwd_ms"], r["note"]) == (ms, ms, "")
        assert r["fwd_gbps"] == pytest.approx(3 * T * I * 4 / (ms * 1e-3) / 1e9)
        assert r["bwd_gbps"] == pytest.approx(5 * T * I * 4 / (ms * 1e-3) / 1e9)
        assert r["fwd_speedup_vs_eager"] == r["bwd_speedup_vs_eager"] == 1.0
        assert r["first_call_s"] > 0
    assert by["liger"]["note"] == "liger-kernel is not installed" and "fwd_ms" not in by["liger"]
    assert by["broken"]["note"] == "failed: RuntimeError: no kernel image" and "fwd_ms" not in by["broken"]
    assert bench_kernel.MODELS[14336] == "Llama-3-8B"


def test_measure_runs_forward_and_backward(monkeypatch):
    monkeypatch.setattr(bench_kernel, "DEVICE", "cpu")
    leaves, fn = bench_kernel._inputs("swiglu_hf_packed", 2, 8, torch.float32)
    assert [t.shape for t in leaves] == [torch.Size([2, 16])] and all(t.requires_grad for t in leaves)
    seen = []
    result = bench_kernel.measure(fn, leaves, torch.ones(2, 8), fake_do_bench(1.25, seen), 5, 6)
    assert result["fwd_ms"] == result["bwd_ms"] == 1.25 and result["first_call_s"] > 0
    assert seen == [(5, 6, "median"), (5, 6, "median")]
    with pytest.raises(AssertionError):
        bench_kernel._inputs("liger", 2, 8, torch.float32)  # peers come through `fns`


def test_liger_plumbing_without_liger():
    fn, why = bench_kernel._liger()
    if fn is None:
        assert "liger" in why.lower()
    else:  # installed: the callable multiplies like eager
        assert why == ""


# ---- bench kernel: reporting -------------------------------------------------------------------

def _result(rows):
    return {"date": "2026-11-30", "device": "NVIDIA H200", "torch": "2.13", "triton": "3.9", "liger": None,
            "dtype": "bfloat16", "copy_gbps": 4000.0, "rows": rows}


def _kernel_rows():
    full = {"impl": "swiglu_hf", "tokens": 4096, "intermediate": 14336, "model": "Llama-3-8B",
            "fwd_bytes": 352_321_536, "bwd_bytes": 587_202_560, "note": "", "first_call_s": 1.5,
            "fwd_ms": 0.1, "bwd_ms": 0.2, "fwd_gbps": 3523.21536, "bwd_gbps": 2936.0128,
            "fwd_speedup_vs_eager": 2.5, "bwd_speedup_vs_eager": 3.0}
    missing = {"impl": "liger", "tokens": 4096, "intermediate": 14336, "model": "Llama-3-8B",
               "fwd_bytes": 352_321_536, "bwd_bytes": 587_202_560, "note": "liger-kernel is not installed"}
    return [full, missing]


def test_table_and_markdown_numbers():
    result = _result(_kernel_rows())
    lines = bench_kernel.table(result).splitlines()
    assert lines[0].split()[:3] == ["I", "T", "impl"]
    full, missing = lines[1], lines[2]
    assert "0.100" in full and "3523" in full and "88%" in full and "0.200" in full and "2936" in full and "73%" in full
    assert "1.50" in full
    assert missing.split()[3:9] == ["-"] * 6 and missing.endswith("liger-kernel is not installed")
    md = bench_kernel.markdown(result)
    assert md.startswith("## Fused SwiGLU kernel bandwidth\n")
    assert "device copy bandwidth 4000 GB/s" in md and "liger-kernel absent" in md
    assert "| Llama-3-8B (14336) | 4096 | swiglu_hf | 0.100 | 3523 | 88% | 2.50 | 0.200 | 2936 | 73% | 3.00 | 1.50 |  |" in md
    assert "| Llama-3-8B (14336) | 4096 | liger | - | - | - | - | - | - | - | - | - | liger-kernel is not installed |" in md


def test_fmt_and_pct():
    assert bench_kernel._fmt({"a": 1.23456}, "a", "9.3f") == "    1.235"
    assert bench_kernel._fmt({}, "a", "9.3f") == "        -"
    assert bench_kernel._pct({"g": 1000.0}, "g", 4000.0) == "25%"
    assert bench_kernel._pct({"g": 1000.0}, "g", 0.0) == "-" and bench_kernel._pct({}, "g", 4000.0) == "-"


def test_write_json_and_markdown(tmp_path):
    result = _result(_kernel_rows())
    js, md = tmp_path / "out" / "k.json", tmp_path / "k.md"
    bench_kernel._write(result, str(js), str(md))
    assert json.loads(js.read_text()) == result
    assert md.read_text() == bench_kernel.markdown(result)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["k.json", "k.md", "out"]  # no .tmp left
    bench_kernel._write(result, None, None)  # nothing asked: nothing written, no error


# ---- bench mlp ----------------------------------------------------------------------------------

def test_mlp_parser_defaults_and_options():
    args = _parse(bench_mlp, ["mlp"])
    assert (args.hidden, args.intermediate, args.tokens, args.rep) == (4096, 14336, (8192, 32768), 100)
    assert args.variants == ",".join(bench_mlp.VARIANTS) and args.func is bench_mlp._main
    args = _parse(bench_mlp, ["mlp", "--hidden", "64", "--intermediate", "172", "--tokens", "1k", "--variants", "stock"])
    assert (args.hidden, args.intermediate, args.tokens, args.variants) == (64, 172, (1024,), "stock")


def test_mlp_main_without_cuda_measures_nothing(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_mlp._main(_parse(bench_mlp, ["mlp"])) == 2
    assert capsys.readouterr().err.strip() == bench_mlp.NO_CUDA


def test_ratio():
    assert bench_mlp._ratio({"ms": 3.0}, {"ms": 2.0}, "ms") == "1.50x"
    assert bench_mlp._ratio({"ms": 3.0}, None, "ms") == "-"
    assert bench_mlp._ratio({"peak_bytes": 5}, {"peak_bytes": 0}, "peak_bytes") == "-"


def test_mlp_variants_build_on_cpu(monkeypatch):
    """stock is the module itself; patched / tiled are patched copies computing stock's output."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from swiglu_hf import patched_modules

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=1,
                         num_key_value_heads=1)
    stock = LlamaMLP(config)
    x = torch.randn(5, 16)
    assert bench_mlp._build("stock", stock) is stock
    with torch.no_grad():
        want = stock(x)
    for name in ("patched", "tiled"):
        mlp = bench_mlp._build(name, stock)
        assert mlp is not stock and patched_modules(mlp) and not patched_modules(stock)
        got = mlp(x.clone().requires_grad_())
        assert torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6) is None
    # torch.compile of a copy (stubbed: importing dynamo alone takes seconds)
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))
    tag, copied = bench_mlp._build("compile", stock)
    assert tag == "compiled" and type(copied) is LlamaMLP and copied is not stock and not patched_modules(copied)
    try:
        bench_mlp._build("liger", stock)
    except PeerUnavailable as e:
        assert "liger" in str(e).lower()
    with pytest.raises(ValueError, match="unknown variant"):
        bench_mlp._build("nope", stock)


# ---- bench overhead ------------------------------------------------------------------------------

def test_overhead_parser():
    args = _parse(bench_overhead, ["overhead"])
    assert (args.tokens, args.hidden, args.intermediate, args.threads) == ((1, 128), 64, 172, 1)
    args = _parse(bench_overhead, ["overhead", "--tokens", "1,2", "--batches", "3", "--batch-ms", "1"])
    assert (args.tokens, args.batches, args.batch_ms) == ((1, 2), 3, 1.0)


def test_overhead_time_pair_tells_wall_from_cpu():
    import time

    timed = bench_overhead.time_pair(lambda: None, lambda: time.sleep(0.002), batches=3, batch_ms=5)
    (fast, slow), (_, slow_cpu) = timed["wall"], timed["cpu"]
    assert fast < 0.002 <= slow and slow_cpu < 0.002 and timed["number"] >= 1


def test_overhead_tiny_run_times_every_row():
    rows = bench_overhead.run(tokens=(1, 3), hidden=16, intermediate=40, batches=3, batch_ms=1)
    assert [(r["what"], r["tokens"], r["mode"]) for r in rows] == (
        [("mlp", t, m) for t in (1, 3) for m in bench_overhead.MODES] + [("op", 1, m) for m in bench_overhead.MODES]
    )
    for r in rows:
        assert r["stock_us"] > 0 and r["patched_us"] > 0 and r["stock_cpu_us"] > 0 and r["patched_cpu_us"] > 0
        assert r["overhead_us"] == pytest.approx(r["patched_us"] - r["stock_us"])
    md = bench_overhead.markdown(rows)
    assert md.count("\n") == 2 + len(rows) and "| LlamaMLP | 3 | fwd_bwd |" in md


def test_overhead_pair_is_stock_and_patched():
    stock, patched = bench_overhead.build_pair(16, 40)
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(stock(x), patched(x))  # the PyTorch path: bitwise
    assert torch.equal(bench_overhead._eager_glu(x, x), F.silu(x) * x)


# ---- bench memory and the bench command's import rule ----------------------------------------------

def _cli(argv, capsys):
    from swiglu_hf import cli

    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _bytes_per_token(out: str) -> dict[str, str]:
    """{row label: bytes/token/layer} from the printed table (the rows after the dashes)."""
    rows = out.split("-" * 20)[-1].strip().splitlines()
    return {line[:44].strip(): line[44:62].strip() for line in rows if line[:44].strip() and not line.startswith("max")}


def test_bench_memory_prints_the_readme_numbers(capsys):
    # README: tiny-llama bf16 896 / 704 / 512 / 128; the Llama-3-8B MLP 122,880 -> 65,536 -> 8,192
    code, out, err = _cli(["bench", "memory", "--tokens", "8"], capsys)
    assert code == 0, err
    assert "(LlamaMLP, split)" in out and "object at 0x" not in out
    rows = _bytes_per_token(out)
    assert (rows["stock eager"], rows["swiglu_hf default"], rows["torch.compile (aot_eager_decomp_partition)"]) == (
        "896", "512", "704")
    assert [v for k, v in rows.items() if k.startswith("swiglu_hf tiled")] == ["128"]
    code, out, err = _cli(["bench", "memory", "--hidden", "4096", "--intermediate", "14336", "--tokens", "8",
                           "--budget-gb", "20", "--layers", "32"], capsys)
    assert code == 0, err
    assert out.startswith("swiglu-hf bench memory: LlamaMLP (MLP only), H=4096, I=14336, bfloat16")
    rows = _bytes_per_token(out)
    assert (rows["stock eager"], rows["swiglu_hf default"]) == ("122,880", "65,536")
    assert [v for k, v in rows.items() if k.startswith("swiglu_hf tiled")] == ["8,192"]


def test_bench_memory_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as done:
        _cli(["bench", "memory", "--help"], capsys)
    assert done.value.code == 0 and "--intermediate" in capsys.readouterr().out
    code, _, err = _cli(["bench", "memory", "--hidden", "64"], capsys)
    assert code == 2 and err.strip() == "swiglu-hf bench: error: --hidden and --intermediate go together"


def _import_failing(monkeypatch, module: str, err: ImportError):
    import importlib

    real = importlib.import_module

    def import_module(name, *args):
        if name == f"swiglu_hf.tools.bench.{module}":
            raise err
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)


def test_bench_says_unavailable_only_for_a_missing_third_party_package(monkeypatch, capsys):
    _import_failing(monkeypatch, "kernel", ModuleNotFoundError("No module named 'triton'", name="triton"))
    code, _, err = _cli(["bench", "kernel"], capsys)
    assert code == 2 and err.strip() == ("swiglu-hf bench: error: bench kernel is unavailable: "
                                         "swiglu_hf.tools.bench.kernel needs the 'triton' package, which is not installed")
    with pytest.raises(SystemExit) as done:  # --help still answers
        _cli(["bench", "kernel", "--help"], capsys)
    assert done.value.code == 0 and "unavailable: needs triton" in capsys.readouterr().out


@pytest.mark.parametrize("err", [ModuleNotFoundError("No module named 'swiglu_hf.mlp'", name="swiglu_hf.mlp"),
                                 ImportError("cannot import name 'x' from 'swiglu_hf.gated'", name="swiglu_hf.gated"),
                                 ImportError("cannot import name 'y' from 'torch'", name="torch")],
                         ids=["removed swiglu_hf module", "removed swiglu_hf name", "broken third-party name"])
def test_bench_raises_an_import_bug(err, monkeypatch, capsys):
    _import_failing(monkeypatch, "memory", err)
    with pytest.raises(ImportError) as raised:
        _cli(["bench", "memory"], capsys)
    assert raised.value is err


# ---- every tools module imports; every command the README names runs on tiny inputs ---------------

def test_every_tools_module_imports():
    import importlib
    import pkgutil

    import swiglu_hf.tools

    names = [m.name for m in pkgutil.walk_packages(swiglu_hf.tools.__path__, "swiglu_hf.tools.")]
    assert len(names) > 10 and "swiglu_hf.tools.tiny_checkpoint" in names
    for name in names:
        importlib.import_module(name)  # an ImportError here is a bug, whatever the module


README_COMMANDS = {  # what the README names -> a tiny run of it on CPU and its exit status
    "verify": (["verify", "tiny-llama", "--device", "cpu", "--seq-len", "8"], 0),
    "finetune": (["finetune", "--steps", "1", "--repeats", "1", "--batch-size", "1", "--seq-len", "8",
                  "--eval-batches", "1", "--device", "cpu", "--out", "{tmp}/ft"], 0),
    "sweep": (["sweep", "--types", "llama", "--passes", "defaults", "--out", "{tmp}/sweep.md"], 0),
    "compile": (["compile", "--arch", "sm_90", "--dtype", "fp32", "--activation", "silu", "--block-n", "1024",
                 "--rows", "1", "--jobs", "1"], 0),
    "plan": (["plan", "--seq-len", "64", "--no-search", "--target", "cpu"], 0),
    "bench memory": (["bench", "memory", "--hidden", "16", "--intermediate", "40", "--tokens", "4"], 0),
    "bench overhead": (["bench", "overhead", "--tokens", "1", "--batches", "1", "--batch-ms", "1",
                        "--decode-tokens", "2"], 0),
    "bench kernel": (["bench", "kernel"], 2),  # GPU only: one line, status 2
    "bench mlp": (["bench", "mlp"], 2),
}


def test_the_readme_names_no_command_without_a_smoke_run():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    from swiglu_hf import cli

    named = set()
    for command, rest in re.findall(r"swiglu-hf ([a-z]+)((?: [a-z]+)?)", readme):
        if command in cli.SUBCOMMANDS:
            named.add(f"{command}{rest}" if command == "bench" else command)
    assert named and named <= set(README_COMMANDS), f"no smoke run for {sorted(named - set(README_COMMANDS))}"


@pytest.mark.parametrize("name", list(README_COMMANDS))
def test_readme_command_runs_on_tiny_inputs(name, tmp_path, monkeypatch, capsys):
    argv, status = README_COMMANDS[name]
    monkeypatch.chdir(tmp_path)
    if status == 2:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == status, (out + err)[-3000:]
    if status == 2:
        assert len(err.strip().splitlines()) == 1 and "needs a GPU" in err and out == ""
    else:
        assert out.strip() and "Traceback" not in err
