"""Audiences: tag -> users as Roaring bitmaps, and boolean expressions over them (torch-free).

The advertiser's side of tagging (paper section 1: advertisers bind ads to tags and want to know
how many users a choice of tags reaches). `mvke tag-all --audiences` (batch/audiences.py) turns the
rows it wrote into one bitmap per (task, tag) over dense user numbers; the service
(service/audiences.py) answers sizes, pages and samples. Both read the format from here:

    index meta (JSON)     version, model_version, tasks, tags (the catalogue, tags.json order), users
                          (how many numbers), rule (who is in a tag's audience), sizes {task: [size per tag]}
    bitmap per task+tag   `BitMap.serialize()` (Roaring's portable format: Java, Go, CRoaring, ClickHouse
                          and Redis modules read it) of the user numbers in the tag's audience
    user-id dictionary    user number n -> user id; chunks of USER_CHUNK ids (chunk n // USER_CHUNK),
                          newline-joined (encode_user_chunk), so a page or a sample reads kBs, not 10M ids

Redis layout (keys in mvke/runtime/keys.py): one hash slot per version; the `latest` pointer moves
only after the version's keys are complete, so a reader that resolves it never sees a mix.

Expression grammar (`POST /audiences:estimate`):

    expr   := and ( OR and )*
    and    := unary ( AND unary )*
    unary  := NOT unary | '(' expr ')' | term
    term   := <task>:<tag>         tag: any run of characters but whitespace, parentheses and '"';
            | <task>:"<tag>"       or quoted (a tag with spaces or parentheses; \\" and \\\\ escaped)

Keywords are case-insensitive; a term always has a colon, so a tag called "and" is `task:and`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pyroaring import BitMap

USER_CHUNK = 1024        # user ids per dictionary chunk (a page of 100 users reads 1-3 chunks of ~12 kB)
MAX_EXPRESSION_CHARS = 4096
MAX_TERMS = 64
FORMAT_VERSION = 1


# ---- the membership rule ----------------------------------------------------------------------
@dataclass(frozen=True)
class AudienceRule:
    """A user is in a tag's audience for a task when the tag is among the user's `top_k` rows for the task
    (rank <= top_k) and, if `min_score` is set, its score is at least `min_score`. The default (top_k = the
    job's --top-k, no min_score) is exactly the rows tag-all writes."""
    top_k: int
    min_score: float | None = None

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"audience top_k must be >= 1, got {self.top_k}")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"audience min_score must be in [0, 1], got {self.min_score}")

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "min_score": self.min_score,
                "text": f"rank <= {self.top_k}" + ("" if self.min_score is None else f" and score >= {self.min_score:g}")}

    @classmethod
    def from_dict(cls, d: dict) -> "AudienceRule":
        return cls(int(d["top_k"]), None if d.get("min_score") is None else float(d["min_score"]))


@dataclass
class AudienceMeta:
    """What a reader needs besides the bitmaps: the catalogue (to tell an unknown tag from one nobody carries),
    the number of users (the universe of NOT) and the rule."""
    version: str
    model_version: str
    tasks: list[str]
    tags: list[str]                          # catalogue, tags.json order
    users: int                               # user numbers 0 .. users-1
    rule: AudienceRule
    sizes: dict[str, list[int]]              # task -> audience size per catalogue tag
    built_at: str = ""
    source: dict = field(default_factory=dict)   # the tag-all job (input fingerprint, parts, top_k)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self._tag_index = {t: i for i, t in enumerate(self.tags)}

    def tag_index(self, tag: str) -> int | None:
        return self._tag_index.get(tag)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "model_version": self.model_version, "tasks": self.tasks,
                           "tags": self.tags, "users": self.users, "rule": self.rule.to_dict(), "sizes": self.sizes,
                           "built_at": self.built_at, "source": self.source, "format_version": self.format_version},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "AudienceMeta":
        d = json.loads(raw)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"audience index format {d.get('format_version')}, this reader knows {FORMAT_VERSION}")
        return cls(version=d["version"], model_version=d["model_version"], tasks=d["tasks"], tags=d["tags"],
                   users=int(d["users"]), rule=AudienceRule.from_dict(d["rule"]), sizes=d["sizes"],
                   built_at=d.get("built_at", ""), source=d.get("source", {}))


# ---- user-id dictionary chunks ----------------------------------------------------------------
def encode_user_chunk(ids: list[str]) -> bytes:
    """b"L" + newline-joined ids (split is ~10x faster to decode than JSON); b"J" + a JSON list when an id
    holds a newline."""
    if any("\n" in i for i in ids):
        return b"J" + json.dumps(ids, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"L" + "\n".join(ids).encode("utf-8")


def decode_user_chunk(raw: bytes) -> list[str]:
    body = raw[1:].decode("utf-8")
    return json.loads(body) if raw[:1] == b"J" else body.split("\n")


def chunks_of(numbers: Iterable[int]) -> list[int]:
    """The dictionary chunks holding these user numbers, ascending."""
    return sorted({int(n) // USER_CHUNK for n in numbers})


# ---- expressions ------------------------------------------------------------------------------
class ExpressionError(ValueError):
    """A bad expression: the offending token and its 0-based character position."""

    def __init__(self, message: str, token: str, position: int):
        super().__init__(f"{message}: {token!r} at position {position}")
        self.reason, self.token, self.position = message, token, position


@dataclass(frozen=True)
class Term:
    task: str
    tag: str
    position: int = field(default=0, compare=False)   # where it stood in the text (for error messages)


@dataclass(frozen=True)
class Not:
    operand: "Node"


@dataclass(frozen=True)
class And:
    operands: tuple["Node", ...]


@dataclass(frozen=True)
class Or:
    operands: tuple["Node", ...]


Node = Term | Not | And | Or

_TOKEN = re.compile(r'\s*(?:(?P<paren>[()])|(?P<term>[^\s()"]+(?:"(?:[^"\\]|\\.)*")?)|(?P<bad>\S))')
_KEYWORDS = {"AND", "OR", "NOT"}
_UNESCAPE = re.compile(r"\\(.)")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position): kind paren | kw | term | end."""
    out, pos = [], 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:   # only whitespace is left
            out.append(("end", "end of expression", len(text)))
            return out
        kind = m.lastgroup
        start, tok = m.start(kind), m.group(kind)
        if kind == "bad":
            raise ExpressionError("unterminated quote" if tok == '"' else "unexpected character", tok, start)
        if kind == "term" and tok.upper() in _KEYWORDS:
            kind, tok = "kw", tok.upper()
        out.append((kind, tok, start))
        pos = m.end()


def _term(tok: str, position: int) -> Term:
    task, sep, tag = tok.partition(":")
    if not sep or not task:
        raise ExpressionError("expected <task>:<tag>", tok, position)
    if tag.startswith('"'):
        if len(tag) < 2 or not tag.endswith('"'):
            raise ExpressionError("unterminated quote", tok, position)
        tag = _UNESCAPE.sub(r"\1", tag[1:-1])
    elif '"' in tag:
        raise ExpressionError("a quote must enclose the whole tag", tok, position)
    if not tag:
        raise ExpressionError("empty tag", tok, position)
    return Term(task, tag, position)


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0
        self.terms = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def take(self) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expr(self) -> Node:
        ops = [self.conj()]
        while self.peek()[:2] == ("kw", "OR"):
            self.take()
            ops.append(self.conj())
        return ops[0] if len(ops) == 1 else Or(tuple(ops))

    def conj(self) -> Node:
        ops = [self.unary()]
        while self.peek()[:2] == ("kw", "AND"):
            self.take()
            ops.append(self.unary())
        return ops[0] if len(ops) == 1 else And(tuple(ops))

    def unary(self) -> Node:
        kind, tok, pos = self.take()
        if (kind, tok) == ("kw", "NOT"):
            return Not(self.unary())
        if (kind, tok) == ("paren", "("):
            inner = self.expr()
            k2, t2, p2 = self.take()
            if (k2, t2) != ("paren", ")"):
                raise ExpressionError("expected ')' to close the '(' at position " + str(pos), t2, p2)
            return inner
        if kind == "term":
            self.terms += 1
            if self.terms > MAX_TERMS:
                raise ExpressionError(f"at most {MAX_TERMS} terms", tok, pos)
            return _term(tok, pos)
        want = "expected a term, NOT or '('" if kind != "end" else "expression ends too early"
        raise ExpressionError(want, tok, pos)


def parse(text: str) -> Node:
    """Expression text -> syntax tree; ExpressionError names the first bad token and its position."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters", text[MAX_EXPRESSION_CHARS:][:20],
                              MAX_EXPRESSION_CHARS)
    if not text.strip():
        raise ExpressionError("empty expression", "", 0)
    p = _Parser(text)
    node = p.expr()
    kind, tok, pos = p.peek()
    if kind != "end":
        raise ExpressionError("expected AND, OR or the end" if kind != "paren" else "unbalanced ')'", tok, pos)
    return node


def terms(node: Node) -> list[Term]:
    """Every term of the tree, left to right."""
    if isinstance(node, Term):
        return [node]
    if isinstance(node, Not):
        return terms(node.operand)
    return [t for op in node.operands for t in terms(op)]


def unparse(node: Node) -> str:
    """Canonical text of a tree (fully parenthesised where it matters)."""
    if isinstance(node, Term):
        simple = re.fullmatch(r'[^\s()"]+', node.tag) and node.tag.upper() not in _KEYWORDS
        tag = node.tag if simple else '"' + node.tag.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{node.task}:{tag}"
    if isinstance(node, Not):
        return "NOT " + unparse(node.operand)
    sep = " AND " if isinstance(node, And) else " OR "
    return "(" + sep.join(unparse(o) for o in node.operands) + ")"


def evaluate(node: Node, bitmap: Callable[[Term], BitMap], universe: int) -> BitMap:
    """The users the expression selects, over numbers 0 .. universe-1.

    AND with negated operands is a difference (A AND NOT B = A - B), so NOT only builds the universe
    (a run container: a few bytes) when a conjunction has no positive operand.
    """
    if isinstance(node, Term):
        return bitmap(node)
    if isinstance(node, Not):
        return _universe(universe) - evaluate(node.operand, bitmap, universe)
    if isinstance(node, Or):
        return BitMap.union(*(evaluate(o, bitmap, universe) for o in node.operands))
    pos = [evaluate(o, bitmap, universe) for o in node.operands if not isinstance(o, Not)]
    neg = [evaluate(o.operand, bitmap, universe) for o in node.operands if isinstance(o, Not)]
    pos.sort(key=len)     # smallest first: every later AND scans less
    out = BitMap.intersection(*pos) if pos else _universe(universe)
    for n in neg:
        out -= n
    return out


def _universe(n: int) -> BitMap:
    b = BitMap()
    if n:
        b.add_range(0, n)
    return b


def sample_ranks(size: int, k: int) -> list[int]:
    """k ranks spread evenly over an audience of `size` (a deterministic sample: the same query, the same users)."""
    if size <= k:
        return list(range(size))
    return [(i * size) // k for i in range(k)]
