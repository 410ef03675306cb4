"""Tiny random-weight Hugging Face models for the tests (no hub access)."""

from __future__ import annotations

import torch

transformers = None
try:
    import transformers  # noqa: F811
except ImportError:  # pragma: no cover
    pass


def tiny_config(kind: str, attn: str = "sdpa", **over):
    t = transformers
    if kind.startswith("bert"):
        cfg = t.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32, num_labels=3,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    elif kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    elif kind == "llama":
        cfg = t.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32)
    else:
        raise ValueError(kind)
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attn
    return cfg


def build(kind: str, attn: str = "sdpa", seed: int = 0, dtype=torch.float32, **over):
    t = transformers
    torch.manual_seed(seed)
    cfg = tiny_config(kind, attn, **over)
    cls = {"bert": t.BertForMaskedLM, "bert_cls": t.BertForSequenceClassification,
           "gpt2": t.GPT2LMHeadModel, "llama": t.LlamaForCausalLM}[kind]
    model = cls(cfg).to(dtype).eval()
    return model


def embeds_and_output(model, kind, ids, attention_mask=None, dtype=None):
    """Forward from input embeddings (a leaf that requires grad) to a scalar score."""
    emb = model.get_input_embeddings()(ids).detach().clone()
    if dtype is not None:
        emb = emb.to(dtype)
    emb.requires_grad_()
    out = model(inputs_embeds=emb, attention_mask=attention_mask)
    logits = out.logits
    if kind == "bert_cls":
        score = logits[:, 1] - logits[:, 0]
    else:
        score = logits[:, -1, 7] - logits[:, -1, 3]
    return emb, score
