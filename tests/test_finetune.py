"""The accelerate fine-tuning comparison: outputs, loss agreement, memory accounting, DDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from swiglu_hf import cli, patched_modules
from swiglu_hf.tools import finetune, peers
from swiglu_hf.finetune import FinetuneConfig, VariantUnavailable, apply_variant, make_batches, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "6", "--warmup-steps", "2", "--batch-size", "2", "--seq-len", "32", "--device", "cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    assert finetune.main([*TINY, "--variants", "stock,patched,liger", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_schema(default_run):
    _, results = default_run
    for key in ("device", "model", "dtype", "steps", "variants"):
        assert key in results
    assert results["steps"] == 6
    assert set(results["variants"]) == {"stock", "patched"} and results["pending"] == []
    for v in results["variants"].values():
        assert v["tokens_per_s"] > 0 and v["step_time_s"] > 0
        assert v["peak_memory_bytes"] > 0  # Linux: peak RSS growth (grads, Adam state, activations)
        assert len(v["losses"]) == 6 and all(math.isfinite(x) for x in v["losses"])
        assert v["losses"][-1] < v["losses"][0] - 0.1  # it learns: byte loss starts near ln(264) = 5.6


def test_patched_loss_equals_stock(default_run):
    _, results = default_run
    stock, patched = results["variants"]["stock"], results["variants"]["patched"]
    # The CPU path runs the same aten ops as stock eager, so fp32 training matches step for step.
    assert patched["max_rel_loss_diff_vs_stock"] <= 1e-6
    assert patched["losses"] == pytest.approx(stock["losses"], rel=1e-6)


def test_patched_saves_less_for_backward(default_run):
    _, results = default_run
    stock, patched = results["variants"]["stock"], results["variants"]["patched"]
    # docs/ARCHITECTURE.md: stock saves H + 4I per token per MLP, the fused op H + 2I.
    cfg = json.loads(finetune.DEFAULT_CONFIG.read_text())
    tokens, layers, inter = 2 * 32, cfg["num_hidden_layers"], cfg["intermediate_size"]
    assert stock["saved_activation_bytes"] - patched["saved_activation_bytes"] == 2 * inter * tokens * layers * 4


def test_unavailable_peer_is_reported_not_run(default_run):
    _, results = default_run
    assert "liger" not in results["variants"]
    assert "CUDA" in results["skipped"]["liger"] or "not installed" in results["skipped"]["liger"]


def test_outputs_written(default_run):
    out, _ = default_run
    for name in ("loss_curves.png", "tokens_per_s.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "results.md").read_text()
    assert "| stock |" in md and "| patched |" in md and "skipped liger" in md


def test_bad_variant_name_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", "--variants", "stock,fused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'fused'" in err and "stock, patched, tiled, liger, compile" in err
    with pytest.raises(ValueError, match="unknown variant"):
        FinetuneConfig(variants=("stock", "fused"))


def test_missing_peers_raise_variant_unavailable(monkeypatch):
    model = nn.Linear(2, 2)
    with pytest.raises(VariantUnavailable, match="CUDA device"):
        apply_variant("liger", model, torch.device("cpu"))
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VariantUnavailable, match="not installed"):  # the device is only named here
        apply_variant("liger", model, torch.device("cuda"))


def test_results_are_written_after_each_variant(tmp_path, monkeypatch):
    # A run stopped part-way (gpu_check.sh's `timeout` sends SIGINT) keeps the variants it finished.
    train = finetune.train_variant

    def stopped_during_patched(accelerator, model, *args, **kwargs):
        if patched_modules(model):
            raise KeyboardInterrupt
        return train(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_variant", stopped_during_patched)
    argv = ["--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*argv, "--variants", "stock,liger,patched,tiled", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["variants"]) == ["stock"] and list(results["skipped"]) == ["liger"]
    assert results["pending"] == ["patched", "tiled"]
    md = (tmp_path / "results.md").read_text()
    assert "| stock |" in md and "not run yet: patched, tiled" in md
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp"))  # plots only at the end


def test_batches_are_seeded_and_split_across_ranks():
    tokens = torch.arange(1000)
    cfg = FinetuneConfig(steps=3, batch_size=2, seq_len=8, warmup_steps=0)
    rank0, rank1 = make_batches(tokens, cfg, 2, 0), make_batches(tokens, cfg, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, make_batches(tokens, cfg, 2, 0)))
    assert len(rank0) == 3 and rank0[0].shape == (2, 8)
    assert not torch.equal(rank0[0], rank1[0])


def test_grad_accumulation_equals_the_larger_batch():
    # Micro-batches of 2 accumulated twice are drawn as the same windows as one batch of 4.
    common = dict(variants=("stock",), steps=3, warmup_steps=1, seq_len=16, device="cpu")
    accumulated = run(FinetuneConfig(batch_size=2, grad_accum=2, **common))["variants"]["stock"]["losses"]
    single = run(FinetuneConfig(batch_size=4, grad_accum=1, **common))["variants"]["stock"]["losses"]
    assert accumulated == pytest.approx(single, rel=1e-5)


def test_lora_with_checkpointing_patched_matches_stock():
    cfg = FinetuneConfig(steps=3, warmup_steps=1, batch_size=2, seq_len=16, device="cpu", lora=True,
                         gradient_checkpointing=True)
    variants = run(cfg)["variants"]
    assert variants["patched"]["losses"] == pytest.approx(variants["stock"]["losses"], rel=1e-6)


def test_ddp_two_processes_stock_matches_patched(tmp_path):
    # `accelerate launch --cpu` starts a single process; `--multi_gpu` with --device cpu gives
    # real 2-process DDP on CPU (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "examples" / "finetune.py"), "--steps", "3", "--warmup-steps", "1",
           "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2
    assert proc.stdout.count("variant  tokens/s") == 1  # only rank 0 prints the table
    stock, patched = results["variants"]["stock"]["losses"], results["variants"]["patched"]["losses"]
    assert len(stock) == 3 and patched == pytest.approx(stock, rel=1e-5)


def test_llama_1b_preset_has_the_real_shape():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shape only: no 5 GB of weights
        model = AutoModelForCausalLM.from_config(finetune.hf_config(finetune.PRESETS["llama-3.2-1b"]))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B, tied embeddings


def test_local_checkpoint_without_tokenizer_trains_on_bytes(tmp_path):
    model, _, _ = finetune.build_model(FinetuneConfig())
    model.save_pretrained(tmp_path / "ckpt")
    results = run(FinetuneConfig(model=str(tmp_path / "ckpt"), steps=2, warmup_steps=1, batch_size=2,
                                 seq_len=16, device="cpu"))
    assert results["tokenizer"] == "byte-level"
    assert results["variants"]["patched"]["losses"] == results["variants"]["stock"]["losses"]
