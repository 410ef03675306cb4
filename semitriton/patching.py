"""Drop-in patching of PyTorch and Hugging Face models.

``patch(model)`` swaps, in place, the modules whose autograd graph is not
canonical (one primitive per op, as the README's "Semirings" says) for
modules with the same forward numerics and a single custom autograd node
carrying its semiring rule:

* RMS norms (``nn.RMSNorm``; transformers' LlamaRMSNorm, Qwen2/Qwen3RMSNorm,
  MistralRMSNorm, and Gemma's ``1 + weight`` form; any other class named
  ``*RMSNorm`` or ``*T5LayerNorm`` whose forward is γ·x·rsqrt(mean(x²)+eps)
  with γ = weight or 1 + weight, checked on the module) -> :class:`CanonicalRMSNorm`;
* composed elementwise activations (GPT-2's tanh-GELU ``NewGELUActivation``
  and friends) -> :class:`CanonicalElementwise`;
* rotary position embeddings of attention modules that call their modeling
  file's standard ``apply_rotary_pos_emb`` (LLaMA, Mistral, Qwen2/3, Gemma)
  -> one :class:`RotaryEmbedding` node per q/k instead of seven aten nodes
  (same numerics and statistics, fewer nodes to walk);
* attention of Hugging Face models that dispatch through
  ``ALL_ATTENTION_FUNCTIONS`` (BERT, GPT-2, LLaMA, ...) -> one
  :class:`FusedAttention` node per call, by registering a ``"semitriton"``
  attention implementation and selecting it on the model's config.

Calls the fused node cannot serve run the model's own attention (the
modeling file's eager attention for soft-capping, attention sinks and
``output_attentions``; sdpa for dropout, position bias and a learned mask),
recorded as aten nodes.

A swapped module is a copy of the original object whose class is a subclass
of the original class (so ``isinstance`` checks and ``state_dict`` keys are
unchanged, and it shares the original's parameters); ``unpatch`` puts the
original objects back and restores the config. LayerNorm's aten node is
already one canonical primitive and stays; nn.Linear (and GPT-2's Conv1D)
is swapped only with ``linear=True``: its aten graph is canonical too, the
swap only removes nodes from the walk (see bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .errors import user_stacklevel
from .fused import CanonicalElementwise, CanonicalLinear, CanonicalRMSNorm, apply_rotary, fused_attention
from .fused.rope import CONVENTIONS as ROPE_CONVENTIONS
from .fused.rope import apply_rotary_pairs
from .tracking import track, untrack

log = logging.getLogger("semitriton")

_RECORD = "_semitriton_patch"
ATTN_NAME = "semitriton"


# ---- which modules ------------------------------------------------------------------------
# (module path, class name, gamma offset)
_RMS_NORMS = [
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 0.0),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", 0.0),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", 0.0),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", 0.0),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", 1.0),
]
# composed activations that are not a single aten node
_ACTIVATIONS = [
    ("transformers.activations", "NewGELUActivation"),
    ("transformers.activations", "FastGELUActivation"),
    ("transformers.activations", "QuickGELUActivation"),
    ("transformers.activations", "GELUTanh"),
    ("transformers.models.bloom.modeling_bloom", "BloomGelu"),
]
#: the ones that compute a function with a fused rule (``Semiring.activation``):
#: 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))), FastGELU's constant 0.7978845608 and BLOOM's
#: 0.79788456 included (they move f' by < 1e-8 relative)
_ACTIVATION_KINDS = {"NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                     "BloomGelu": "gelu_tanh"}
#: class-name endings of norms that are RMS norms without being listed above
#: (Phi3, OLMo2, Granite, SmolLM3, GLM, Gemma3, Mixtral, T5 and its kin, ...);
#: each module is checked against the formula, with offset 0 then 1
_RMS_NAME_ENDINGS = ("RMSNorm", "T5LayerNorm")


def _load(path: str, name: str):
    try:
        mod = __import__(path, fromlist=[name])
    except Exception:
        return None
    return getattr(mod, name, None)


@functools.lru_cache(maxsize=None)
def _rms_classes() -> dict:
    out = {nn.RMSNorm: 0.0} if hasattr(nn, "RMSNorm") else {}
    for path, name, offset in _RMS_NORMS:
        cls = _load(path, name)
        if cls is not None:
            out[cls] = offset
    return out


def _rms_offset(module, known: dict, weightless: bool = False) -> Optional[float]:
    """The γ offset with which ``module`` computes γ·x·rsqrt(mean(x²)+eps)
    (0 or 1, the listed offset for a listed class; 0 with γ = 1 for a norm
    whose forward ignores its weight, ``weightless``), or None if it does
    not."""
    if weightless:
        return 0.0 if _rms_formula_matches(module, 0.0, weightless=True) else None
    cls = type(module)
    offsets = (known[cls],) if cls in known else (0.0, 1.0)
    return next((o for o in offsets if _rms_formula_matches(module, o)), None)


def _rms_weight_ignored(module) -> bool:
    """A norm with a ``weight`` that its forward does not read: FalconMamba's
    weightless norm keeps a dummy buffer of ones and is applied to rows of
    other widths. Its outputs are the same bits with the weight replaced by
    random values (a weight of ones at patch time, as at initialisation,
    cannot pass for an unused one)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() == 0 or w.device.type == "meta":
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.shape[-1], generator=g).to(w.device, w.dtype)
    other = (torch.rand(w.shape, generator=g) + 2.0).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            y = type(module).forward(module, x)
            y_other = torch.func.functional_call(module, {"weight": other}, (x,))
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and isinstance(y_other, torch.Tensor) and torch.equal(y, y_other)


def _on_meta(module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.device.type == "meta"


def _is_rms_candidate(cls, known: dict) -> bool:
    return cls in known or (cls.__name__.endswith(_RMS_NAME_ENDINGS) and not cls.__module__.startswith("torch."))


#: torch's norm modules, each recorded as one canonical node
_TORCH_NORMS = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if c is not None)


#: a norm class's name: ...Norm or ...Normalization, or with a tag after it (NemotronLayerNorm1P,
#: FrozenBatchNorm2d, Mamba's RMSNormGated); not a module named after one (PreLayerNormSelfAttention)
_NORM_NAME = re.compile(r"Norm(alization)?([0-9][A-Za-z]?|[0-9]?[A-Z]|Gated)?$")
#: a forward that calls torch's layer/group norm records its one canonical node
_TORCH_NORM_CALL = re.compile(r"\b(layer_norm|group_norm)\(")


def _composed_norm(module: nn.Module) -> bool:
    """A norm module outside torch, with a forward of its own, that patch()
    does not swap: its forward is walked as its aten ops (pow, mean, rsqrt,
    ...), not as one primitive. Not: a subclass of nn.LayerNorm that keeps
    torch's forward, or a forward that calls ``F.layer_norm``/``F.group_norm``
    (OLMo's parameter-free norm, Nemotron's 1 + weight), which record torch's
    one node; a container that normalises with torch norm modules, such as
    StableLM's per-head layer norm, records theirs; a module whose name only
    contains "Norm" (RobertaPreLayerNormSelfAttention)."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or not _NORM_NAME.search(cls.__name__):
        return False
    fwd = getattr(cls, "forward", None)
    if fwd is None or getattr(fwd, "__module__", "").startswith("torch."):
        return False
    if any(isinstance(m, _TORCH_NORMS) for m in module.modules() if m is not module):
        return False
    return not _TORCH_NORM_CALL.search(_source(fwd))


@functools.lru_cache(maxsize=None)
def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


@functools.lru_cache(maxsize=None)
def _activation_classes() -> tuple:
    return tuple(c for c in (_load(p, n) for p, n in _ACTIVATIONS) if c is not None)


# ---- patched classes ------------------------------------------------------------------------
def _rms_eps(module) -> Optional[float]:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(module, attr):
            return getattr(module, attr)
    return None


def _rms_formula_matches(module, offset: float, weightless: bool = False) -> bool:
    """Guard against a transformers version whose norm differs: compare the
    module with γ·x·rsqrt(mean(x²)+eps) on a small random input (γ = 1 if
    ``weightless``)."""
    w = getattr(module, "weight", None)
    n = w.shape[-1] if w is not None else getattr(module, "normalized_shape", (8,))[-1]
    dev = w.device if w is not None else torch.device("cpu")
    if dev.type == "meta":
        return True
    eps = _rms_eps(module)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        try:
            y = type(module).forward(module, x.to(w.dtype) if w is not None else x).double()
        except Exception:
            return False
        xd = x.to(w.dtype).double() if w is not None else x.double()
        e = torch.finfo(xd.dtype if w is None else w.dtype).eps if eps is None else eps
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + e)
        if w is not None and not weightless:
            ref = ref * (w.double() + offset)
        if y.shape != ref.shape:            # allclose would broadcast
            return False
    tol = 1e-4 if (w is None or w.dtype == torch.float32) else 3e-2
    return bool(torch.allclose(y, ref, rtol=tol, atol=tol))


def _patched_rms_forward(self, x):
    cls = self._semitriton_original_class
    impl = functools.partial(cls.forward, self)
    eps = _rms_eps(self)                # read per call: the user may change it after patching
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    weight = None if getattr(self, "_semitriton_weightless", False) else getattr(self, "weight", None)
    return CanonicalRMSNorm.apply(x, weight, impl, eps, self._semitriton_offset)


def _patched_linear_forward(self, x):
    return CanonicalLinear.apply(x, self.weight, self.bias, self._semitriton_transposed)


def _patched_activation_forward(self, x):
    cls = self._semitriton_original_class
    return CanonicalElementwise.apply(x, functools.partial(cls.forward, self),
                                      _ACTIVATION_KINDS.get(cls.__name__))


def _restore_patched(cls, kind: str):
    """Unpickling a swapped module: an empty instance of its patched class (the
    class is made at run time, so pickle cannot find it by name)."""
    return object.__new__(_patched_class(cls, kind))


def _reduce_patched(self, protocol):
    return _restore_patched, (self._semitriton_original_class, self._semitriton_kind), self.__dict__


@functools.lru_cache(maxsize=None)
def _patched_class(cls, kind: str):
    forward = {"rms_norm": _patched_rms_forward, "activation": _patched_activation_forward,
               "linear": _patched_linear_forward, "rope": _patched_rope_forward}[kind]
    return type("Semiring" + cls.__name__, (cls,), {
        "forward": forward,
        "__reduce_ex__": _reduce_patched,
        "_semitriton_original_class": cls,
        "_semitriton_kind": kind,
        "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} recorded as one canonical semiring node (semitriton.patch).",
    })


def _swap(module: nn.Module, kind: str, **attrs) -> nn.Module:
    new = object.__new__(_patched_class(type(module), kind))
    new.__dict__ = dict(module.__dict__)          # shares parameters, buffers and hooks
    for k, v in attrs.items():
        object.__setattr__(new, k, v)
    return new


# ---- rotary position embedding ----------------------------------------------------------------
# A patched attention module runs its original forward with a thread-local
# flag set; the modeling file's rotary function is replaced (while any patched
# module uses it) by a dispatcher that records RotaryEmbedding nodes when the
# flag is set and calls the original otherwise, so other models in the process
# are unaffected. Two forms: ``apply_rotary_pos_emb(q, k, cos, sin,
# unsqueeze_dim)`` (rotate-half; LLaMA and most), one node per tensor, and
# ``apply_rotary_emb(xq, xk, freqs_cis)`` (complex pairs; LLaMA 4,
# DeepSeek-V2), whose complex product has no semiring edges at all.
_ROPE_FORMS = {"apply_rotary_pos_emb": ["q", "k", "cos", "sin", "unsqueeze_dim"],
               "apply_rotary_emb": ["xq", "xk", "freqs_cis"]}
_rope_state = threading.local()
_rope_installed: dict = {}          # modeling module name -> (function name, original, WeakSet of patched users)
_rope_lock = threading.Lock()


@contextlib.contextmanager
def _rope_active():
    _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
    try:
        yield
    finally:
        _rope_state.depth -= 1


def _rotary_fusable(q, k, consts, width: int) -> bool:
    """q and k (one of them requiring grad) rotated by position tables
    ``consts`` (no grad) whose last dim is ``width``, while autograd records."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, *consts)) or not torch.is_grad_enabled():
        return False
    if any(c.requires_grad for c in consts) or not (q.requires_grad or k.requires_grad):
        return False
    d = q.shape[-1]
    return (q.is_floating_point() and k.is_floating_point() and d % 2 == 0 and k.shape[-1] == d
            and all(c.shape[-1] == width for c in consts))


def _rope_fusable(q, k, cos, sin, unsqueeze_dim) -> bool:
    return isinstance(unsqueeze_dim, int) and isinstance(q, torch.Tensor) and \
        _rotary_fusable(q, k, (cos, sin), q.shape[-1])


def _pairs_fusable(xq, xk, freqs_cis) -> bool:
    return isinstance(xq, torch.Tensor) and isinstance(freqs_cis, torch.Tensor) and freqs_cis.is_complex() and \
        _rotary_fusable(xq, xk, (freqs_cis,), xq.shape[-1] // 2)


def _rope_dispatcher(name: str, original, form):
    """The dispatcher for ``name``; ``form``: the rotate-half convention, or
    the complex form's unsqueeze dim. A call is bound to the original's
    signature (Qwen4-Exp's indexer rotates q alone: k=None); one the node
    cannot take (not both q and k, a partial rotary dim, ...) runs the
    original."""
    sig = inspect.signature(original)
    fusable, fused = ((_pairs_fusable, lambda a: apply_rotary_pairs(a["xq"], a["xk"], a["freqs_cis"], original, form))
                      if name == "apply_rotary_emb" else
                      (_rope_fusable, lambda a: apply_rotary(a["q"], a["k"], a["cos"], a["sin"], a["unsqueeze_dim"],
                                                             form)))

    names = list(sig.parameters)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}

    @functools.wraps(original)
    def dispatcher(*args, **kwargs):
        if getattr(_rope_state, "depth", 0):
            if not kwargs and len(args) <= len(names) and all(n in defaults for n in names[len(args):]):
                bound = {**defaults, **dict(zip(names, args))}          # the usual call: 1 us, not 7
            else:
                try:
                    b = sig.bind(*args, **kwargs)
                    b.apply_defaults()
                    bound = b.arguments
                except TypeError:
                    bound = None
            if bound is not None and fusable(**bound):
                return fused(bound)
        return original(*args, **kwargs)

    dispatcher._semitriton_original = original
    return dispatcher


def _current_rope_fn(modname: str, name: str):
    fn = getattr(sys.modules.get(modname), name, None)
    return getattr(fn, "_semitriton_original", fn)


def _same_outputs(want, got) -> bool:
    return all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(want, got))


def _rotated_pairs(x, freqs, dim):
    """The complex form of RoPE in real arithmetic, in float64 (the check's reference)."""
    f = freqs.unsqueeze(dim)
    xr, xi = x.double().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = f.real.double(), f.imag.double()
    return torch.stack((xr * c - xi * s, xr * s + xi * c), dim=-1).flatten(-2)


def _rotates_pairs(fn, q, k, freqs, dim, tol) -> bool:
    try:
        with torch.no_grad():
            got = fn(q, k, freqs)
    except Exception:                   # freqs_cis does not broadcast at dim
        return False
    return all(y.dtype == x.dtype and y.shape == x.shape
               and torch.allclose(y.double(), _rotated_pairs(x, freqs, dim), rtol=tol, atol=tol)
               for x, y in zip((q, k), got))


@functools.lru_cache(maxsize=None)
def _rope_form(name: str, fn):
    """How the modeling file's ``name`` computes, if it is the standard form
    (same signature; small random inputs in float32 and with bfloat16 q/k).
    For ``apply_rotary_pos_emb``, the :func:`apply_rotary` convention that
    reproduces its outputs bit for bit (values and dtypes; cos/sin in
    bfloat16 and in float32: models pass either). For ``apply_rotary_emb``,
    whose forward the patched node runs as it is, the dim at which freqs_cis
    broadcasts over the heads (LLaMA 4: 2, q as [B, T, H, D]; DeepSeek-V2:
    1, [B, H, T, D]) with which it is the rotation of adjacent pairs (to
    float32 rounding, in q's dtype). None if it is neither."""
    try:
        if list(inspect.signature(fn).parameters) != _ROPE_FORMS[name]:
            return None
        g = torch.Generator().manual_seed(0)
        bf = torch.bfloat16
        q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 4, 3, 8, generator=g)
        if name == "apply_rotary_emb":
            for dim in (1, 2):
                shape = [s for i, s in enumerate(q.shape[:-1]) if i != dim] + [4]
                freqs = torch.polar(1.0 + torch.rand(shape, generator=g), torch.randn(shape, generator=g))
                if all(_rotates_pairs(fn, pq, pk, freqs, dim, tol) for pq, pk, tol in
                       ((q, k, 1e-5), (q.to(bf), k.to(bf), 1e-2))):
                    return dim
            return None
        k = k[:, :2]
        cos, sin = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
        probes = [(q, k, cos, sin), (q.to(bf), k.to(bf), cos.to(bf), sin.to(bf)), (q.to(bf), k.to(bf), cos, sin)]
        with torch.no_grad():
            wants = [fn(*p) for p in probes]
        for convention in ROPE_CONVENTIONS:
            if all(_same_outputs(want, apply_rotary(pq.clone().requires_grad_(), pk.clone().requires_grad_(), pc,
                                                    ps, 1, convention))
                   for (pq, pk, pc, ps), want in zip(probes, wants)):
                return convention
        return None
    except Exception:
        return None


def _rope_fn_name(modname: str, src: Optional[str] = None) -> Optional[str]:
    """The standard rotary function of the modeling module ``modname`` (that
    ``src``, an attention forward's source, calls), or None."""
    for name in _ROPE_FORMS:
        fn = _current_rope_fn(modname, name)
        if fn is None or not callable(fn):
            continue
        if src is not None and not re.search(rf"(?<![\w.]){name}\(", src):
            continue
        if _rope_form(name, fn) is not None:
            return name
    return None


@functools.lru_cache(maxsize=None)
def _rope_module(cls) -> Optional[str]:
    """The modeling module whose standard rotary function this attention
    class calls, or None."""
    modname = getattr(cls, "__module__", "")
    if modname not in sys.modules:
        return None
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    return modname if _rope_fn_name(modname, src) is not None else None


def _install_rope(modname: str, user: nn.Module) -> None:
    with _rope_lock:
        entry = _rope_installed.get(modname)
        if entry is None:
            name = _rope_fn_name(modname)
            if name is None:
                return
            mod = sys.modules[modname]
            original = getattr(mod, name)
            entry = _rope_installed[modname] = (name, original, weakref.WeakSet())
            setattr(mod, name, _rope_dispatcher(name, original, _rope_form(name, original)))
        entry[2].add(user)


def _uninstall_rope(modname: str, user: nn.Module) -> None:
    """``user`` no longer needs the dispatcher (a deep copy's modules were never
    registered: unpatching the copy leaves the original's in place)."""
    with _rope_lock:
        entry = _rope_installed.get(modname)
        if entry is None:
            return
        name, original, users = entry
        users.discard(user)
        if not users:
            mod = sys.modules.get(modname)
            if mod is not None and getattr(getattr(mod, name, None), "_semitriton_original", None) is original:
                setattr(mod, name, original)
            del _rope_installed[modname]


def _patched_rope_forward(self, *args, **kwargs):
    with _rope_active():
        return self._semitriton_original_class.forward(self, *args, **kwargs)


# ---- attention ---------------------------------------------------------------------------------
#: attention-interface arguments that change the attention function itself
#: (logit soft-capping, attention sinks): the fused node does not compute
#: them, so the modeling file's eager attention runs instead
_EAGER_ONLY = ("softcap", "s_aux", "sinks")


def _eager_attention(module, query, key, value, attention_mask, causal: bool, why: str, **kwargs):
    """The modeling file's own ``eager_attention_forward`` (what the model runs
    with ``attn_implementation="eager"``; its aten nodes have rules), given the
    additive float mask it expects: the "semitriton" mask builder
    (transformers' ``sdpa_mask``) gives a boolean mask, or None for plain
    causal attention."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"semitriton attention: {type(module).__name__} needs {why}, which the fused attention node "
            "does not compute, and its modeling file has no eager_attention_forward to fall back on; "
            "use semitriton.patch(model, attention=False) or semitriton.unpatch(model)")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] > kv_len:     # (as the fused path)
        attention_mask = attention_mask[..., :kv_len]
    if attention_mask is None and causal and q_len > 1:      # queries are the last q_len positions
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, attention_mask, **kwargs)


def _attentions_requested(kwargs) -> bool:
    """Does this forward return attention probabilities? Modules that take
    ``output_attentions`` as their own argument (GPT-2) do not pass it on,
    so transformers' output collector (which records them) is asked too."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except Exception:           # another transformers version: the keyword is all there is
        return False
    return bool(collected) and any(k.endswith("attentions") for k in collected)


def semitriton_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                 **kwargs):
    """A transformers attention interface function: same conventions as
    ``sdpa_attention_forward`` (q, k, v [B, H, T, D]; returns [B, T, H, D]),
    recorded as one :class:`FusedAttention` node. Where the call needs more
    than that node computes, the model's own attention runs and its aten nodes
    are walked: the modeling file's eager attention for soft-capping, attention
    sinks and ``output_attentions=True`` (which returns the probabilities);
    sdpa for training-mode dropout, a T5-style position bias, or a mask that
    requires grad (a learned bias; sdpa passes its gradient on)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    eager_only = [k for k in _EAGER_ONLY if kwargs.get(k) is not None]
    if _attentions_requested(kwargs):
        eager_only.append("output_attentions=True")
    if eager_only:
        if scaling is None:          # eager functions multiply by it (sdpa's default: 1/sqrt(head dim))
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        return _eager_attention(module, query, key, value, attention_mask, bool(causal), " and ".join(eager_only),
                                dropout=dropout, scaling=scaling, **kwargs)
    if (dropout and dropout > 0 or kwargs.get("position_bias") is not None
            or (attention_mask is not None and attention_mask.requires_grad)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]
    out = fused_attention(query, key, value, attention_mask, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except Exception:
        return False
    AttentionInterface.register(ATTN_NAME, semitriton_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return True


#: id(config) -> [its settings before the first patch as (weak reference, implementation),
#: patched models using it, the finalizer that drops the entry] (models built from one config
#: object share it: the last unpatch restores it). Weak, and dropped when the config dies: a
#: patched model deleted without unpatch leaves nothing behind.
_attn_configs: dict = {}
_attn_lock = threading.RLock()            # re-entered by _forget_config when a GC runs inside


def _forget_config(key: int, entry: list) -> None:
    with _attn_lock:
        if _attn_configs.get(key) is entry:
            del _attn_configs[key]


def _strong(settings: list) -> list:
    """(config, implementation) pairs of a registry entry whose configs are alive."""
    return [(c, prev) for c, prev in ((r(), prev) for r, prev in settings) if c is not None]


def _config_tree(cfg) -> list:
    """``cfg`` and its sub-configs (nested), parents before children."""
    out, stack, seen = [], [cfg], set()
    while stack:
        c = stack.pop(0)
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        for key in getattr(c, "sub_configs", None) or {}:
            sub = getattr(c, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return out


def _select_attention(cfg, settings: Optional[list] = None) -> list:
    """Count one more patched model using ``cfg``; the first selects the
    "semitriton" attention on it (transformers' setter passes it on to the
    sub-configs). Returns each config's previous implementation: read now, or
    ``settings``, the ones a copied record carries (its config already reads
    "semitriton")."""
    with _attn_lock:
        entry = _attn_configs.get(id(cfg))
        if entry is None:
            if settings is None:
                settings = [(c, c._attn_implementation) for c in _config_tree(cfg)]
            entry = _attn_configs[id(cfg)] = [[(weakref.ref(c), prev) for c, prev in settings], 0, None]
            entry[2] = weakref.finalize(cfg, _forget_config, id(cfg), entry)
            cfg._attn_implementation = ATTN_NAME
        entry[1] += 1
        return _strong(entry[0])


def _release_attention(cfg, settings: list) -> None:
    """Undo :func:`_select_attention` once no patched model uses ``cfg``; a
    config the user has set to something else since keeps that. ``settings``:
    the record's copy, used where the registry has no entry for ``cfg``."""
    with _attn_lock:
        entry = _attn_configs.get(id(cfg))
        if entry is not None:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _attn_configs[id(cfg)]
            entry[2].detach()                                          # the config lives on: no finalizer left
            settings = _strong(entry[0])
        now = [c._attn_implementation for c, _ in settings]       # before the setter cascades
        for (c, prev), cur in zip(settings, now):                  # parents first: children win
            c._attn_implementation = prev if cur == ATTN_NAME else cur


def _uses_attention_interface(module: nn.Module) -> bool:
    cls = getattr(type(module), "_semitriton_original_class", type(module))
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


# ---- public API ------------------------------------------------------------------------------------
@dataclass
class PatchRecord:
    swapped: list = field(default_factory=list)          # (parent or None for the model, name, original, patched)
    attention_configs: list = field(default_factory=list)  # (config, [(config or sub-config, previous implementation)])
    attention_modules: int = 0
    rope_modules: list = field(default_factory=list)        # (modeling module name, patched attention module)
    tracked_here: bool = False
    skipped: list = field(default_factory=list)

    def __setstate__(self, state):
        """An unpickled or deep-copied patched model: set up again what its
        patch set up in the process (the attention function, the rotary
        dispatcher, the use count of its config), so that it runs as patched
        and ``unpatch`` undoes exactly its own part."""
        self.__dict__.update(state)
        if self.attention_configs:
            _register_attention()
        for modname, user in self.rope_modules:
            if modname in sys.modules:
                _install_rope(modname, user)
        for cfg, settings in self.attention_configs:
            _select_attention(cfg, settings)

    def summary(self) -> dict:
        kinds: dict = {}
        for _, _, orig, new in self.swapped:
            if getattr(type(new), "_semitriton_kind", None) != "rope":
                kinds[type(orig).__name__] = kinds.get(type(orig).__name__, 0) + 1
        return {"swapped": kinds, "attention_modules": self.attention_modules,
                # a layer without rotary embedding (SmolLM3's no_rope_layers, Llama4's) is swapped, but not counted
                "rotary_modules": sum(bool(getattr(m, "use_rope", True)) for _, m in self.rope_modules),
                "attention_implementation": ATTN_NAME if self.attention_configs else None,
                "skipped": list(self.skipped)}

    def describe(self) -> str:
        s = self.summary()
        parts = [f"{n}× {k}" for k, n in sorted(s["swapped"].items())]
        if s["attention_modules"]:
            parts.append(f"{s['attention_modules']}× attention -> one fused node per call (a call whose mask "
                         "or bias requires grad, as a learned relative-position bias, runs SDPA's own graph)")
        if s["rotary_modules"]:
            parts.append(f"{s['rotary_modules']}× rotary embedding -> one node per q/k (where the whole head "
                         "dimension rotates)")
        if s["skipped"]:
            parts.append(f"left as is: {'; '.join(s['skipped'])}")
        return "semitriton.patch: " + (", ".join(parts) if parts else "nothing to swap (aten rules apply)")


def _conv1d_class():
    return _load("transformers.pytorch_utils", "Conv1D")


def patch(model: nn.Module, *, norms: bool = True, activations: bool = True, attention: bool = True,
          rope: bool = True, linear: bool = False, verbose: bool = False) -> nn.Module:
    """Swap non-canonical modules of ``model`` in place (see module docstring);
    returns ``model``. ``rope=False`` leaves rotary embeddings as aten nodes.
    ``linear=True`` also records each nn.Linear / GPT-2 Conv1D as one node
    instead of view/addmm/view (fewer nodes to walk). Patching twice changes
    nothing. ``verbose`` prints the
    summary (also in ``patch_summary(model)``); module names are tracked for
    error messages and path readouts."""
    if getattr(model, _RECORD, None) is not None:
        return model
    rec = PatchRecord()
    rms = _rms_classes()
    acts = _activation_classes()
    reported: set = set()             # classes named once in the summary's skipped list
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None or getattr(type(child), "_semitriton_original_class", None):
                continue
            cls = type(child)
            new = None
            if norms and _is_rms_candidate(cls, rms):
                unchecked = cls not in rms and _on_meta(child)
                weightless = not unchecked and _rms_weight_ignored(child)
                offset = None if unchecked else _rms_offset(child, rms, weightless)
                if unchecked:
                    rec.skipped.append(f"{parent_name + '.' if parent_name else ''}{name} ({cls.__name__}): "
                                       "its forward cannot be checked on the meta device (patch after loading "
                                       "the weights)")
                elif offset is not None:
                    new = _swap(child, "rms_norm", _semitriton_offset=offset, _semitriton_weightless=weightless)
                else:
                    rec.skipped.append(f"{parent_name + '.' if parent_name else ''}{name} ({cls.__name__}): "
                                       "forward differs from γ·x·rsqrt(mean(x²)+eps)")
            elif norms and _composed_norm(child) and cls.__name__ not in reported:
                reported.add(cls.__name__)
                rec.skipped.append(f"{cls.__name__} (e.g. {parent_name + '.' if parent_name else ''}{name}): "
                                   "a norm semitriton does not know, walked as its aten ops (not one primitive)")
            elif activations and isinstance(child, acts) and cls in acts:
                new = _swap(child, "activation")
            elif linear and cls is nn.Linear:
                new = _swap(child, "linear", _semitriton_transposed=False)
            elif linear and isinstance(child, nn.Linear) and cls.__name__ not in reported:
                reported.add(cls.__name__)
                rec.skipped.append(f"{cls.__name__} (e.g. {parent_name + '.' if parent_name else ''}{name}): a "
                                   "subclass of nn.Linear, left as it is (linear=True swaps nn.Linear itself)")
            elif linear and _conv1d_class() is not None and cls is _conv1d_class():
                new = _swap(child, "linear", _semitriton_transposed=True)
            elif rope and (modname := _rope_module(cls)) is not None:
                new = _swap(child, "rope")
                _install_rope(modname, new)
                rec.rope_modules.append((modname, new))
            if new is not None:
                parent._modules[name] = new
                # the model itself as None: the record is the model's attribute, and a reference back
                # would keep a deleted model (and its cached weight transforms) alive until a gc run
                rec.swapped.append((None if parent is model else parent, name, child, new))
    if (norms and _is_rms_candidate(type(model), rms)) or (activations and type(model) in acts):
        msg = (f"the model itself is a {type(model).__name__}, which patch() cannot replace (it swaps "
               "submodules in place): patch a module that contains it, e.g. nn.Sequential(module)")
        rec.skipped.append(msg)
        warnings.warn(f"semitriton.patch: {msg}", stacklevel=user_stacklevel())
    if attention:
        _patch_attention(model, rec)
    if not getattr(model, "_semitriton_track_handles", None):
        track(model)
        rec.tracked_here = True
    object.__setattr__(model, _RECORD, rec)
    msg = rec.describe()
    log.info(msg)
    if verbose:
        print(msg)
    return model


def _config_owners(model: nn.Module) -> list:
    """(qualified name, module) of the outermost modules that carry a
    transformers config (``config._attn_implementation``): the model itself,
    or the models inside a wrapper (a scoring module, nn.DataParallel, an
    nn.Sequential, ...); a model's own submodules are its (setting its config
    passes the choice on to its sub-configs)."""
    owners: list = []
    for name, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if cfg is None or not hasattr(cfg, "_attn_implementation"):
            continue
        if any(o == "" or name.startswith(o + ".") for o, _ in owners):
            continue
        owners.append((name, m))
    return owners


def _patch_attention(model: nn.Module, rec: PatchRecord) -> None:
    """Select the fused attention for every attention module of the models in
    ``model`` that goes through transformers' attention interface: on the
    model's config (which passes it on to its sub-configs) and on each other
    config those modules read (``module.config``: T5's stacks and a backbone
    inside a scoring model hold configs of their own, which setting the outer
    one does not reach)."""
    for name, owner in _config_owners(model):
        where = f" ({name}: {type(owner).__name__})" if name else ""
        attn = [m for m in owner.modules() if _uses_attention_interface(m)]
        if not attn:
            continue
        if getattr(owner, "_supports_sdpa", True) is False:
            rec.skipped.append(f"attention{where}: the model does not support sdpa, whose semantics the fused "
                               "node has")
            continue
        if not _register_attention():
            return
        configs = {id(owner.config): owner.config}
        for m in attn:
            cfg = getattr(m, "config", None)
            if hasattr(cfg, "_attn_implementation"):
                configs.setdefault(id(cfg), cfg)
        for cfg in configs.values():
            rec.attention_configs.append((cfg, _select_attention(cfg)))
        rec.attention_modules += len(attn)


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original module objects and attention implementation back."""
    rec = getattr(model, _RECORD, None)
    if rec is None:
        return model
    for parent, name, orig, new in reversed(rec.swapped):
        parent = model if parent is None else parent
        if parent._modules.get(name) is new:
            parent._modules[name] = orig
        # what was set on the swapped copy while patched (train()/eval(), attributes) carries over
        orig.__dict__.update({k: v for k, v in new.__dict__.items() if not k.startswith("_semitriton")})
    for cfg, settings in rec.attention_configs:
        _release_attention(cfg, settings)
    for modname, user in rec.rope_modules:
        _uninstall_rope(modname, user)
    if rec.tracked_here:
        untrack(model)
    object.__delattr__(model, _RECORD)
    return model


def patch_summary(model: nn.Module) -> Optional[dict]:
    rec = getattr(model, _RECORD, None)
    return None if rec is None else rec.summary()


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _RECORD, None) is not None
