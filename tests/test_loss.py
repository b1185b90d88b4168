"""swiglu_hf.loss: the chunked causal-LM loss equals the model's own loss and gradients (float64 rule), with
LoRA on the layers (frozen lm_head) or on lm_head itself, bf16, softcapped logits; refuses what it does
not know; and keeps no more than a chunk's logits alive."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from swiglu_hf.errors import UnsupportedLossError
from swiglu_hf.loss import ChunkedCausalLMLoss, chunked_causal_lm_loss, logit_steps
from swiglu_hf.memory import LiveTensorBytes
from swiglu_hf.numerics import rel_err
from swiglu_hf.verify_rule import FACTOR, FLOOR_ULPS


def _model(model_type="llama", **extra):
    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, p in peft.named_parameters():  # LoRA's B starts at zero: give the adapters gradients of their own
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return peft


def _run(model, ids, labels, chunked: int | None):
    model.zero_grad(set_to_none=True)
    loss = ChunkedCausalLMLoss(model, chunk_tokens=chunked)(ids, labels) if chunked else \
        model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _check(model, dtype, chunk_tokens=7):
    """The float64 rule of swiglu_hf.verify_rule: err(chunked) <= FACTOR * err(the model's own loss) + FLOOR_ULPS * eps
    per tensor, both against the model's own loss in float64. (The sums run in another order: not bitwise.)"""
    ids = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100  # ignored tokens: the mean is over the others
    reference = _run(copy.deepcopy(model).double(), ids, labels, None)
    low = copy.deepcopy(model).to(dtype)
    stock, chunked = _run(low, ids, labels, None), _run(low, ids, labels, chunk_tokens)
    eps = torch.finfo(dtype).eps
    pairs = [("loss", stock[0], chunked[0], reference[0])]
    pairs += [(n, stock[1][n], chunked[1][n], reference[1][n]) for n in reference[1]]
    assert len(pairs) > 3
    for name, s, c, r in pairs:
        se, ce = rel_err(s, r), rel_err(c, r)
        assert ce <= FACTOR * se + FLOOR_ULPS * eps, (name, ce, se)


def test_equals_the_models_own_loss_and_gradients_full_and_lora():
    model = _model()
    _check(model, torch.float32)
    _check(_lora(model, ["q_proj", "v_proj", "gate_proj", "down_proj"]), torch.float32)  # lm_head frozen
    _check(_lora(_model(), ["lm_head", "up_proj"]), torch.float32)  # lm_head LoRA-wrapped


def test_bf16_and_a_softcapped_family():
    _check(_model(), torch.bfloat16, chunk_tokens=16)
    gemma = _model("gemma2", final_logit_softcapping=5.0)  # a cap the logits reach at this scale
    assert logit_steps(gemma) == (("softcap", 5.0),)
    gemma.lm_head.weight.data *= 40
    _check(gemma, torch.float32)


class _ScaledLlama(LlamaForCausalLM):
    """A look-alike whose forward changes the logits in a way swiglu_hf.loss does not know."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits * 2 + 1
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size)
        return loss, logits


def test_refuses_logit_steps_it_does_not_know_and_aux_losses():
    model = _model()
    with pytest.raises(UnsupportedLossError, match=r"logits \* 2 \+ 1.*--loss model"):
        ChunkedCausalLMLoss(_ScaledLlama(model.config))
    moe = AutoConfig.for_model("mixtral", output_router_logits=True)
    with torch.device("meta"):
        mixtral = AutoModelForCausalLM.from_config(moe)
    with pytest.raises(UnsupportedLossError, match="output_router_logits"):
        ChunkedCausalLMLoss(mixtral)
    with pytest.raises(UnsupportedLossError, match="no transformers model"):
        ChunkedCausalLMLoss(nn.Linear(2, 2))


def _loss_peak(tokens: int, chunk: int | None, vocab=4096, hidden=64) -> int:
    """Live tensor bytes at the peak of the loss's forward and backward alone (fp32, one sequence)."""
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    tracker = LiveTensorBytes()
    with tracker:
        if chunk is None:  # what transformers does: the whole logits, float32, log-softmax
            loss = nn.functional.cross_entropy(head(h).float().view(-1, vocab)[:-1], labels.view(-1)[1:])
        else:
            loss = chunked_causal_lm_loss(h, head, labels, chunk_tokens=chunk)
        loss.backward()
    return tracker.peak


def test_peak_is_bounded_by_one_chunk_not_the_sequence():
    vocab, hidden, chunk = 4096, 64, 32
    logits_bytes = 4 * vocab  # per token, fp32
    for tokens in (256, 1024):
        peak = _loss_peak(tokens, chunk)
        # per chunk at most: logits, the log-softmax kept for backward, their gradients (4 tensors of chunk x
        # vocab); plus what grows with the sequence only by hidden (not vocab): the hidden states' gradient and
        # the gradients of the chunks before autograd sums them into it, the shifted labels and the weight's grad
        bound = 4 * chunk * logits_bytes + 4 * tokens * (2 * hidden + 3 * 8) + 2 * 4 * vocab * hidden
        assert peak <= bound, (tokens, peak, bound)
        assert _loss_peak(tokens, None) > 2 * tokens * logits_bytes  # stock: the whole sequence's logits, twice
    assert _loss_peak(1024, chunk) - _loss_peak(256, chunk) < 768 * logits_bytes / 8  # grows by hidden, not vocab
