"""Audience expressions (mvke/runtime/audience.py): parsing, error positions, bitmap evaluation.

`random_expression` builds a tree here, independently of the parser, renders it as text and
evaluates it over plain Python sets: the oracle the service tests compare sizes with too.
"""
from __future__ import annotations

import random

import pytest

pytest.importorskip("pyroaring")
from pyroaring import BitMap  # noqa: E402

from mvke.runtime.audience import (AudienceMeta, AudienceRule, ExpressionError, Term, evaluate, parse,  # noqa: E402
                                   sample_ranks, terms, unparse)


def random_expression(rng: random.Random, leaves: list[tuple[str, str]], depth: int = 3) -> tuple[str, tuple]:
    """(text, tree) with tree = ("term", task, tag) | ("not", t) | ("and"|"or", a, b); random keyword case,
    spacing and redundant parentheses."""
    if depth == 0 or rng.random() < 0.3:
        task, tag = rng.choice(leaves)
        return f"{task}:{tag}", ("term", task, tag)
    op = rng.choice(["and", "or", "not", "and"])
    kw = lambda w: rng.choice([w.upper(), w.lower(), w.capitalize()])   # noqa: E731
    if op == "not":
        text, tree = random_expression(rng, leaves, depth - 1)
        return f"{kw('not')} ({text})", ("not", tree)
    (ta, a), (tb, b) = random_expression(rng, leaves, depth - 1), random_expression(rng, leaves, depth - 1)
    sp = rng.choice([" ", "  ", "\t"])
    return f"({ta}){sp}{kw(op)}{sp}({tb})", (op, a, b)


def brute(tree: tuple, sets: dict[tuple[str, str], set], universe: set) -> set:
    kind = tree[0]
    if kind == "term":
        return sets.get((tree[1], tree[2]), set())
    if kind == "not":
        return universe - brute(tree[1], sets, universe)
    a, b = brute(tree[1], sets, universe), brute(tree[2], sets, universe)
    return a & b if kind == "and" else a | b


def test_random_expressions_equal_set_arithmetic():
    rng = random.Random(7)
    n = 5000
    leaves = [(task, f"cat{c:02d}/tag{t:04d}") for task in ("interest", "intention") for c in range(2) for t in range(4)]
    sets = {leaf: {u for u in range(n) if rng.random() < rng.choice([0.01, 0.2, 0.6])} for leaf in leaves}
    sets[leaves[-1]] = set()   # a tag nobody carries
    bitmaps = {k: BitMap(v) for k, v in sets.items()}
    for _ in range(300):
        text, tree = random_expression(rng, leaves, 4)
        node = parse(text)
        got = evaluate(node, lambda t: bitmaps[(t.task, t.tag)], n)
        assert set(got) == brute(tree, sets, set(range(n))), text
        assert parse(unparse(node)) == node   # the canonical text means the same


def test_precedence_not_and_or():
    node = parse("a:x OR b:y AND NOT c:z")
    assert unparse(node) == "(a:x OR (b:y AND NOT c:z))"
    assert parse("NOT NOT a:x") == parse("not not a:x")


@pytest.mark.parametrize("text, token, position", [
    ("interest:a AND", "end of expression", 14),
    ("interest:a AND AND intention:b", "AND", 15),
    ("interest:a intention:b", "intention:b", 11),
    ("(interest:a OR intention:b", "end of expression", 26),
    ("interest:a)", ")", 10),
    ("cat07/tag0123", "cat07/tag0123", 0),
    ("interest:", "interest:", 0),
    (":tag", ":tag", 0),
    ('interest:"open', '"', 9),
    ("", "", 0),
    ("   ", "", 0),
    ("NOT", "end of expression", 3),
    ("()", ")", 1),
])
def test_bad_expressions_name_token_and_position(text, token, position):
    with pytest.raises(ExpressionError) as e:
        parse(text)
    assert (e.value.token, e.value.position) == (token, position), str(e.value)
    assert repr(token) in str(e.value) and f"position {position}" in str(e.value)


def test_quoted_tags_and_keywords_as_tags():
    node = parse('interest:"Sci Fi (old)" AND interest:and OR interest:"a\\"b"')
    assert [(t.task, t.tag) for t in terms(node)] == [("interest", "Sci Fi (old)"), ("interest", "and"),
                                                      ("interest", 'a"b')]
    assert terms(node)[0] == Term("interest", "Sci Fi (old)", 0)
    assert parse(unparse(node)) == node
    assert terms(parse("interest:Children's"))[0].tag == "Children's"


def test_not_alone_uses_the_universe_and_samples_spread():
    got = evaluate(parse("NOT a:x"), lambda t: BitMap([1, 3]), 6)
    assert list(got) == [0, 2, 4, 5]
    assert sample_ranks(3, 10) == [0, 1, 2] and sample_ranks(100, 4) == [0, 25, 50, 75]


def test_meta_round_trip_and_rule():
    meta = AudienceMeta("v1", "m1", ["interest"], ["a", "b"], 10, AudienceRule(5, 0.5), {"interest": [3, 0]})
    back = AudienceMeta.from_json(meta.to_json())
    assert (back.rule, back.tag_index("b"), back.tag_index("zz"), back.sizes) == (AudienceRule(5, 0.5), 1, None,
                                                                                   {"interest": [3, 0]})
    with pytest.raises(ValueError, match="top_k"):
        AudienceRule(0)


def test_user_chunks_round_trip():
    from mvke.runtime.audience import decode_user_chunk, encode_user_chunk
    for ids in (["u1", "u2", ""], ["a\nb", "c"], ["x"]):
        assert decode_user_chunk(encode_user_chunk(ids)) == ids
