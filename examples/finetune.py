"""Fine-tune a local Hugging Face causal LM with swiglu_hf's fused MLP, in plain accelerate.

    python examples/finetune.py --model ./SmolLM2-135M --data train.jsonl --out ./smollm2-ft
    accelerate launch --config_file examples/accelerate_configs/<engine>.yaml examples/finetune.py --model ... --data ...

Copy it and change what you need; the one swiglu_hf line is `apply_swiglu_patch(model)`.
--data is a .txt file or a .jsonl file with the text under --text-field. The model is a directory
holding safetensors weights and its tokenizer, or one .gguf file (weights and tokenizer; `pip install
gguf`; transformers dequantizes it to float at load, and --out gets ordinary safetensors); nothing is
downloaded. No model at hand? `python -m swiglu_hf.tools.tiny_checkpoint ./tiny-llama` (or
`./tiny-llama.gguf`) writes a tiny random-init one.
(`swiglu-hf finetune` is the stock-vs-patched comparison; this script is for real runs.)
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiglu_hf import apply_swiglu_patch, patched_modules
from swiglu_hf.tools.finetune.run import plain_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local model directory (config.json, *.safetensors, tokenizer) or a local .gguf file")
    p.add_argument("--data", required=True, help=".txt or .jsonl file")
    p.add_argument("--text-field", default="text", help="field of each .jsonl record that holds the text")
    p.add_argument("--out", default="finetuned", help="where the trained weights (or LoRA adapter) go")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (at most one pass over the data)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of the windows held out for eval")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and LoRA init")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights (needs peft)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--no-patch", action="store_true", help="train the stock model (to compare)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    return p.parse_args(argv)


def read_texts(path: Path, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [path.read_text(encoding="utf-8")]


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize, end each text with EOS, concatenate, cut into (N, seq_len) windows."""
    ids, eos = [], [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for text in texts:
        ids += tokenizer(text, verbose=False)["input_ids"] + eos
    n = len(ids) // seq_len
    if n < 2:
        raise SystemExit(f"{len(ids)} tokens is less than two windows of --seq-len {seq_len}: give more text")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main(argv=None):
    args = parse_args(argv)
    # The Accelerator comes first: under a DeepSpeed ZeRO-3 config it registers transformers'
    # HfDeepSpeedConfig, so from_pretrained below builds the model under deepspeed.zero.Init.
    if torch.cuda.is_available():
        accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    else:  # CPU-only box (gloo): accelerate 1.15 needs help to run the config's DDP/FSDP/DeepSpeed for real
        from swiglu_hf.tools.finetune.run import cpu_accelerator

        accelerator = cpu_accelerator(gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)  # LoRA init and the data order
    ds = accelerator.state.deepspeed_plugin
    zero3 = ds is not None and ds.zero_stage == 3
    if zero3:  # save_pretrained needs the full weights gathered from the shards
        ds.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True

    load = dict(local_files_only=True, trust_remote_code=args.trust_remote_code)
    model_path = Path(args.model)
    if model_path.suffix == ".gguf":  # one file: transformers reads it from its folder with gguf_file=
        source, load["gguf_file"] = model_path.parent, model_path.name
    else:
        source, load["use_safetensors"] = model_path, True
    tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in load.items() if k != "use_safetensors"})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **load)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    if not args.no_patch:
        apply_swiglu_patch(model)  # under ZeRO-3 it gathers each probed MLP's weights itself
    accelerator.print(f"fused MLPs: {len(patched_modules(model))}")

    windows = pack(tokenizer, read_texts(Path(args.data), args.text_field), args.seq_len)
    n_eval = max(1, int(len(windows) * args.eval_fraction))
    train, held_out = windows[:-n_eval], windows[-n_eval:]
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=shuffle, drop_last=True)
    eval_loader = DataLoader(held_out, batch_size=args.batch_size)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    model.train()
    step = 0
    for ids in train_loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            accelerator.print(f"step {step}/{args.max_steps}  loss {loss.item():.4f}")
            if step == args.max_steps:
                break

    model.eval()
    losses = []
    with torch.no_grad():
        for ids in eval_loader:
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(accelerator.gather_for_metrics(loss.detach().repeat(len(ids))))
    eval_loss = torch.cat(losses).mean().item()
    accelerator.print(f"eval loss {eval_loss:.4f} ({len(held_out)} held-out windows); "
                      f"engine {accelerator.distributed_type.value} ({type(model).__name__}), "
                      f"{accelerator.num_processes} process(es)")

    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu":  # FSDP's full state dict through accelerate segfaults on CPU
        from swiglu_hf.tools.finetune.run import full_state_dict

        state_dict = full_state_dict(accelerator, model)
    else:
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; call on every process
    unwrapped = accelerator.unwrap_model(model)
    with plain_checkpoint(unwrapped):  # a .gguf model: saved as ordinary safetensors (no-op otherwise)
        unwrapped.save_pretrained(
            args.out, state_dict=state_dict, is_main_process=accelerator.is_main_process,
            save_function=accelerator.save, safe_serialization=True,
        )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.out)
        print(f"saved {'the LoRA adapter' if args.lora else 'the model'} to {args.out}")
    accelerator.end_training()
    return eval_loss


if __name__ == "__main__":
    main()
