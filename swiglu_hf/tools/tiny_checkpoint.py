"""Write the shipped tiny Llama as a local checkpoint directory, with a byte-level tokenizer.

    python -m swiglu_hf.tools.tiny_checkpoint ./tiny-llama           # ~3 MB, random init, no download
    python -m swiglu_hf.tools.tiny_checkpoint ./tiny-llama.gguf      # the same as one GGUF file (needs gguf)

The directory is what a real checkpoint looks like to `from_pretrained` and
`AutoTokenizer.from_pretrained` (config.json, model.safetensors, tokenizer.json, ...), so the
real-model path of `swiglu-hf finetune --model DIR` and examples/finetune.py can be tried (and
is tested) without a download. The .gguf form is what llama.cpp's converter writes for a Llama
(fp32 tensors, q/k rows in its rotary order, a byte-level "gpt2" tokenizer), so `--model FILE.gguf`
is tested the same way. The tokenizer maps each UTF-8 byte to its own id (0-255) and has
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


def _tiny_model(seed: int):
    """The shipped tiny Llama (byte_llama.json), random init from `seed`, without touching the global RNG."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((DATA_DIR / "byte_llama.json").read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def save_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """The shipped tiny Llama (random init from `seed`) and the byte tokenizer, saved to `path`."""
    model, path = _tiny_model(seed), Path(path)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def _rotary_rows(weight, heads: int):
    """q/k projection rows in llama.cpp's order (the inverse of transformers' GGUF reverse permute)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """The same tiny Llama and byte tokenizer as one fp32 GGUF file at `path` (needs `pip install gguf`)."""
    try:
        import gguf
    except ImportError:
        from .finetune.data import MissingDependencyError

        raise MissingDependencyError("writing a .gguf needs the `gguf` package: pip install gguf") from None
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    model = _tiny_model(seed)
    path, c = Path(path), model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("swiglu_hf tiny llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    vocab = byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE; no merges: one token per byte
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if vocab[t] in SPECIALS.values() else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([])
    writer.add_pad_token_id(SPECIALS["<pad>"])
    writer.add_bos_token_id(SPECIALS["<s>"])
    writer.add_eos_token_id(SPECIALS["</s>"])
    names = {hf: gg for gg, hf in get_gguf_hf_weights_map(model, TensorProcessor(), "llama", c.num_hidden_layers).items()}
    heads = {"q_proj.weight": c.num_attention_heads, "k_proj.weight": c.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        head_count = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        if head_count:
            array = _rotary_rows(array, head_count)
        writer.add_tensor(names[name], np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m swiglu_hf.tools.tiny_checkpoint DIR|FILE.gguf")
    target = sys.argv[1]
    try:
        print(f"wrote {(save_tiny_gguf if target.endswith('.gguf') else save_tiny_checkpoint)(target)}")
    except ImportError as err:  # the gguf package: one line saying what to install
        raise SystemExit(f"error: {err}") from None
