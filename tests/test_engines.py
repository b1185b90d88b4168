"""Distributed engines, 2 processes over gloo on CPU: patched training is bitwise equal to stock.

Engines: DeepSpeed ZeRO-1/2/3 and ZeRO-3 + offload_param (plain deepspeed.initialize), HF Trainer +
SwigluCallback on ZeRO-3, ZeRO-2/ZeRO-3 through accelerator.prepare (zero3_init_flag), FSDP2, FSDP1
(use_orig_params) and DDP through accelerator.prepare, plus FSDP1/FSDP2 SHARDED_STATE_DICT
save_state/load_state. Patch orders: before the engine wraps the model (ZeRO-3: on the model that
from_pretrained built under deepspeed.zero.Init), after (on engine.module / accelerator.unwrap_model),
class-level `swiglu_hf.patching()` around from_pretrained, and the Trainer callback.

A process group start costs ~15-25 s on 2 cores, so there are two launches (below), each running all
its engines and orders in sequence in one process group (tests/distributed/*_worker.py) and writing
JSON; the tests assert on it. `python tests/distributed/report.py FILE.json` prints a launch's matrix.

Exactness: stock and patched reduce the same gradients in the same order (fp32, same batches, same
init, same collectives) and the fused forwards compute the values stock's eager ops compute, so
losses (every rank, every step, as float.hex) and the gathered weights after 3 AdamW steps are
compared with ==, no tolerance.

Only the DeepSpeed launch skips (pytest.importorskip) when deepspeed is not importable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.common import HIDDEN, INTERMEDIATE
from tests.distributed.report import rows

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "distributed"
CONFIGS = ROOT / "examples" / "accelerate_configs"
LAUNCH_TIMEOUT = int(os.environ.get("SWIGLU_ENGINES_TIMEOUT", "900"))
PATCHED_MLPS = 2  # tiny Llama: 2 layers
STOCK_SAVES, PATCHED_SAVES = HIDDEN + 4 * INTERMEDIATE, HIDDEN + 2 * INTERMEDIATE  # fp32 elements per token

# Two launches, both through `accelerate launch --config_file` (so the example configs are what runs):
#   deepspeed: zero3.yaml + ds_worker.py: plain deepspeed.initialize ZeRO-1/2/3/3+offload_param, HF Trainer
#              + ZeRO-3, then accelerate.prepare with ZeRO-2 (plugin = zero2.yaml) and ZeRO-3 (the config)
#   torch:     fsdp2.yaml + acc_worker.py: FSDP2 (the config), then FSDP1 and DDP (plugins = fsdp1/ddp.yaml)
# name -> (config, worker, extra args, needs deepspeed)
LAUNCHES = {
    "deepspeed": ("zero3.yaml", "ds_worker.py", [], True),
    "torch": ("fsdp2.yaml", "acc_worker.py", ["--engines", "fsdp2,fsdp1,ddp"], False),
}
ENGINE_LAUNCH = {e: "deepspeed" for e in ("zero1", "zero2", "zero2_acc", "zero3", "zero3_offload", "trainer_zero3",
                                          "zero3_acc")}
ENGINE_LAUNCH.update({e: "torch" for e in ("fsdp2", "fsdp1", "ddp")})
FROM_CONFIG = {"zero3_acc", "fsdp2"}  # built by accelerate from the launch's --config_file
WRAPPER = {e: "DeepSpeedEngine" for e in ENGINE_LAUNCH}
WRAPPER.update(ddp="DistributedDataParallel", fsdp1="FullyShardedDataParallel", fsdp2="FSDPModule")

# (engine, order) cells that must train bitwise like stock
EQUAL_CELLS = (
    [(e, o) for e in ("zero1", "zero2", "zero2_acc") for o in ("before", "after", "class")]
    + [("zero3", o) for o in ("before", "after", "class", "before_noinit")]
    + [(e, o) for e in ("zero3_offload", "zero3_acc") for o in ("before", "after", "class")]
    + [("trainer_zero3", "callback"), ("trainer_zero3", "before")]
    + [("ddp", o) for o in ("before", "after", "class")]
    + [(e, o) for e in ("fsdp1", "fsdp2") for o in ("before", "class")]
)
ZERO_INIT = {"zero3", "zero3_offload", "trainer_zero3", "zero3_acc"}  # stock built under deepspeed.zero.Init

# Tiled mode (tile_tokens=TILE: 2 tiles per MLP call). Not bitwise: the weight gradient is a sum of one
# partial per tile where stock makes one mm over all tokens (fp32 rounding of the sum order), which AdamW
# then amplifies where a gradient is near zero. Measured after 3 steps (2 ranks, fp32): max |patched -
# stock| weight 5e-6 under ZeRO-2 (TiledMLP, gradients returned by the Function), 1.2e-5 under ZeRO-3 and
# ZeRO-3 + offload_param (TiledZero3, gradients through ZeRO's own autograd functions); first-step losses
# bitwise, last-step losses within 2.1e-7 relative. The bounds below are ~10x those.
TILED_CELLS = [("zero2", "before_tiled")] + [(e, o) for e in ("zero3", "zero3_offload")
                                              for o in ("before_tiled", "after_tiled")] + [("zero3", "before_noinit_tiled")]
TILED_WEIGHT_BOUND, TILED_LOSS_RTOL = 1e-4, 2e-6
TILED_SAVES = HIDDEN  # x only, per token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(name: str, out: Path, workdir: Path) -> list[str]:
    config, worker, extra, _ = LAUNCHES[name]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--main_process_port", str(_free_port()), str(DIST / worker), "--out", str(out), "--workdir", str(workdir),
            *extra]


def _launch(name: str, workdir: Path) -> dict:
    out = workdir / "results.json"
    cmd = _command(name, out, workdir)
    # CPU + gloo on any machine (a visible GPU would switch accelerate to nccl and DeepSpeed to CUDA)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    start = time.time()
    # own session: on a timeout the launcher and its workers are killed together (and nothing else)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\n[test_engines] killed after {LAUNCH_TIMEOUT} s"
    (workdir / "launch.log").write_text(log)
    if not out.exists():
        pytest.fail(f"{name}: the launch wrote no results (rc={proc.returncode}).\n$ {' '.join(cmd)}\n{log[-6000:]}")
    results = json.loads(out.read_text())
    results.update(rc=proc.returncode, wall_s=round(time.time() - start, 1), log_tail=log[-4000:], cmd=cmd)
    print(f"\n[{name}] {results['wall_s']} s\n" + "\n".join(rows(results)))
    return results


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """launch(name) -> that launch's results, started once per module (each family is one launch)."""
    done: dict = {}

    def get(name: str) -> dict:
        if LAUNCHES[name][3]:
            pytest.importorskip("deepspeed", reason="DeepSpeed engines need `pip install deepspeed`")
        if name not in done:
            done[name] = _launch(name, tmp_path_factory.mktemp(name))
        return done[name]

    return get


def _cell(launch, engine: str, order: str) -> dict:
    results = launch(ENGINE_LAUNCH[engine])
    key = f"{engine}/{order}"
    if key not in results["cells"]:
        pytest.fail(f"{key}: missing from the launch results (rc={results['rc']}; the launch died or hung "
                    f"before it).\n{results['log_tail']}")
    return results["cells"][key]


def _ok(cell: dict) -> None:
    if cell["error"]:
        frames = "\n  ".join(cell.get("swiglu_frames") or ["(none)"])
        pytest.fail(f"{cell['engine']}/{cell['order']} raised {cell['error']}\n"
                    f"swiglu_hf frames:\n  {frames}\nraised at {cell.get('raised_at')}\n{cell.get('traceback', '')}")


@pytest.mark.parametrize("engine", sorted(ENGINE_LAUNCH))
def test_stock_runs_distributed(launch, engine):
    """The stock cell really ran the engine on 2 ranks (accelerate on CPU can silently fall back to DDP or to
    unsynchronised single processes; see tests/distributed/acc_worker.py:make_accelerator)."""
    results = launch(ENGINE_LAUNCH[engine])
    assert results["rc"] == 0, f"the launch exited with {results['rc']}:\n{results['log_tail']}"
    assert results["meta"]["world_size"] == 2
    cell = _cell(launch, engine, "stock")
    _ok(cell)
    assert WRAPPER[engine] in cell["wrapped"], cell["wrapped"]
    assert cell["patched"] == 0
    losses = cell["losses_hex"]
    assert len(losses) == 2 and all(len(r) == 3 for r in losses)
    assert losses[0] != losses[1], "both ranks trained on the same data"
    assert cell["saved_bytes"] == STOCK_SAVES * cell["tokens"] * 4, "the saved-bytes probe measured something else"
    if engine in ZERO_INIT:
        assert cell["built_under_zero_init"], "the stock model was not partitioned by deepspeed.zero.Init"
    if engine in results["meta"].get("engines", {}):  # accelerate engines
        info = results["meta"]["engines"][engine]
        assert info["runs"] == engine and info["num_processes"] == 2, info
        assert info["from_config"] == (engine in FROM_CONFIG), info


@pytest.mark.parametrize(("engine", "order"), EQUAL_CELLS, ids=[f"{e}-{o}" for e, o in EQUAL_CELLS])
def test_patched_equals_stock(launch, engine, order):
    stock, cell = _cell(launch, engine, "stock"), _cell(launch, engine, order)
    _ok(stock)
    _ok(cell)
    assert cell["patched"] == PATCHED_MLPS
    if order == "callback":
        assert cell["callback_patched"] == PATCHED_MLPS
    if engine in ZERO_INIT:
        assert cell["built_under_zero_init"] == (order != "before_noinit")
    if "batches_match" in cell:
        assert cell["batches_match"], "accelerate's sharded DataLoader did not give the expected rows"
    # every rank, every step: float.hex strings, so bitwise
    assert cell["losses_hex"] == stock["losses_hex"]
    assert cell["keys_equal"] and cell["weights_equal"], f"max |patched - stock| weight = {cell['max_abs_diff']}"
    assert cell["max_abs_diff"] == 0.0
    # default mode saves x, gate and up (H + 2I per token) where stock saves x, gate, act(gate), up, h (H + 4I)
    assert cell["tokens"] == stock["tokens"]
    assert cell["saved_bytes"] == PATCHED_SAVES * cell["tokens"] * 4, (cell["saved_bytes"], stock["saved_bytes"])


@pytest.mark.parametrize(("engine", "order"), TILED_CELLS, ids=[f"{e}-{o}" for e, o in TILED_CELLS])
def test_tiled_under_zero(launch, engine, order):
    """tile_tokens under DeepSpeed (ZeRO-3 partitions the weights: the tiles' backward re-runs the modules'
    forwards so ZeRO gathers them, and grads reach the parameters through ZeRO's hooks): trains like stock
    to the tiled mode's rounding (see TILED_CELLS) and saves only x (H per token)."""
    stock, cell = _cell(launch, engine, "stock"), _cell(launch, engine, order)
    _ok(stock)
    _ok(cell)
    assert cell["patched"] == PATCHED_MLPS
    if engine in ZERO_INIT:
        assert cell["built_under_zero_init"] == ("noinit" not in order)
    assert cell["keys_equal"] and cell["max_abs_diff"] <= TILED_WEIGHT_BOUND, cell["max_abs_diff"]
    got = [[float.fromhex(v) for v in r] for r in cell["losses_hex"]]
    want = [[float.fromhex(v) for v in r] for r in stock["losses_hex"]]
    assert [r[0] for r in got] == [r[0] for r in want], "the first step (same weights) must be bitwise"
    assert all(abs(a - b) <= TILED_LOSS_RTOL * abs(b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)), (got, want)
    assert cell["tokens"] == stock["tokens"]
    assert cell["saved_bytes"] == TILED_SAVES * cell["tokens"] * 4, (cell["saved_bytes"], stock["saved_bytes"])


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_fsdp_patch_after_wrap(launch, engine):
    """After accelerator.prepare, FSDP1 (use_orig_params) holds flat-parameter shards and FSDP2 DTensor shards
    outside forward: the patch-time probe waits for each MLP's first forward (FSDP has gathered its weights
    there), then training is bitwise stock's, saving H + 2I per token."""
    stock, cell = _cell(launch, engine, "stock"), _cell(launch, engine, "after")
    _ok(stock)
    _ok(cell)
    assert cell["patched"] == PATCHED_MLPS
    assert cell["probes_pending"] == PATCHED_MLPS and cell["probes_pending_after"] == 0
    assert cell["losses_hex"] == stock["losses_hex"]
    assert cell["keys_equal"] and cell["weights_equal"] and cell["max_abs_diff"] == 0.0
    assert cell["saved_bytes"] == PATCHED_SAVES * cell["tokens"] * 4


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_fsdp_patch_after_wrap_still_refuses_wrong_math(launch, engine):
    """The deferred probe is the real probe: an MLP computing 1.0001x the gated MLP, patched after prepare,
    raises SelfCheckError at its first forward on every rank, with the advice to patch before prepare."""
    cell = _cell(launch, engine, "after_bad")
    assert cell["error"] and cell["error"].startswith("SelfCheckError"), cell["error"]
    assert "differs from the module's own forward" in cell["error"], cell["error"]
    assert all(cell["errors_per_rank"])


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_fsdp_sharded_state_dict(launch, engine):
    """SHARDED_STATE_DICT through accelerator.save_state / load_state: a patched model's checkpoint has
    exactly stock's keys and values, and a patched model loads stock's checkpoint to stock's weights/loss."""
    _ok(_cell(launch, engine, "before"))
    cell = _cell(launch, engine, "load")
    _ok(cell)
    assert cell["patched"] == PATCHED_MLPS
    assert cell["ckpt_keys"] > 0 and cell["ckpt_keys_equal"] and not cell["ckpt_has_swiglu_keys"]
    assert cell["ckpt_values_equal"], "patched training saved other values than stock"
    assert cell["keys_equal"] and cell["weights_equal"], "load_state into the patched model gave other weights"
    assert cell["eval_loss_equal_stock"]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_accelerate_config_files(config):
    """The example configs are 2-process, one-machine configs accelerate can read."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / config))
    assert cfg.num_processes == 2 and cfg.num_machines == 1 and cfg.machine_rank == 0
    assert str(cfg.mixed_precision) in ("no", "PrecisionType.NO")
