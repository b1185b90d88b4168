"""Write the shipped tiny Llama as a local checkpoint directory, with a byte-level tokenizer.

    python -m swiglu_hf.tools.tiny_checkpoint ./tiny-llama      # ~3 MB, random init, no download

The directory is what a real checkpoint looks like to `from_pretrained` and
`AutoTokenizer.from_pretrained` (config.json, model.safetensors, tokenizer.json, ...), so the
real-model path of `swiglu-hf finetune --model DIR` and examples/finetune.py can be tried (and
is tested) without a download. The tokenizer maps each UTF-8 byte to its own id (0-255) and has
<pad>=256, <s>=257, </s>=258, matching byte_llama.json. The weights are random (seeded): this
is a stand-in for a checkpoint, not a pretrained model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
SPECIALS = {"<pad>": 256, "<s>": 257, "</s>": 258}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A PreTrainedTokenizerFast whose ids are the UTF-8 bytes of the text (0-255) plus 3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update(SPECIALS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=2048)


def save_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """The shipped tiny Llama (random init from `seed`) and the byte tokenizer, saved to `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((DATA_DIR / "byte_llama.json").read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m swiglu_hf.tools.tiny_checkpoint DIR")
    print(f"wrote {save_tiny_checkpoint(sys.argv[1])}")
