"""`mvke features stream` with a lower-bound apply function in place of the real one (bench only).

Issue 22 prescribes one Lua script per user key, called by the Python consumer. These variants ask
how cheap that design can be at all, so that a goal missed by the real function can be told apart
from a goal the design cannot reach:

* `noop`:  the function walks its batch (the flat arguments) and returns; no key is touched. What is
  left is the stream transport (XADD, XREADGROUP, XACK), the consumer's parsing and packing, and the
  FCALLs (one per user, or per N with --users-per-call, as for the real function).
* `floor`: the least an idempotent apply must do: the id into the user's seen set (ZADD NX: a
  duplicate changes nothing), one HINCRBY per counter rule of the event's type, `_event_at`, the TTL
  of the seen set. No histories, no ordering, no buckets, no reload check: less than the issue asks.

    python -m loadtest.apply_floor noop|floor <the arguments of `mvke features stream`>
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

# Same KEYS and ARGV as mvke/runtime/event_apply.py's library (its `apply(KEYS, ARGV, first, last)`, which
# event_apply.REGISTER wraps), same reply {applied, duplicate, late}.
_HEAD = r"""#!lua name=%(name)s
local R
local function events(ARGV, first, last)   -- a user's flat events in ARGV: {id, order key text, type} each
  local E, a, last = {}, first or 3, last or #ARGV
  while a <= last do
    E[#E + 1] = {ARGV[a], ARGV[a + 1], ARGV[a + 2]}
    a = a + 4 + 2 * tonumber(ARGV[a + 3])
  end
  return E
end
local function apply(KEYS, ARGV, first, last)
  if not R then R = cjson.decode(%(rules)s) end
  local E = events(ARGV, first, last)
"""
# event_apply.apply_library appends REGISTER (the per-user function and `_many`), as for the real one.
VARIANTS = {
    "noop": _HEAD + r"""  return {#E, 0, 0}
end
""",
    "floor": _HEAD + r"""  local user, seen = KEYS[1], KEYS[3]
  local applied, dup = 0, 0
  for _, e in ipairs(E) do
    if redis.call('ZADD', seen, 'NX', e[2], e[1]) == 0 then dup = dup + 1
    else
      applied = applied + 1
      for _, c in ipairs(R.c) do
        if c.on[e[3]] then redis.call('HINCRBY', user, c.f, 1) end
      end
    end
  end
  if applied > 0 then
    redis.call('HSET', user, '_event_at', ARGV[2])
  end
  local ttl = tonumber(ARGV[1])
  if ttl and ttl > 0 then redis.call('EXPIRE', seen, ttl) end
  return {applied, dup, 0}
end
""",
}


@contextmanager
def using_library(library: str) -> Iterator[None]:
    """Appliers built inside use `library` (an APPLY_LIBRARY text) in place of the shipped one: apply_library()
    reads the module's APPLY_LIBRARY when an applier is built. Restored on the way out."""
    from mvke.runtime import event_apply
    shipped = event_apply.APPLY_LIBRARY
    event_apply.APPLY_LIBRARY = library
    try:
        yield
    finally:
        event_apply.APPLY_LIBRARY = shipped


def main(argv: list[str]) -> int:
    variant, rest = argv[0], argv[1:]
    from mvke.cli import main as cli_main
    with using_library(VARIANTS[variant]):
        # the lower bounds replace the Lua function: the compiled MVKE.APPLY (auto's choice) is not theirs
        return cli_main(["features", "stream", "--apply", "function", *rest]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
