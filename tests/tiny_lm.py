"""Tiny random-weight language models with an offline word-level tokenizer
covering the SVA vocabulary, saved as Hugging Face model directories."""

from __future__ import annotations

import re

import torch


def _vocab():
    from semitriton.sva import templates as T
    words = set()
    for p in T.generate():
        words.update(re.findall(r"\w+", p.prefix + p.target + p.foil))
    words.update(["keys", "cabinet", "are", "is", "The", "to", "the"])
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(_vocab())}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")


def save_causal(path, seed=0):
    import transformers as t
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = t.LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = t.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_masked(path, seed=0):
    import transformers as t
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = t.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    model = t.BertForMaskedLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
