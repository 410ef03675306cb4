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


def complex_rope_model(kind: str):
    """A tiny LLaMA 4 or DeepSeek-V2 (complex rotary embedding), fp32, eval."""
    t = transformers
    torch.manual_seed(0)
    if kind == "llama4":
        cfg = t.Llama4TextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, intermediate_size_mlp=24,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                 num_local_experts=2, pad_token_id=0, attention_chunk_size=4)
        return t.Llama4ForCausalLM(cfg).eval()
    cfg = t.DeepseekV2Config(vocab_size=50, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8,
                             q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4, n_group=1,
                             topk_group=1, pad_token_id=0)
    return t.DeepseekV2ForCausalLM(cfg).eval()
