"""Arrow record batches of raw user features -> one Redis hash per user, at wire speed.

The loader's hot loop, without a Python object per value:

1. `store_columns`: every field becomes an Arrow string column of feature-store
   values (multi-valued fields `|`-joined with `pc.binary_join`), and the rows that
   cannot be stored are found column-wise (no user id, a list in a single-valued
   field, a scalar where a list is expected, a list item containing `|`), with the
   same reasons as `validate_row`, the per-row reference the service also follows.
2. `encode_commands`: Arrow's element-wise string kernels write each user's Redis
   commands in RESP, `MULTI, DEL key, HSET key f1 v1 ... [EXPIRE key ttl], EXEC`,
   so replacing a user's hash is atomic for readers (never a user between the DEL and
   the HSET) and touches one key (legal in a Redis Cluster). The command strings of a
   batch lie back to back in the array's value buffer: that buffer is what is sent.
3. `FeatureSink` sends each batch on a raw connection per master (one for a single
   node; the users of a cluster are routed by hash slot, computed here) and reads the
   replies of batch k-1 while Redis works on batch k (checked in bulk: `_Wire`). Users
   whose commands met MOVED/ASK (a slot migrating) are redone one by one through
   redis-py's cluster client, which follows redirections, as an atomic Lua script.

Measured on 2 cores: 10-18 us of client CPU and 11-21 us of redis-server CPU per user of
the synthetic schema (26 fields; the range is two Intel machines), against ~130 us of client
CPU for the per-row redis-py pipeline this replaced; 45,000 users/s end to end with one
loader beside a local Redis (docs/SCALING.md).
"""
from __future__ import annotations

import math
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from mvke.runtime.events import LOADED_AT_FIELD   # the name the event script reads too
from mvke.runtime.feature_values import MISSING_USER_ID, first_problems, is_list_type, is_nested_type, present
from mvke.runtime.features import MULTI_SEP
from mvke.runtime.redis_client import is_cluster


def load_stamp() -> str:
    """`_loaded_at` of a load: Unix seconds to the microsecond (the age of features counts from it,
    and a user's event state resets when it changes: two loads in one second differ)."""
    return f"{time.time():.6f}"


# KEYS[1] user hash; ARGV: ttl ('' for none), then field, value, ...  (the slow path of FeatureSink)
REPLACE_HASH_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""


class FeatureLoadError(RuntimeError):
    """Redis refused or lost a batch (the part is not marked done; a rerun redoes it)."""


@dataclass
class StoreColumns:
    """The storable rows of a batch: user ids and per field a string column (null = missing)."""
    user_ids: pa.Array
    fields: list[tuple[str, pa.Array]]
    rejects: list[tuple[str, str, str]] = field(default_factory=list)   # (user_id, field, reason)


# ---- 1. columns ----------------------------------------------------------------------------------


def _as_str(col: pa.Array) -> pa.Array:
    """Scalars -> the strings `str(value)` gives (Arrow's own cast where it agrees with Python)."""
    t = col.type
    if pa.types.is_dictionary(t):
        return _as_str(col.dictionary_decode())
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t) or pa.types.is_integer(t):
        return pc.cast(col, pa.string())
    # floats (1.0 -> "1.0"), booleans ("True"), bytes, dates...: Python's str(), NaN -> missing
    return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                     for v in col.to_pylist()], pa.string())


def _multi_column(col: pa.Array) -> pa.Array:
    """A list column of scalars -> `|`-joined strings (the stored form; rows are checked beforehand)."""
    items = pc.list_flatten(col)
    if items.null_count:
        items = pc.fill_null(_as_str(items), "None")          # str(None), as the per-row path writes it
    else:
        items = _as_str(items)
    offsets = pc.list_value_length(col)
    rebuilt = pa.ListArray.from_arrays(_offsets_of(offsets), items, mask=col.is_null())
    return pc.binary_join(rebuilt, MULTI_SEP)


def _offsets_of(lengths: pa.Array) -> pa.Array:
    n = np.asarray(pc.fill_null(lengths, 0), dtype=np.int64)
    return pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))


def store_columns(batch: pa.RecordBatch | pa.Table, kinds: dict[str, str]) -> StoreColumns:
    """Feature-store strings per field for the rows that can be stored; the others as rejects.

    Same rules and reasons as `validate_row` and every other entry point (mvke/runtime/feature_values.py):
    the first failing field (user_id first, then the schema's order) names the row's reason; a column
    absent from the batch is missing.
    """
    names = set(batch.schema.names)
    if "user_id" not in names:
        raise ValueError("users table has no user_id column")
    uid_col = batch.column("user_id")
    uid_col = uid_col.combine_chunks() if isinstance(uid_col, pa.ChunkedArray) else uid_col
    uids = _as_str(uid_col)
    no_id = ~present(uid_col) | np.asarray(pc.fill_null(pc.equal(uids, ""), True))
    reasons = {int(i): ("user_id", MISSING_USER_ID) for i in np.flatnonzero(no_id)}
    for row, why in first_problems(batch, kinds).items():
        reasons.setdefault(row, why)
    columns: list[tuple[str, pa.Array]] = []
    for name, kind in kinds.items():
        if name not in names:
            continue
        col = batch.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if kind == "multi" and is_list_type(col.type) and not is_nested_type(col.type.value_type):
            columns.append((name, _multi_column(col)))
        elif kind == "cat" and not is_nested_type(col.type):
            columns.append((name, _as_str(col)))
        # else every row holding a value is rejected (first_problems): nothing of this column is stored
    bad = np.zeros(batch.num_rows, dtype=bool)
    bad[list(reasons)] = True
    rejects = [(str(uid_col[i].as_py()), *reasons[i]) for i in sorted(reasons)]
    if bad.any():
        keep = pa.array(np.flatnonzero(~bad))
        uids = uids.take(keep)
        columns = [(name, values.take(keep)) for name, values in columns]
    return StoreColumns(uids, columns, rejects)


# ---- 2. RESP -------------------------------------------------------------------------------------
def _bulk(arr: pa.Array) -> pa.Array:
    """Each string as a RESP bulk string `$<bytes>\\r\\n<value>\\r\\n` (null stays null)."""
    return pc.binary_join_element_wise("$", pc.cast(pc.binary_length(arr), pa.string()), "\r\n", arr, "\r\n", "")


def _bulk_const(text: str) -> str:
    return f"${len(text.encode())}\r\n{text}\r\n"


def encode_commands(cols: StoreColumns, key_prefix: str, stamp: str, ttl_s: int | None) -> pa.Array:
    """One string per user: MULTI, DEL, HSET (+ EXPIRE), EXEC, in RESP (see the module docstring)."""
    n = len(cols.user_ids)
    keys = _bulk(pc.binary_join_element_wise(key_prefix, cols.user_ids, ""))
    parts, count = [], np.full(n, 4, dtype=np.int64)      # HSET, key, _loaded_at, stamp
    for name, values in cols.fields:
        seg = pc.binary_join_element_wise(_bulk_const(name), _bulk(values), "")
        count += 2 * np.asarray(seg.is_valid())
        parts.append(pc.fill_null(seg, ""))
    hset = pc.binary_join_element_wise("*", pa.array(count.astype(str)), "\r\n$4\r\nHSET\r\n", keys, "")
    expire = (pc.binary_join_element_wise("*3\r\n$6\r\nEXPIRE\r\n", keys, _bulk_const(str(ttl_s)), "")
              if ttl_s else "")
    return pc.binary_join_element_wise(
        "*1\r\n$5\r\nMULTI\r\n", pc.binary_join_element_wise("*2\r\n$3\r\nDEL\r\n", keys, ""), hset, *parts,
        _bulk_const(LOADED_AT_FIELD) + _bulk_const(stamp), expire, "*1\r\n$4\r\nEXEC\r\n", "")


def wire_bytes(commands: pa.Array) -> bytes:
    """The commands of a string array back to back (a slice of its value buffer)."""
    if len(commands) == 0:
        return b""
    if isinstance(commands, pa.ChunkedArray):
        commands = commands.combine_chunks()
    offsets = np.frombuffer(commands.buffers()[1], dtype=np.int32)[commands.offset: commands.offset + len(commands) + 1]
    return commands.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]


def replies_per_user(ttl_s: int | None) -> int:
    return 5 if ttl_s else 4


def lines_per_user(replies: int) -> int:
    """RESP lines of one user's replies that went through: +OK (MULTI), +QUEUED per queued
    command, then EXEC's array header and one integer per queued command."""
    queued = replies - 2
    return 1 + queued + 1 + queued


# ---- 3. sending -----------------------------------------------------------------------------------
class _Wire:
    """A raw, already authenticated connection (redis-py's, TLS included) and its reply stream.

    The replies of a loader's commands are only status lines (+OK, +QUEUED), integers and the
    EXEC array of those, one CRLF-terminated line each, and an error is the only line that
    starts with `-`. So a batch that went through is recognised in bulk: the next
    `users x lines_per_user` lines of the stream hold no `-`. Only a batch with an error is
    parsed reply by reply (`_read_slow`) to find which users failed and why.

    On a plain TCP connection a thread sends (`sendall` waits while Redis drains a batch of
    megabytes, and releases the GIL): the loader encodes the next batch meanwhile, so Redis is
    not left idle between batches. TLS sockets are not safe to read and write from two threads:
    they send inline.
    """

    def __init__(self, pool: Any):
        self.pool = pool
        self.conn = pool.get_connection()
        # redis-py has no public raw-socket API; its connection did AUTH/TLS/HELLO, we only stream on it.
        self.sock = self.conn._sock
        self.buf = bytearray()
        self.pending: list[tuple[int, np.ndarray]] = []   # (batch number, row indices) per sent batch
        self._outbox: queue.Queue | None = None
        self._send_error: BaseException | None = None
        self._broken = False      # a read or send failed mid-stream: never hand this connection back as is
        if not isinstance(self.sock, ssl.SSLSocket):
            self._outbox = queue.Queue(maxsize=1)
            self._sender = threading.Thread(target=self._send_loop, name="feature-sink-send", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while (data := self._outbox.get()) is not None:
            if self._send_error is None:
                try:
                    self.sock.sendall(data)
                except BaseException as e:   # anything: a dead sender would leave send() blocked on the queue
                    self._send_error = e

    def _check_sent(self) -> None:
        if self._send_error is not None:
            self._broken = True
            raise self._send_error

    def send(self, batch_no: int, commands: pa.Array, rows: np.ndarray) -> None:
        self._check_sent()
        if self._outbox is None:
            try:
                self.sock.sendall(wire_bytes(commands))
            except BaseException:
                self._broken = True
                raise
        else:
            self._outbox.put(wire_bytes(commands))
        self.pending.append((batch_no, rows))

    def _recv(self) -> None:
        self._check_sent()
        try:
            data = self.sock.recv(1 << 20)
        except BaseException:
            self._broken = True
            raise
        if not data:
            self._broken = True
            raise ConnectionError("Redis closed the connection")
        self.buf += data

    def _end_of_clean_lines(self, lines: int) -> int | None:
        """Byte offset just past the `lines`-th line of the stream, receiving until it is there;
        None as soon as the stream shows an error (a batch with errors may have fewer lines)."""
        newlines = np.flatnonzero(np.frombuffer(self.buf, dtype=np.uint8) == 10)
        seen = 0
        while len(newlines) < lines:
            if self.buf.find(b"-", seen) >= 0:
                return None
            seen = len(self.buf)
            self._recv()
            more = np.flatnonzero(np.frombuffer(self.buf, dtype=np.uint8, offset=seen) == 10) + seen
            newlines = np.concatenate([newlines, more])
        end = int(newlines[lines - 1]) + 1
        return None if self.buf.find(b"-", seen, end) >= 0 else end   # bytes before `seen` were checked

    def read(self, per_user: int) -> list[tuple[int, str]]:
        """Replies of the oldest sent batch -> [(row, first error)] of its users that failed."""
        _, rows = self.pending.pop(0)
        end = self._end_of_clean_lines(len(rows) * lines_per_user(per_user))
        if end is None:
            return self._read_slow(rows, per_user)
        del self.buf[:end]
        return []

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._recv()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def _read_slow(self, rows: np.ndarray, per_user: int) -> list[tuple[int, str]]:
        failed = []
        for row in rows.tolist():
            err = None
            for _ in range(per_user):
                line = self._line()
                items = [self._line() for _ in range(int(line[1:]))] if line.startswith(b"*") else [line]
                bad = next((x for x in items if x.startswith(b"-")), None)
                if err is None and bad is not None:
                    err = bad[1:].decode(errors="replace")
            if err is not None:
                failed.append((row, err))
        return failed

    def close(self) -> None:
        # replies never read (or a read that failed): the stream is mid-way, do not hand it back as is
        mid_stream = bool(self.pending) or self._broken
        if mid_stream:
            self.conn.disconnect()    # also wakes a send stuck on a peer that reads no more
        if self._outbox is not None:
            self._outbox.put(None)
            self._sender.join()
        self.pool.release(self.conn)


# Replies that mean "this slot is moving": the user is redone through redis-py, which follows them.
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "EXECABORT")


class FeatureSink:
    """Writes encoded users to one Redis node or a Redis Cluster, pipelined one batch deep.

    `client` is a sync client from `mvke.runtime.redis_client.connect`; `key_prefix` the user
    key without the id (`Keys.user("")`); `stamp` the `_loaded_at` value.
    """

    def __init__(self, client: Any, key_prefix: str, stamp: str, ttl_s: int | None = None):
        self.client, self.key_prefix, self.stamp, self.ttl_s = client, key_prefix, stamp, ttl_s
        self.per_user = replies_per_user(ttl_s)
        self.cluster = is_cluster(client)
        self.wires: dict[str, _Wire] = {}
        self.redone = 0                       # users redone through redis-py (their slot moved)
        self.nodes_written: set[str] = set()  # masters this sink wrote to
        self._slot_owner: np.ndarray | None = None
        self._node_names: list[str] = []
        self._replace = client.register_script(REPLACE_HASH_LUA)
        self._inflight: list[tuple[int, StoreColumns]] = []
        self._sent = 0

    # routing
    def _refresh_slots(self) -> None:
        slots = self.client.nodes_manager.slots_cache
        names = sorted({nodes[0].name for nodes in slots.values() if nodes})
        owner = np.full(REDIS_CLUSTER_HASH_SLOTS, -1, dtype=np.int32)
        for slot, nodes in slots.items():
            if nodes:
                owner[slot] = names.index(nodes[0].name)
        self._slot_owner, self._node_names = owner, names

    def _route(self, user_ids: pa.Array) -> dict[str, np.ndarray]:
        if not self.cluster:
            return {"": np.arange(len(user_ids))}
        if self._slot_owner is None:
            self._refresh_slots()
        prefix = self.key_prefix.encode()
        slots = np.fromiter((key_slot(prefix + u.encode()) for u in user_ids.to_pylist()), dtype=np.int32,
                            count=len(user_ids))
        owner = self._slot_owner[slots]
        if (owner < 0).any():
            raise FeatureLoadError("some hash slots have no master (the cluster is not fully covered)")
        return {self._node_names[i]: np.flatnonzero(owner == i) for i in np.unique(owner)}

    def _wire(self, name: str) -> _Wire:
        if name not in self.wires:
            pool = (self.client.get_node(node_name=name).redis_connection.connection_pool if self.cluster
                    else self.client.connection_pool)
            self.wires[name] = _Wire(pool)
            self.nodes_written.add(name)
        return self.wires[name]

    # sending
    def write(self, cols: StoreColumns) -> None:
        """Send one batch; the replies of the batch before are read meanwhile (`flush` reads the rest)."""
        if len(cols.user_ids) == 0:
            return
        commands = encode_commands(cols, self.key_prefix, self.stamp, self.ttl_s)
        batch_no = self._sent
        try:
            for name, rows in self._route(cols.user_ids).items():
                subset = commands if len(rows) == len(commands) else commands.take(pa.array(rows))
                self._wire(name).send(batch_no, subset, rows)
        except OSError as e:
            raise FeatureLoadError(f"sending to Redis failed: {e}") from e
        self._sent += 1
        self._inflight.append((batch_no, cols))
        self._settle(keep=1)

    def flush(self) -> None:
        self._settle(keep=0)

    def _settle(self, keep: int) -> None:
        while len(self._inflight) > keep:
            batch_no, cols = self._inflight.pop(0)
            failed: list[tuple[int, str]] = []
            try:
                for wire in self.wires.values():
                    if wire.pending and wire.pending[0][0] == batch_no:
                        failed += wire.read(self.per_user)
            except OSError as e:
                raise FeatureLoadError(f"reading Redis replies failed: {e}") from e
            for row, err in failed:
                if not err.startswith(_REDIRECTS):
                    raise FeatureLoadError(f"Redis refused user {cols.user_ids[row]}: {err}")
            if failed:
                self._redo(cols, sorted(row for row, _ in failed))

    def _redo(self, cols: StoreColumns, rows: list[int]) -> None:
        """Users whose slot moved: one atomic script each through redis-py (it follows MOVED/ASK)."""
        for row in rows:
            args = [str(self.ttl_s or "")]
            for name, values in cols.fields:
                v = values[row].as_py()
                if v is not None:
                    args += [name, v]
            args += [LOADED_AT_FIELD, self.stamp]
            self._replace(keys=[self.key_prefix + cols.user_ids[row].as_py()], args=args)
        self.redone += len(rows)
        if self.cluster:
            self._refresh_slots()

    def close(self) -> None:
        for wire in self.wires.values():
            try:
                wire.close()
            except Exception:  # a dead connection: nothing to give back
                pass
        self.wires.clear()
