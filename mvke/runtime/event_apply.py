"""Apply events to the feature store: one Lua function per user, atomic, idempotent, in time order.

`EventApplier.apply(events)` groups a batch by user and runs the apply function (`APPLY_LIBRARY`,
a Redis Function loaded once per rule set) on each user's events, pipelined. Its work touches only
that user's three keys, which share one hash slot (mvke/runtime/keys.py: the user hash
`mvke:user:<id>` and `{mvke:user:<id>}:ev|:seen`), so on a Redis Cluster each user is one call (to
its slot's master); on one node `--users-per-call N` > 1 makes `<function>_many` run the same per-user
function for up to N users (2N events) in one call (REGISTER; default 1: one call per user). Either
way a reader sees a user before or after all of its batch, never half.

Per event (the rules are data: mvke/runtime/events.py):
* duplicate: its id is in the user's `:seen` set -> nothing changes;
* late: the set is full (`dedup_ids`) and the event is older than every id in it, so a duplicate
  could no longer be recognised -> not applied, counted (never applied twice);
* else: remembered (the oldest id beyond `dedup_ids` is forgotten); each history rule of its type
  inserts its values at the place of its order key (the `:ev` hash keeps each history's order keys;
  the values a batch load wrote count as older than any event), drops the older entry of a
  distinct value, caps the list; each counter rule of its type is incremented.
After the events, every bucket rule is recomputed from the counters, and `_event_at` = the applier's clock.
A user not seen before is created (cold start). The `:ev` order keys are reset when the user's
`_loaded_at` changes (a batch reload replaced the values they described). A history is read and
parsed only when an event of the call changes it (most events are impressions: counters only).
"""
from __future__ import annotations

import logging
import time
import zlib
from operator import attrgetter
from typing import Any, Iterable

from mvke.runtime.encoded import MULTI_SEP
from mvke.runtime.events import (
    EVENT_AT_FIELD,
    LOADED_AT_FIELD,
    ApplyCounts,
    Event,
    EventRules,
)
from mvke.runtime.keys import Keys
from mvke.runtime.native_apply import COMMAND as NATIVE_COMMAND
from mvke.runtime.redis_client import is_cluster

log = logging.getLogger("mvke.events")

# A user's event state (:ev order keys, :seen ids) expires this long after its last event: the horizon
# of duplicates and late events (a duplicate after it is applied again; a late event after it lands
# behind the entries it should precede). `mvke features stream --state-ttl`.
AUX_TTL_S = 86_400

# A Redis Function library (FUNCTION LOAD, FCALL) per rule set: the rules are decoded once, by the
# library's first call, not on every call (an EVAL script decodes its arguments each time).
# KEYS: user hash, its :ev hash, its :seen zset.  ARGV: the TTL of the :ev/:seen keys, the applier's
# clock (unix seconds, the `_event_at` written), then each event flat (`function_args`): event_id,
# order key as text, type, n, then n pairs (list name, its values joined by '|'). Flat text, not JSON: decoding a JSON batch cost the function more than its whole
# bookkeeping, and the order key comes as its text, ready for ZADD and the order keys, not
# formatted again. Returns {applied, duplicate, late}.
APPLY_LIBRARY = r"""#!lua name=%(name)s
local SEP = '|'
local R, NH, WANT, AUXWANT          -- the rules, decoded by the first call (cjson is not there at load time)
local function init()
  R = cjson.decode(%(rules)s)
  NH = #R.h
  -- everything the events may read, in two calls: the user's fields and its event state
  WANT, AUXWANT = {'_loaded_at'}, {'base'}
  for _, h in ipairs(R.h) do WANT[#WANT + 1] = h.f; AUXWANT[#AUXWANT + 1] = 't:' .. h.f end
  for _, c in ipairs(R.c) do WANT[#WANT + 1] = c.f end
end

local function split(s)
  local out = {}
  if not s or s == '' then return out end
  for part in string.gmatch(s, '([^|]+)') do out[#out + 1] = part end
  return out
end

-- an event's values of one history (their text joined by '|'), in the order they enter it (each
-- once where it is distinct)
local function own_values(joined, distinct, reversed)
  if not string.find(joined, SEP, 1, true) then return {joined} end
  local values, own, inev = split(joined), {}, {}
  local first, last, step = 1, #values, 1
  if reversed then first, last, step = #values, 1, -1 end
  for j = first, last, step do
    local x = values[j]
    if not (distinct and inev[x]) then inev[x] = true; own[#own + 1] = x end
  end
  return own
end

local function count(s)         -- entries of a stored list ('' has none)
  if s == '' then return 0 end
  local _, seps = string.gsub(s, SEP, SEP)
  return seps + 1
end

-- a stored list without its last m entries (m below its count). Linear: the m-th separator from the
-- end, found in the reversed text (a pattern anchored at the end backtracks quadratically in m, and m
-- is large once, on a batch-loaded history far over the cap)
local function drop_last(s, m)
  local r, at = string.reverse(s), 0
  for _ = 1, m do at = string.find(r, SEP, at + 1, true) end
  return string.sub(s, 1, #s - at)
end

-- The common case, on the stored text itself: the event is newer than every entry and (distinct
-- history) brings no value the history holds, so its values go in front and the cap cuts the tail.
-- What the general insert below would write, without splitting the list into tables (most of
-- the function's time on a click). st: {v, o texts, n entries, newest order key}. -> done?
local function prepend(st, own, key, ks, cap, distinct)
  if st.n > 0 and key <= st.newest then return false end
  if distinct and st.n > 0 then
    local padded = SEP .. st.v .. SEP
    for _, x in ipairs(own) do
      if string.find(padded, SEP .. x .. SEP, 1, true) then return false end
    end
  end
  local k = #own
  local v, o = table.concat(own, SEP), string.rep(ks .. SEP, k - 1) .. ks
  if st.n > 0 then v = v .. SEP .. st.v; o = o .. SEP .. st.o end
  local n = st.n + k
  if n > cap then
    v, o = drop_last(v, n - cap), drop_last(o, n - cap)
    n = cap
  end
  st.v, st.o, st.n, st.newest = v, o, n, key
  return true
end

-- st: a history's values v, their order keys o (numbers) and s (the text of each key, written back
-- as it came)
local function insert(st, own, key, ks, cap, distinct)
  local v, o, s = st.v, st.o, st.s
  if distinct then
    local keep = {}
    for _, x in ipairs(own) do
      local newer = false
      for j = #v, 1, -1 do
        if v[j] == x then
          if o[j] >= key then newer = true else table.remove(v, j); table.remove(o, j); table.remove(s, j) end
        end
      end
      if not newer then keep[#keep + 1] = x end
    end
    own = keep
  end
  if #own == 0 then return false end
  local pos = #v + 1
  for i = 1, #v do if o[i] < key then pos = i; break end end
  for k = #own, 1, -1 do table.insert(v, pos, own[k]); table.insert(o, pos, key); table.insert(s, pos, ks) end
  while #v > cap do table.remove(v); table.remove(o); table.remove(s) end
  return true
end

-- is the event new? (remembered if so): a known id is a duplicate; with the id set full, an event
-- older than all of it is late (a duplicate could no longer be told apart)
local function admit(seen, S, id, key, ks)
  if S.n < R.k then
    if redis.call('ZADD', seen, 'NX', ks, id) == 0 then return 'dup' end
    S.n = S.n + 1
    return 'new'
  end
  if redis.call('ZSCORE', seen, id) then return 'dup' end
  local oldest = tonumber(redis.call('ZRANGE', seen, 0, 0, 'WITHSCORES')[2])
  if oldest and key < oldest then return 'late' end
  redis.call('ZADD', seen, ks, id)
  redis.call('ZREMRANGEBYRANK', seen, 0, S.n - R.k)      -- the oldest beyond dedup_ids are forgotten
  S.n = R.k
  return 'new'
end

local function apply(KEYS, ARGV, first, last)   -- first/last: this user's events in ARGV (`apply_many`)
  if not R then init() end
  local user, aux, seen = KEYS[1], KEYS[2], KEYS[3]
  local got = redis.call('HMGET', user, unpack(WANT))
  local loaded = got[1] or ''
  local counts, stored = {}, {}
  for i, c in ipairs(R.c) do stored[c.f] = got[NH + 1 + i] end
  local function count_of(f)    -- a counter's number, parsed when first needed (a call bumps one or two)
    local n = counts[f]
    if n == nil then n = tonumber(stored[f]) or 0; counts[f] = n end
    return n
  end
  local auxgot, fresh, state = nil, false, {}
  local function history(i)     -- read when an event first touches it (an impression touches none)
    if state[i] then return state[i] end
    if not auxgot then
      auxgot = redis.call('HMGET', aux, unpack(AUXWANT))
      fresh = (auxgot[1] or '') ~= loaded    -- the order keys describe other (reloaded) values: drop them
    end
    local v = got[i + 1] or ''
    local o = fresh and '' or (auxgot[i + 1] or '')
    local n = count(v)
    if count(o) ~= n then               -- no order keys for these values: older than any event
      o = n > 0 and string.rep('0' .. SEP, n - 1) .. '0' or ''
    end
    state[i] = {text = true, v = v, o = o, n = n, newest = tonumber(string.match(o, '^[^|]*'))}
    return state[i]
  end
  local function parsed(i)      -- the history as tables, for the general insert
    local st = history(i)
    if st.text then
      local v, o = split(st.v), split(st.o)
      local ord = {}
      for j = 1, #o do ord[j] = tonumber(o[j]) end
      st = {v = v, o = ord, s = o}
      state[i] = st
    end
    return st
  end
  local applied, dup, late = 0, 0, 0
  local dirty, bumped = {}, {}
  local S = {n = redis.call('ZCARD', seen)}
  local a, last = first or 3, last or #ARGV
  while a <= last do
    local id, ks, typ, nl, lists = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), {}
    local key = tonumber(ks)
    for j = 1, nl do lists[ARGV[a + 2 + 2 * j]] = ARGV[a + 3 + 2 * j] end
    a = a + 4 + 2 * nl
    local verdict = admit(seen, S, id, key, ks)
    if verdict == 'dup' then dup = dup + 1
    elseif verdict == 'late' then late = late + 1
    else
      applied = applied + 1
      for i, h in ipairs(R.h) do
        local vals = lists[h.src]
        if h.on[typ] and vals and vals ~= '' then
          local distinct, st = h.d == 1, history(i)
          local own = own_values(vals, distinct, h.r == 1)
          if (st.text and prepend(st, own, key, ks, h.cap, distinct)) or insert(parsed(i), own, key, ks, h.cap, distinct) then
            dirty[i] = true
          end
        end
      end
      for _, c in ipairs(R.c) do
        if c.on[typ] then counts[c.f] = count_of(c.f) + 1; bumped[c.f] = true end
      end
    end
  end

  if applied > 0 then
    local hset, auxset, hdel = {}, {'base', loaded}, {}
    for i, _ in pairs(dirty) do
      local st, values, keys = state[i], nil, nil
      if st.text then values, keys = st.v, st.o
      else values, keys = table.concat(st.v, SEP), table.concat(st.s, SEP) end
      hset[#hset + 1] = R.h[i].f; hset[#hset + 1] = values
      auxset[#auxset + 1] = 't:' .. R.h[i].f; auxset[#auxset + 1] = keys
    end
    for f, _ in pairs(bumped) do hset[#hset + 1] = f; hset[#hset + 1] = tostring(counts[f]) end
    for _, b in ipairs(R.b) do
      local value = count_of(b.n)
      if b.d ~= '' then
        local den = count_of(b.d)
        if den == 0 then value = nil else value = value / den end
      end
      if value == nil then
        hdel[#hdel + 1] = b.f
      else
        local i = 0
        for _, edge in ipairs(b.e) do if edge < value then i = i + 1 end end
        hset[#hset + 1] = b.f; hset[#hset + 1] = b.l[i + 1]
      end
    end
    hset[#hset + 1] = '_event_at'; hset[#hset + 1] = ARGV[2]
    redis.call('HSET', user, unpack(hset))
    if #hdel > 0 then redis.call('HDEL', user, unpack(hdel)) end
    if #auxset > 2 then          -- a history changed: its order keys (no history changed: nothing to say)
      if fresh then redis.call('DEL', aux) end
      redis.call('HSET', aux, unpack(auxset))
    end
  end
  local ttl = tonumber(ARGV[1])
  if ttl and ttl > 0 then
    redis.call('EXPIRE', aux, ttl)
    redis.call('EXPIRE', seen, ttl)
  end
  return {applied, dup, late}
end
"""

# Appended to the library (and to loadtest/apply_floor.py's lower bounds): the function per user and
# `<name>_many`, several users in one call (one Redis node, `--users-per-call N` > 1: the consumer packs
# one command and parses one reply per group, and Redis dispatches one; at N = 16 the consumer's
# instructions per event are 12% fewer than at 1, Redis's 3.6% fewer: docs/results/events.md).
# KEYS: 3 per user; ARGV: the TTL, the clock, then per user the count m of its event arguments and
# those m arguments. Returns per user its {applied, duplicate, late}, or its error: a user whose call
# fails (its keys hold another type) fails alone, as in a call of its own.
REGISTER = r"""
local function apply_many(KEYS, ARGV)
  local out, a = {}, 3
  for k = 1, #KEYS, 3 do
    local m = tonumber(ARGV[a])
    local ok, r = pcall(apply, {KEYS[k], KEYS[k + 1], KEYS[k + 2]}, ARGV, a + 1, a + m)
    if not ok then r = redis.error_reply(type(r) == 'table' and r.err or tostring(r)) end
    out[#out + 1] = r
    a = a + 1 + m
  end
  return out
end

redis.register_function('%(name)s', apply)
redis.register_function('%(name)s_many', apply_many)
"""


def apply_library(rules_lua: str) -> tuple[str, str]:
    """-> (library and function name, library code) of a rule set: one name per rule set, so
    consumers of different rules (a new bundle's) do not replace each other's function."""
    body = APPLY_LIBRARY % {"name": "NAME", "rules": "RULES"} + REGISTER
    name = f"mvke_events_{zlib.crc32((body + rules_lua).encode()):08x}"
    level = 1
    while f"]{'=' * level}]" in rules_lua:      # a Lua long string that the rules cannot close
        level += 1
    literal = f"[{'=' * level}[{rules_lua}]{'=' * level}]"
    return name, APPLY_LIBRARY % {"name": name, "rules": literal} + REGISTER % {"name": name}


# Which apply runs (`mvke features stream --apply`): auto, the compiled MVKE.APPLY where the Redis has the
# module (one node, one call per user; mvke/runtime/native_apply.py), else the Lua function; or either
# one by name ("native" fails where the server lacks it).
APPLY_AUTO, APPLY_FUNCTION, APPLY_NATIVE = "auto", "function", "native"
APPLY_MODES = (APPLY_AUTO, APPLY_FUNCTION, APPLY_NATIVE)

# Users per call on one node (`mvke features stream --users-per-call`): 1 by default, one call per user.
# A `_many` call of N users (at most 2N events) saves the consumer ~10% of its CPU per event at N = 16,
# but holds Redis for ~0.5 ms in one piece, and the service's reads wait behind it: beside tag
# requests at c=32 the service kept ~6 points less of its QPS with 16 than with 1 (ABBA run,
# docs/results/events.md). N > 1 is for catching up a backlog without a service beside it.
USERS_PER_CALL = 1

assert LOADED_AT_FIELD == "_loaded_at" and EVENT_AT_FIELD == "_event_at"   # the names the script writes


def by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    """A batch grouped by user, each user's events oldest first (fewer insertions mid-history)."""
    groups: dict[str, list[Event]] = {}
    for e in events:     # a plain dict: most users have one event in a batch (defaultdict costs more per miss)
        evs = groups.get(e.user_id)
        if evs is None:
            groups[e.user_id] = [e]
        else:
            evs.append(e)
    for evs in groups.values():
        if len(evs) > 1:
            evs.sort(key=_ORDER)
    return groups


_ORDER = attrgetter("order")


try:                       # 5-10x faster than json where installed (the service extras have it)
    from orjson import loads
except ImportError:        # pragma: no cover - the core install
    from json import loads


def call_groups(users: list[str], groups: dict[str, list[Event]], per_call: int = USERS_PER_CALL) -> list[list[str]]:
    """Users in order, cut into the groups of one `_many` call: `per_call` users or twice as many events."""
    out: list[list[str]] = []
    chunk: list[str] = []
    events = 0
    for u in users:
        chunk.append(u)
        events += len(groups[u])
        if len(chunk) >= per_call or events >= 2 * per_call:
            out.append(chunk)
            chunk, events = [], 0
    if chunk:
        out.append(chunk)
    return out


def event_args(events: list[Event]) -> list[Any]:
    """One user's events as the apply function reads them (see APPLY_LIBRARY): per event its id, its
    order key as text, its type, the number n of its lists, then n pairs (list name, values joined)."""
    args: list[Any] = []
    for e in events:
        if len(e.lists) == 1 and (tags := e.lists.get("tags")):    # the common event: its tags only
            args += (e.event_id, str(e.order), e.type, 1, "tags", MULTI_SEP.join(tags))
            continue
        lists = [(name, MULTI_SEP.join(values)) for name, values in e.lists.items() if values]
        args += (e.event_id, str(e.order), e.type, len(lists))
        for pair in lists:
            args += pair
    return args


def function_args(events: list[Event], aux_ttl_s: int, now: str) -> list[Any]:
    """ARGV of the function for one user: the TTL, the applier's clock `now` (unix seconds as text, one
    reading per batch), then its events (`event_args`)."""
    return [aux_ttl_s, now, *event_args(events)]


def many_args(groups: list[list[Event]], aux_ttl_s: int, now: str) -> list[Any]:
    """ARGV of `<function>_many` (REGISTER) for several users: the TTL, the clock, then per user the
    count of its event arguments and those arguments."""
    args: list[Any] = [aux_ttl_s, now]
    for events in groups:
        own = event_args(events)
        args.append(len(own))
        args += own
    return args


def send_raw(client: Any, commands: list[tuple]) -> list[Any]:
    """A pipeline of commands on one node, packed by hiredis in one go: redis-py's pipeline spends
    more CPU encoding arguments than Redis spends running the scripts. -> one reply (or the
    ResponseError) per command; a connection error raises (the connection is dropped)."""
    import hiredis
    from redis.exceptions import ResponseError
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(hiredis.pack_command(c) for c in commands)], check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as e:       # this command's error; the stream of replies goes on
                replies.append(e)
        return replies
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def server_has_native(client: Any) -> bool:
    """Does this Redis (one node, a sync client) have MVKE.APPLY loaded? Asked raw (`send_raw`):
    redis-py's COMMAND INFO parser fails on an unknown command. An old server's error reply: no; a
    connection error raises, as the batch's own calls would (the choice is made again next batch)."""
    reply = send_raw(client, [("COMMAND", "INFO", NATIVE_COMMAND.lower())])[0]
    return isinstance(reply, list) and bool(reply) and reply[0] is not None


class EventApplier:
    """Applies batches of events with a sync client (one node or a cluster: `redis_client.connect`)."""

    def __init__(self, client: Any, keys: Keys, rules: EventRules, aux_ttl_s: int = AUX_TTL_S,
                 users_per_call: int = USERS_PER_CALL, apply: str = APPLY_AUTO):
        if users_per_call < 1:
            raise ValueError(f"users_per_call must be >= 1, got {users_per_call}")
        if apply not in APPLY_MODES:
            raise ValueError(f"apply must be one of {APPLY_MODES}, got {apply!r}")
        self.client, self.keys, self.rules, self.aux_ttl_s = client, keys, rules, aux_ttl_s
        self.users_per_call = users_per_call
        self.function, self.library = apply_library(rules.to_lua())
        self.cluster = is_cluster(client)
        try:
            self.native_rules: str | None = rules.to_native()
        except ValueError:          # names the compiled command's rule text cannot carry: the function
            self.native_rules = None
        self.mode = apply
        self.native: bool | None = None     # MVKE.APPLY in use: decided by the first batch (`_choose`)
        self._loaded = False

    def _choose(self) -> None:
        """The compiled command where the mode allows it and the server has it (one node, one call per
        user), else the function; "native" without the command on the server is an error."""
        allowed = (self.mode != APPLY_FUNCTION and not self.cluster and self.users_per_call == 1
                   and self.native_rules is not None)
        self.native = allowed and server_has_native(self.client)
        if self.mode == APPLY_NATIVE and not self.native:
            raise RuntimeError(f"--apply native: this Redis has no {NATIVE_COMMAND} (`mvke features apply-module`, "
                               "then --loadmodule: docs/DEPLOY.md), or the calls are grouped or on a cluster")

    def apply(self, events: Iterable[Event]) -> ApplyCounts:
        """Apply a batch; Redis connection errors raise (nothing is acknowledged, the batch is redone:
        the function's idempotence makes that harmless); a user's call error fails only its events."""
        groups = by_user(events)
        counts = ApplyCounts()
        if not groups:
            return counts
        if self.native is None:
            self._choose()
        if not self._loaded and not self.native:
            self.client.function_load(self.library, replace=True)    # a cluster loads it on every master
            self._loaded = True
        now = f"{time.time():.6f}"
        users = list(groups)
        # one node: users in groups (`call_groups`); a cluster: one call per user (its keys' slot)
        one_each = self.cluster or self.users_per_call == 1
        replies = self._one_each(users, groups, now) if one_each else self._grouped(users, groups, now)
        if self._lost_its_apply(replies):
            return self.apply([e for u in users for e in groups[u]])
        for u, reply in zip(users, replies):
            if isinstance(reply, Exception):
                _raise_if_unavailable(reply)
                counts.failed += [(e, f"{type(reply).__name__}: {reply}") for e in groups[u]]
                continue
            applied, dup, late = reply      # the function returns three integers
            counts.applied += applied
            counts.duplicate += dup
            counts.late += late
        return counts

    def _lost_its_apply(self, replies: list[Any]) -> bool:
        """The function or the command gone from Redis (a new master, a restart without the module), or
        rules the command cannot read (an older module): True when the batch is to be redone
        (idempotent) with what is there now."""
        errors = [str(r) for r in replies if isinstance(r, Exception)]
        if any("Function not found" in e for e in errors):
            self._loaded = False
            return True
        gone = self.native and any("unknown command" in e for e in errors)
        unreadable = self.native and any("rules not understood" in e for e in errors)
        if not (gone or unreadable):
            return False
        why = "is gone from Redis (restarted without the module?)" if gone else "does not read these rules (older?)"
        if self.mode == APPLY_NATIVE:
            raise RuntimeError(f"--apply native: {NATIVE_COMMAND} {why}")
        log.warning("%s %s: the function applies the events", NATIVE_COMMAND, why)
        if unreadable:
            self.native_rules = None
        self.native = None        # asked again on the next batch
        return True

    def _one_each(self, users: list[str], groups: dict[str, list[Event]], now: str) -> list[Any]:
        """One call per user -> its reply ([applied, duplicate, late] or the error)."""
        ttl, user_keys = self.aux_ttl_s, self.keys.user_event_keys
        if self.native:         # same keys and arguments, the rules' text in place of the key count
            rules = self.native_rules
            commands = [(NATIVE_COMMAND, *user_keys(u), rules, *function_args(groups[u], ttl, now)) for u in users]
        else:
            commands = [("FCALL", self.function, 3, *user_keys(u), *function_args(groups[u], ttl, now)) for u in users]
        if not self.cluster:
            return send_raw(self.client, commands)
        pipe = self.client.pipeline(transaction=False)    # a cluster pipeline routes each FCALL by its keys' slot
        for c in commands:
            pipe.execute_command(*c)
        return pipe.execute(raise_on_error=False)

    def _grouped(self, users: list[str], groups: dict[str, list[Event]], now: str) -> list[Any]:
        """`<function>_many` per group of users (`call_groups`) -> one reply per user, as `_one_each` (a user's
        error is its own element). A group's call that fails as a whole (not a user's error: the
        function's) is redone one call per user."""
        ttl, user_keys, many = self.aux_ttl_s, self.keys.user_event_keys, f"{self.function}_many"
        chunks = call_groups(users, groups, self.users_per_call)
        commands = [("FCALL", many, 3 * len(c), *[k for u in c for k in user_keys(u)],
                     *many_args([groups[u] for u in c], ttl, now)) for c in chunks]
        out: list[Any] = []
        for chunk, reply in zip(chunks, send_raw(self.client, commands)):
            if isinstance(reply, Exception):
                _raise_if_unavailable(reply)
                lost = "Function not found" in str(reply)     # `apply` reloads the library and redoes all
                out += [reply] * len(chunk) if lost else self._one_each(chunk, groups, now)
                continue
            out += reply
        return out


def _raise_if_unavailable(reply: Exception) -> None:
    """Redis down, loading or resharding: the whole batch waits (raised), not one user's events."""
    if isinstance(reply, (ConnectionError, TimeoutError)) or type(reply).__name__ in (
            "ConnectionError", "TimeoutError", "BusyLoadingError", "ClusterDownError"):
        raise reply
