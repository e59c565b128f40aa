"""Apply events to the feature store: one Lua script per user, atomic, idempotent, in time order.

`EventApplier.apply(events)` groups a batch by user and runs `APPLY_LUA` once per user (pipelined).
The script touches only that user's three keys, which share one hash slot (mvke/runtime/keys.py:
the user hash `mvke:user:<id>` and `{mvke:user:<id>}:ev|:seen`), so it runs on a Redis Cluster as
on one node, and a reader sees the user before or after the whole batch, never half of it.

Per event (the rules are data: mvke/runtime/events.py):
* duplicate: its id is in the user's `:seen` set -> nothing changes;
* late: the set is full (`dedup_ids`) and the event is older than every id in it, so a duplicate
  could no longer be recognised -> not applied, counted (never applied twice);
* else: remembered (the oldest id beyond `dedup_ids` is forgotten); each history rule of its type
  inserts its values at the place of its order key (the `:ev` hash keeps each history's order keys;
  the values a batch load wrote count as older than any event), drops the older entry of a
  distinct value, caps the list; each counter rule of its type is incremented.
After the events, every bucket rule is recomputed from the counters, and `_event_at` = Redis time.
A user not seen before is created (cold start). The `:ev` order keys are reset when the user's
`_loaded_at` changes (a batch reload replaced the values they described).
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterable

from mvke.runtime.events import EVENT_AT_FIELD, LOADED_AT_FIELD, ApplyCounts, Event, EventRules
from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import is_cluster

AUX_TTL_S = 30 * 86_400   # event state of a user without events for this long expires

# KEYS: user hash, its :ev hash, its :seen zset.  ARGV[1] rules (EventRules.to_lua), ARGV[2] JSON
# [[event_id, order key, type, {list name: [values]}], ...], ARGV[3] TTL of the :ev/:seen keys.
# Returns {applied, duplicate, late}.
APPLY_LUA = r"""
local R = cjson.decode(ARGV[1])
local E = cjson.decode(ARGV[2])
local user, aux, seen = KEYS[1], KEYS[2], KEYS[3]
local SEP = '|'
local loaded = redis.call('HGET', user, '_loaded_at') or ''
if (redis.call('HGET', aux, 'base') or '') ~= loaded or redis.call('EXISTS', aux) == 0 then
  redis.call('DEL', aux)
  redis.call('HSET', aux, 'base', loaded)
end

local function split(s)
  local out = {}
  if not s or s == '' then return out end
  for part in string.gmatch(s, '([^|]+)') do out[#out + 1] = part end
  return out
end

local state = {}
local function history(f)
  local st = state[f]
  if st then return st end
  local v = split(redis.call('HGET', user, f))
  local o = split(redis.call('HGET', aux, 't:' .. f))
  local ord = {}
  for i = 1, #v do ord[i] = (#o == #v) and tonumber(o[i]) or 0 end
  st = {v = v, o = ord}
  state[f] = st
  return st
end

local function insert(st, values, key, cap, distinct)
  local v, o = st.v, st.o
  local own, inev = {}, {}
  for _, x in ipairs(values) do
    if not (distinct and inev[x]) then inev[x] = true; own[#own + 1] = x end
  end
  if distinct then
    local keep = {}
    for _, x in ipairs(own) do
      local newer = false
      for j = #v, 1, -1 do
        if v[j] == x then
          if o[j] >= key then newer = true else table.remove(v, j); table.remove(o, j) end
        end
      end
      if not newer then keep[#keep + 1] = x end
    end
    own = keep
  end
  if #own == 0 then return false end
  local pos = #v + 1
  for i = 1, #v do if o[i] < key then pos = i; break end end
  for k = #own, 1, -1 do table.insert(v, pos, own[k]); table.insert(o, pos, key) end
  while #v > cap do table.remove(v); table.remove(o) end
  return true
end

local applied, dup, late = 0, 0, 0
local dirty = {}
local counted = false
for _, e in ipairs(E) do
  local id, key, typ, lists = e[1], e[2], e[3], e[4]
  if redis.call('ZSCORE', seen, id) then
    dup = dup + 1
  else
    local n = redis.call('ZCARD', seen)
    local oldest = (n >= R.k) and tonumber(redis.call('ZRANGE', seen, 0, 0, 'WITHSCORES')[2]) or nil
    if oldest and key < oldest then
      late = late + 1
    else
      redis.call('ZADD', seen, string.format('%.0f', key), id)
      if n + 1 > R.k then redis.call('ZREMRANGEBYRANK', seen, 0, n - R.k) end
      applied = applied + 1
      for _, h in ipairs(R.h) do
        local vals = lists[h.src]
        if h.on[typ] and vals and #vals > 0 then
          if insert(history(h.f), vals, key, h.cap, h.d == 1) then dirty[h.f] = true end
        end
      end
      for _, c in ipairs(R.c) do
        if c.on[typ] then redis.call('HINCRBY', user, c.f, 1) end
      end
    end
  end
end

if applied > 0 then
  for f, _ in pairs(dirty) do
    local st = state[f]
    local keys = {}
    for i = 1, #st.o do keys[i] = string.format('%.0f', st.o[i]) end
    redis.call('HSET', user, f, table.concat(st.v, SEP))
    redis.call('HSET', aux, 't:' .. f, table.concat(keys, SEP))
  end
  for _, b in ipairs(R.b) do
    local num = tonumber(redis.call('HGET', user, b.n) or '0') or 0
    local value = num
    if b.d ~= '' then
      local den = tonumber(redis.call('HGET', user, b.d) or '0') or 0
      if den == 0 then value = nil else value = num / den end
    end
    if value == nil then
      redis.call('HDEL', user, b.f)
    else
      local i = 0
      for _, edge in ipairs(b.e) do if edge < value then i = i + 1 end end
      redis.call('HSET', user, b.f, b.l[i + 1])
    end
  end
  local now = redis.call('TIME')
  redis.call('HSET', user, '_event_at', now[1] .. '.' .. string.format('%06d', tonumber(now[2])))
end
local ttl = tonumber(ARGV[3])
if ttl and ttl > 0 then
  redis.call('EXPIRE', aux, ttl)
  redis.call('EXPIRE', seen, ttl)
end
return {applied, dup, late}
"""

assert LOADED_AT_FIELD == "_loaded_at" and EVENT_AT_FIELD == "_event_at"   # the names the script writes


def by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    """A batch grouped by user, each user's events oldest first (fewer insertions mid-history)."""
    groups: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        groups[e.user_id].append(e)
    for evs in groups.values():
        evs.sort(key=lambda e: e.order)
    return groups


def script_args(rules_lua: str, events: list[Event], aux_ttl_s: int) -> list[Any]:
    return [rules_lua, json.dumps([[e.event_id, e.order, e.type, e.lists] for e in events],
                                  separators=(",", ":")), aux_ttl_s]


class EventApplier:
    """Applies batches of events with a sync client (one node or a cluster: `redis_client.connect`)."""

    def __init__(self, client: Any, keys: Keys, rules: EventRules, aux_ttl_s: int = AUX_TTL_S):
        self.client, self.keys, self.rules, self.aux_ttl_s = client, keys, rules, aux_ttl_s
        self.rules_lua = rules.to_lua()
        self.sha = ""
        self.cluster = is_cluster(client)
        self._loaded = False

    def user_keys(self, user_id: str) -> list[str]:
        return [self.keys.user(user_id), self.keys.user_events(user_id), self.keys.user_seen(user_id)]

    def apply(self, events: Iterable[Event]) -> ApplyCounts:
        """Apply a batch; Redis connection errors raise (nothing is acknowledged, the batch is redone:
        the script's idempotence makes that harmless); a user's script error fails only its events."""
        groups = by_user(events)
        counts = ApplyCounts()
        if not groups:
            return counts
        users = list(groups)
        if not self._loaded:
            self.sha = self.client.script_load(APPLY_LUA)    # a cluster loads it on every master
            self._loaded = True
        pipe = self.client.pipeline(transaction=False)
        for u in users:   # a cluster pipeline routes each EVALSHA by its keys' slot
            pipe.execute_command("EVALSHA", self.sha, 3, *self.user_keys(u),
                                 *script_args(self.rules_lua, groups[u], self.aux_ttl_s))
        replies = pipe.execute(raise_on_error=False)
        if any(isinstance(r, Exception) and "NOSCRIPT" in str(r) for r in replies):
            self._loaded = False      # a restarted or new master forgot the script: load it, redo (idempotent)
            return self.apply([e for u in users for e in groups[u]])
        for u, reply in zip(users, replies):
            if isinstance(reply, Exception):
                if isinstance(reply, (ConnectionError, TimeoutError)) or type(reply).__name__ in (
                        "ConnectionError", "TimeoutError", "BusyLoadingError", "ClusterDownError"):
                    raise reply
                counts.failed += [(e, f"{type(reply).__name__}: {reply}") for e in groups[u]]
                continue
            applied, dup, late = (int(x) for x in reply)
            counts.applied += applied
            counts.duplicate += dup
            counts.late += late
        return counts
