"""Subject-verb agreement minimal pairs from the templates of Marvin & Linzen
(2018), "Targeted Syntactic Evaluation of Language Models" (EMNLP 2018).

A language model is scored on the *next-token* logit of the verb, so each pair
is split at the scoring position: ``prefix`` is the sentence up to (not
including) the verb that must agree with the subject, and ``target`` / ``foil``
are the grammatical / ungrammatical verb forms with a leading space::

    simple    The author                           | smiles / smile
    prep      The author next to the guards        | smiles / smile
    subj_rel  The author that likes the guards     | smiles / smile
    obj_rel   The author that the guards like      | smiles / smile

For every condition with an attractor (``prep``, ``subj_rel``, ``obj_rel``)
the subject number (sg/pl) is crossed with the attractor number (sg/pl): four
cells; ``attractor_match`` is true when both have the same number.  ``simple``
has two cells (sg/pl subject, no attractor).  Inside the relative clauses the
embedded verb agrees with its own subject (the main subject in ``subj_rel``,
the attractor in ``obj_rel``), exactly as in the paper's templates.

The vocabulary below follows the paper's templates (``AgreementTerminals`` /
``AgreementTemplate`` in the authors' LM_syneval code: the ``MS``, ``ES``,
``MV``, ``EV`` and ``P`` terminals and the ``simple_agrmt``, ``prep_anim``,
``subj_rel`` and ``obj_rel_anim`` rules), with two documented departures:

* The four copular predicates "is tall/old/young/short" all give the same
  next-token pair " is" / " are" after the same prefix, so they are collapsed
  into one verb pair (otherwise every copular item would appear four times).
* "laughs" and "swims" are two tokens in common BPE vocabularies (SmolLM2:
  " laugh"+"s", " swim"+"s"), so at the next-token position only the stem
  would be scored.  They are replaced by "talks" and "walks", single tokens in
  both forms.  The paper's list is kept in :data:`PAPER_MATRIX_PREDICATES`.

Use :func:`single_token_pairs` to check a given tokenizer.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "CONDITIONS",
    "SUBJECT_NOUNS",
    "ATTRACTOR_NOUNS",
    "MATRIX_VERBS",
    "EMBEDDED_VERBS",
    "PREPOSITIONS",
    "PAPER_MATRIX_PREDICATES",
    "MinimalPair",
    "cells",
    "pairs_per_cell",
    "generate",
    "parse_conditions",
    "token_spans",
    "single_token_pairs",
]

# ---------------------------------------------------------------------------
# Vocabulary.  These lists follow the templates of Marvin & Linzen (2018)
# (terminals of their agreement templates); forms are (singular, plural).
# ---------------------------------------------------------------------------

DETERMINER = "the"
COMPLEMENTIZER = "that"

#: Animate main-clause subject nouns (the paper's ``MS`` terminal).
SUBJECT_NOUNS: tuple[tuple[str, str], ...] = (
    ("author", "authors"),
    ("pilot", "pilots"),
    ("surgeon", "surgeons"),
    ("farmer", "farmers"),
    ("manager", "managers"),
    ("customer", "customers"),
    ("officer", "officers"),
    ("teacher", "teachers"),
    ("senator", "senators"),
    ("consultant", "consultants"),
)

#: Animate attractor nouns: objects of prepositions and relative clauses, and
#: subjects of object relatives (the paper's ``ES`` terminal).  Disjoint from
#: SUBJECT_NOUNS.  "taxi driver" is a compound; its span covers both words.
ATTRACTOR_NOUNS: tuple[tuple[str, str], ...] = (
    ("guard", "guards"),
    ("chef", "chefs"),
    ("architect", "architects"),
    ("skater", "skaters"),
    ("dancer", "dancers"),
    ("minister", "ministers"),
    ("taxi driver", "taxi drivers"),
    ("assistant", "assistants"),
    ("executive", "executives"),
    ("parent", "parents"),
)

#: The paper's intransitive main-verb predicates (``MV``), for reference only.
PAPER_MATRIX_PREDICATES: tuple[str, ...] = (
    "laughs", "swims", "smiles", "is tall", "is old", "is young", "is short",
)

#: Scored main verbs, (singular, plural) present tense.  From the paper's MV
#: list: "smiles"; "is" (= "is tall/old/young/short", collapsed: only the verb
#: token is scored); "talks" and "walks" replace "laughs" and "swims", whose
#: third-person forms are two BPE tokens (see the module docstring).
MATRIX_VERBS: tuple[tuple[str, str], ...] = (
    ("talks", "talk"),    # replaces "laughs"
    ("walks", "walk"),    # replaces "swims"
    ("smiles", "smile"),
    ("is", "are"),        # "is tall" / "is old" / "is young" / "is short"
)

#: Transitive verbs of the relative clauses (the paper's ``EV``).  They sit in
#: the prefix, never at the scored position, so they need not be single tokens.
EMBEDDED_VERBS: tuple[tuple[str, str], ...] = (
    ("likes", "like"),
    ("admires", "admire"),
    ("hates", "hate"),
    ("loves", "love"),
)

#: Prepositions of the ``prep`` condition (the paper's ``P``).
PREPOSITIONS: tuple[str, ...] = (
    "next to", "behind", "in front of", "near", "to the side of", "across from",
)

# ---------------------------------------------------------------------------

CONDITIONS: tuple[str, ...] = ("simple", "prep", "subj_rel", "obj_rel")
NUMBERS: tuple[str, ...] = ("sg", "pl")
_SIMPLE_CELLS: tuple[tuple[str, str | None], ...] = (("sg", None), ("pl", None))
_ATTRACTOR_CELLS: tuple[tuple[str, str | None], ...] = (
    ("sg", "sg"), ("sg", "pl"), ("pl", "sg"), ("pl", "pl"),
)


def _idx(number: str) -> int:
    return 0 if number == "sg" else 1


@dataclass(frozen=True)
class MinimalPair:
    """One SVA item, split at the verb: ``prefix + target`` is grammatical,
    ``prefix + foil`` is not.  Spans are character spans ``[start, end)`` of the
    subject / attractor noun in ``prefix`` (lists are accepted and stored as
    tuples)."""

    condition: str
    prefix: str
    target: str
    foil: str
    subject_number: str
    attractor_number: str | None
    subject_span: tuple[int, int]
    attractor_span: tuple[int, int] | None

    def __post_init__(self) -> None:
        # Coerce spans (e.g. lists coming back from JSON) to tuples of ints.
        object.__setattr__(self, "subject_span", _as_span(self.subject_span, "subject_span"))
        if self.attractor_span is not None:
            object.__setattr__(self, "attractor_span", _as_span(self.attractor_span, "attractor_span"))
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown condition {self.condition!r}; valid: {', '.join(CONDITIONS)}")
        if self.subject_number not in NUMBERS:
            raise ValueError(f"subject_number must be 'sg' or 'pl', got {self.subject_number!r}")
        if self.condition == "simple":
            if self.attractor_number is not None or self.attractor_span is not None:
                raise ValueError("'simple' pairs have no attractor")
        else:
            if self.attractor_number not in NUMBERS:
                raise ValueError(f"attractor_number must be 'sg' or 'pl' for {self.condition!r}, "
                                 f"got {self.attractor_number!r}")
            if self.attractor_span is None:
                raise ValueError(f"{self.condition!r} pairs need an attractor_span")
        for name in ("target", "foil"):
            v = getattr(self, name)
            if not (isinstance(v, str) and v.startswith(" ") and v.strip()):
                raise ValueError(f"{name} must be a word with a leading space, got {v!r}")
        if self.target == self.foil:
            raise ValueError("target and foil must differ")
        if self.prefix != self.prefix.rstrip():
            raise ValueError("prefix must not end with whitespace")
        for name in ("subject_span", "attractor_span"):
            span = getattr(self, name)
            if span is not None and not (0 <= span[0] < span[1] <= len(self.prefix)):
                raise ValueError(f"{name} {span} out of range for prefix of length {len(self.prefix)}")

    # -- convenience -------------------------------------------------------
    @property
    def attractor_match(self) -> bool | None:
        """True if subject and attractor have the same number; None without attractor."""
        if self.attractor_number is None:
            return None
        return self.attractor_number == self.subject_number

    @property
    def cell(self) -> tuple[str, str | None]:
        """(subject_number, attractor_number)."""
        return (self.subject_number, self.attractor_number)

    @property
    def subject(self) -> str:
        """The subject noun as it appears in the prefix."""
        return self.prefix[self.subject_span[0]:self.subject_span[1]]

    @property
    def attractor(self) -> str | None:
        """The attractor noun as it appears in the prefix (None for 'simple')."""
        if self.attractor_span is None:
            return None
        return self.prefix[self.attractor_span[0]:self.attractor_span[1]]

    @property
    def sentence(self) -> str:
        """The grammatical sentence (without final punctuation)."""
        return self.prefix + self.target

    @property
    def foil_sentence(self) -> str:
        """The ungrammatical sentence (without final punctuation)."""
        return self.prefix + self.foil

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable dict (spans as lists).  Includes the derived
        ``attractor_match`` for convenience; :meth:`from_dict` ignores it."""
        return {
            "condition": self.condition,
            "prefix": self.prefix,
            "target": self.target,
            "foil": self.foil,
            "subject_number": self.subject_number,
            "attractor_number": self.attractor_number,
            "subject_span": list(self.subject_span),
            "attractor_span": None if self.attractor_span is None else list(self.attractor_span),
            "attractor_match": self.attractor_match,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MinimalPair":
        """Inverse of :meth:`to_dict`; keys that are not fields (such as
        ``attractor_match`` or caller-added metadata) are ignored."""
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in d]
        if missing:
            raise ValueError(f"MinimalPair.from_dict: missing keys {missing}")
        return cls(**{k: d[k] for k in names})


def _as_span(span: Any, name: str) -> tuple[int, int]:
    try:
        a, b = span
        return (int(a), int(b))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (start, end) pair, got {span!r}") from None


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

def _assemble(parts: Sequence[tuple[str, str | None]]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Join (text, role) parts with single spaces, capitalise the first
    letter, and return the text and the character span of each role."""
    text, spans = "", {}
    for word, role in parts:
        if text:
            text += " "
        start = len(text)
        text += word
        if role is not None:
            spans[role] = (start, len(text))
    return text[:1].upper() + text[1:], spans


def _pairs_for(condition: str, subj_num: str, attr_num: str | None) -> tuple[MinimalPair, ...]:
    """All pairs of one (condition, cell), in a fixed order (cached; the
    vocabulary is part of the key, so rebinding the module constants works)."""
    vocab = (DETERMINER, COMPLEMENTIZER, SUBJECT_NOUNS, ATTRACTOR_NOUNS,
             MATRIX_VERBS, EMBEDDED_VERBS, PREPOSITIONS)
    return _build_pairs(condition, subj_num, attr_num, vocab)


@lru_cache(maxsize=64)
def _build_pairs(condition, subj_num, attr_num, vocab) -> tuple[MinimalPair, ...]:
    D, C, subject_nouns, attractor_nouns, matrix_verbs, embedded_verbs, prepositions = vocab
    s, a = _idx(subj_num), (None if attr_num is None else _idx(attr_num))
    out: list[MinimalPair] = []

    def add(parts, verb):
        prefix, spans = _assemble(parts)
        out.append(MinimalPair(
            condition=condition, prefix=prefix,
            target=" " + verb[s], foil=" " + verb[1 - s],
            subject_number=subj_num, attractor_number=attr_num,
            subject_span=spans["subject"], attractor_span=spans.get("attractor"),
        ))

    for noun in subject_nouns:
        subj = [(D, None), (noun[s], "subject")]
        if condition == "simple":
            for verb in matrix_verbs:
                add(subj, verb)
            continue
        for attr in attractor_nouns:
            att = [(D, None), (attr[a], "attractor")]
            if condition == "prep":
                middles = [subj + [(p, None)] + att for p in prepositions]
            elif condition == "subj_rel":   # the embedded verb agrees with the subject
                middles = [subj + [(C, None), (ev[s], None)] + att for ev in embedded_verbs]
            elif condition == "obj_rel":    # the embedded verb agrees with the attractor
                middles = [subj + [(C, None)] + att + [(ev[a], None)] for ev in embedded_verbs]
            else:  # pragma: no cover - guarded by _normalize_conditions
                raise ValueError(condition)
            for parts in middles:
                for verb in matrix_verbs:
                    add(parts, verb)
    return tuple(out)


def cells(condition: str) -> tuple[tuple[str, str | None], ...]:
    """The (subject_number, attractor_number) cells of a condition."""
    _normalize_conditions([condition])
    return _SIMPLE_CELLS if condition == "simple" else _ATTRACTOR_CELLS


def pairs_per_cell(condition: str) -> int:
    """Number of pairs :func:`generate` produces in each cell of ``condition``."""
    _normalize_conditions([condition])
    base = len(SUBJECT_NOUNS) * len(MATRIX_VERBS)
    if condition == "simple":
        return base
    middle = len(PREPOSITIONS) if condition == "prep" else len(EMBEDDED_VERBS)
    return base * len(ATTRACTOR_NOUNS) * middle


def _normalize_conditions(conditions: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(conditions, str):
        return parse_conditions(conditions)
    conds = tuple(dict.fromkeys(conditions))  # de-duplicate, keep order
    unknown = [c for c in conds if c not in CONDITIONS]
    if unknown:
        raise ValueError(_unknown_message(unknown))
    if not conds:
        raise ValueError(f"no SVA condition given; valid conditions: {', '.join(CONDITIONS)}")
    return conds


def generate(conditions: str | Iterable[str] = CONDITIONS, n: int | None = None,
             seed: int = 0, keep: Callable[[MinimalPair], bool] | None = None) -> list[MinimalPair]:
    """All pairs of the given conditions (deterministic order), or a balanced
    deterministic sample of n pairs (round-robin over conditions and over the
    sg/pl x attractor cells, so that every condition and cell is represented
    as evenly as n allows), shuffled with `seed`.

    ``conditions`` may also be a string for :func:`parse_conditions`.  With
    ``n=None`` the order is: conditions in the order given, then cells
    (sg/sg, sg/pl, pl/sg, pl/pl; simple: sg, pl), then subject noun, attractor
    noun, preposition / embedded verb, matrix verb.  With ``n`` set, the items
    of each cell are drawn in a seeded random order; per-condition counts
    differ by at most one (earlier conditions get the extra items) and so do
    per-cell counts within a condition, until a cell runs out, in which case the
    others make up for it.  ``n`` larger than the number of pairs returns all
    of them (shuffled).  ``keep``: only pairs it accepts are drawn (e.g. those
    a masked LM can score), before sampling, so that n is reached if it can be."""
    conds = _normalize_conditions(conditions)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    per_cond = [[_pairs_for(c, sn, an) for sn, an in cells(c)] for c in conds]
    if keep is not None:
        per_cond = [[[p for p in lst if keep(p)] for lst in cell_lists] for cell_lists in per_cond]
    if n is None:
        return [p for cell_lists in per_cond for lst in cell_lists for p in lst]

    rng = random.Random(seed)
    queues: list[list[deque]] = []
    for cell_lists in per_cond:
        qs = []
        for lst in cell_lists:
            lst = list(lst)
            rng.shuffle(lst)
            qs.append(deque(lst))
        queues.append(qs)

    out: list[MinimalPair] = []
    next_cell = [0] * len(conds)
    active = list(range(len(conds)))
    while len(out) < n and active:
        for ci in list(active):
            if len(out) >= n:
                break
            qs = queues[ci]
            for _ in range(len(qs)):
                q = qs[next_cell[ci] % len(qs)]
                next_cell[ci] += 1
                if q:
                    out.append(q.popleft())
                    break
            else:  # every cell of this condition is exhausted
                active.remove(ci)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------
# CLI helper
# ---------------------------------------------------------------------------

def _unknown_message(unknown: Sequence[str]) -> str:
    names = ", ".join(repr(u) for u in unknown)
    plural = "s" if len(unknown) > 1 else ""
    return (f"unknown SVA condition{plural} {names}; valid conditions: "
            f"{', '.join(CONDITIONS)} (or 'all')")


def parse_conditions(spec: str) -> tuple[str, ...]:
    """Parse a comma-separated list such as ``"prep,obj_rel"`` or ``"all"``
    (case-insensitive, whitespace ignored, duplicates dropped, order kept;
    ``all`` expands to :data:`CONDITIONS` in their canonical order)."""
    if not isinstance(spec, str):
        raise TypeError(f"parse_conditions expects a string, got {type(spec).__name__}")
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no SVA condition given in {spec!r}; valid conditions: "
                         f"{', '.join(CONDITIONS)} (or 'all')")
    unknown = [s for s in names if s != "all" and s not in CONDITIONS]
    if unknown:
        raise ValueError(_unknown_message(list(dict.fromkeys(unknown))))
    out: list[str] = []
    for s in names:
        out.extend(CONDITIONS if s == "all" else (s,))
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------
# Tokenizer helpers
# ---------------------------------------------------------------------------

def _as_offsets(offsets: Any) -> list[tuple[int, int]]:
    if hasattr(offsets, "tolist"):      # torch / numpy
        offsets = offsets.tolist()
    offsets = list(offsets)
    first = offsets[0] if offsets else None
    if isinstance(first, (list, tuple)) and (len(first) == 0 or isinstance(first[0], (list, tuple))):
        if len(offsets) != 1:           # a batch: only a batch of one is unambiguous
            raise ValueError(f"token_spans expects the offsets of one sequence, got a batch of {len(offsets)}")
        offsets = list(offsets[0])
    return [(int(a), int(b)) for a, b in offsets]


def token_spans(pair: MinimalPair, offsets: Any) -> dict:
    """Given the tokenizer's offset mapping for `pair.prefix` (list of (start, end)
    character offsets per token, as returned by a fast tokenizer with
    return_offsets_mapping=True), return {"subject": [token indices], "attractor":
    [token indices] or [], "other": [token indices]} — tokens overlapping the
    subject / attractor noun spans. Tokens with empty spans (special tokens) go to "other".

    Overlap is on characters, so tokens that include the leading space
    (e.g. byte-level BPE " author" at offsets (3, 10)) count.  A batch of one
    sequence (``[[...]]``) and tensors are accepted."""
    result: dict[str, list[int]] = {"subject": [], "attractor": [], "other": []}
    spans = [("subject", pair.subject_span)]
    if pair.attractor_span is not None:
        spans.append(("attractor", pair.attractor_span))
    for i, (start, end) in enumerate(_as_offsets(offsets)):
        hit = False
        if end > start:
            for role, (s, e) in spans:
                if start < e and end > s:
                    result[role].append(i)
                    hit = True
        if not hit:
            result["other"].append(i)
    return result


def single_token_pairs(pairs: Iterable[MinimalPair], tokenizer: Any) -> tuple[list, list]:
    """Split pairs into (usable, dropped): usable if target and foil are each
    exactly one token when tokenized without special tokens
    (tokenizer(text, add_special_tokens=False).input_ids has length 1), not
    the unknown token, and not the same token.
    (The lead's scorer falls back to log-probabilities for multi-token forms;
    this helper lets callers count them.)"""
    cache: dict[str, Any] = {}
    unk = getattr(tokenizer, "unk_token_id", None)

    def single(text: str):
        """The token id of ``text`` if it is one known token, else None."""
        if text not in cache:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if hasattr(ids, "tolist"):
                ids = ids.tolist()
            if ids and isinstance(ids[0], (list, tuple)):   # batched output
                ids = ids[0]
            cache[text] = ids[0] if len(ids) == 1 and (unk is None or ids[0] != unk) else None
        return cache[text]

    usable, dropped = [], []
    for p in pairs:
        t, f = single(p.target), single(p.foil)
        (usable if t is not None and f is not None and t != f else dropped).append(p)
    return usable, dropped
