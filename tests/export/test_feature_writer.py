"""model_export/feature_writer.py: column-wise validation + RESP encoding == the per-row reference."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from model_export.feature_store import validate_row
from model_export.feature_writer import (LOADED_AT_FIELD, FeatureLoadError, FeatureSink, encode_commands,
                                         store_columns, wire_bytes)
from mvke.runtime.redis_client import connect

KINDS = {"age": "cat", "score": "cat", "flag": "cat", "clicked": "multi", "counts": "multi", "oops": "multi",
         "nested": "cat", "absent": "cat"}


def awkward_table() -> pa.Table:
    """Every kind of value the loader meets, incl. rows it must reject."""
    return pa.table({
        "user_id": pa.array(["u1", "u2", None, "", "u5", "u6", "u7", "ü8"]),
        "age": pa.array(["a1", None, "a3", "a4", "a5", "a6", "a7", "ä8"]),
        "score": pa.array([1.0, float("nan"), 2.5, None, 3.0, 1e20, -0.0, 7.0]),
        "flag": pa.array([True, False, None, True, True, False, True, None]),
        "clicked": pa.array([["t1", "t2"], [], None, ["x"], ["bad|item"], ["t3", None], ["t4"], ["ü"]]),
        "counts": pa.array([[1, 2], [3], None, [], [4], [5], [6], [7]]),
        "oops": pa.array(["not", None, "a", "list", None, None, None, None]),   # multi field holding scalars
        "nested": pa.array([None, None, None, None, None, None, [1], None], pa.list_(pa.int64())),
    })


def reference(table: pa.Table):
    stored, rejects = {}, []
    for row in table.to_pylist():
        mapping, field, reason = validate_row(row, KINDS)
        if mapping is None:
            rejects.append((str(row.get("user_id")), field, reason))
        else:
            stored[str(row["user_id"])] = mapping
    return stored, rejects


def test_store_columns_matches_the_per_row_reference():
    table = awkward_table()
    want, want_rejects = reference(table)
    cols = store_columns(table, KINDS)
    got = {}
    for i, uid in enumerate(cols.user_ids.to_pylist()):
        got[uid] = {name: values[i].as_py() for name, values in cols.fields if values[i].as_py() is not None}
    assert got == want
    assert cols.rejects == want_rejects
    assert {r[1] for r in want_rejects} >= {"user_id", "clicked", "oops", "nested"}   # the test covers them


def test_commands_are_valid_resp_with_byte_lengths():
    import hiredis
    cols = store_columns(awkward_table(), KINDS)
    data = wire_bytes(encode_commands(cols, "mvke:user:", "123", ttl_s=60))
    reader = hiredis.Reader()
    reader.feed(data)
    commands = []
    while (c := reader.gets()) is not False:
        commands.append(c)
    assert len(commands) == 5 * len(cols.user_ids)
    assert [c[0] for c in commands[:5]] == [b"MULTI", b"DEL", b"HSET", b"EXPIRE", b"EXEC"]
    hset = commands[2]
    assert hset[1] == f"mvke:user:{cols.user_ids[0]}".encode() and hset[-2:] == [LOADED_AT_FIELD.encode(), b"123"]


def _expected_hashes(table):
    stored, _ = reference(table)
    return {k: {**v, LOADED_AT_FIELD: "7"} for k, v in stored.items()}


def _read_all(client, keys):
    return {k: {f.decode(): v.decode() for f, v in client.hgetall(f"mvke:user:{k}").items()} for k in keys}


def _load(client, table, ttl_s=None, batch_rows=3):
    sink = FeatureSink(client, "mvke:user:", "7", ttl_s)
    for batch in table.to_batches(max_chunksize=batch_rows):
        sink.write(store_columns(batch, KINDS))
    sink.flush()
    sink.close()
    return sink


def test_single_node_load_replaces_hashes_and_sets_ttl(redis_server, redis_client):
    table = awkward_table()
    redis_client.hset("mvke:user:u2", mapping={"stale": "x"})      # a re-load leaves no stale field
    client = connect(redis_server.url)
    _load(client, table, ttl_s=300)
    want = _expected_hashes(table)
    assert _read_all(redis_client, want) == want
    assert 0 < redis_client.ttl("mvke:user:u2") <= 300
    client.close()


@pytest.mark.parametrize("ttl_s", [None, 60])
def test_a_refused_batch_stops_the_load_naming_a_user_and_the_reason(private_redis, ttl_s):
    """Replies are checked in bulk; a batch holding an error (OOM: maxmemory reached mid-load) has
    fewer reply lines than a clean one: it is parsed reply by reply, not waited on until a timeout."""
    r = private_redis.client()
    n = 3000
    table = pa.table({"user_id": [f"o{i}" for i in range(n)], "age": ["a" * 200] * n, "clicked": [["t1"]] * n})
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 300_000)
    client = connect(private_redis.url, socket_timeout=20)
    sink = FeatureSink(client, "mvke:user:", "7", ttl_s)
    with pytest.raises(FeatureLoadError, match=r"Redis refused user o\d+: OOM"):
        for batch in table.to_batches(max_chunksize=250):
            sink.write(store_columns(batch, KINDS))
        sink.flush()
    sink.close()
    loaded = sum(r.exists(f"mvke:user:o{i}") for i in range(n))
    assert 0 < loaded < n                              # the batches before the refusal went in whole
    assert r.hget("mvke:user:o0", "age") == b"a" * 200
    assert (r.ttl("mvke:user:o0") > 0) == bool(ttl_s)
    client.close()


def test_cluster_load_routes_every_user_to_its_slot(redis_cluster, cluster_client):
    ids = [f"user{i}" for i in range(2000)]
    table = pa.table({"user_id": ids, "age": [f"a{i % 7}" for i in range(2000)],
                      "clicked": [[f"t{i % 5}", "t9"] for i in range(2000)]})
    client = connect(redis_cluster.url)
    sink = _load(client, table, batch_rows=512)
    assert sink.redone == 0 and len(sink.nodes_written) == 3
    per_node = [n.client().dbsize() for n in redis_cluster.nodes]
    assert sum(per_node) == 2000 and min(per_node) > 400
    assert cluster_client.hgetall("mvke:user:user42") == {b"age": b"a0", b"clicked": b"t2|t9",
                                                         LOADED_AT_FIELD.encode(): b"7"}
    client.close()


def test_cluster_users_sent_to_the_wrong_node_are_redone(redis_cluster, cluster_client):
    """A stale slot map (as during a reshard) gives MOVED: those users go through redis-py instead."""
    table = pa.table({"user_id": [f"m{i}" for i in range(300)], "age": ["a"] * 300,
                      "clicked": [["t1"]] * 300})
    client = connect(redis_cluster.url)
    sink = FeatureSink(client, "mvke:user:", "7", ttl_s=None)
    sink._refresh_slots()
    sink._slot_owner[:] = 0                       # pretend the first master owns every slot
    sink.write(store_columns(table, KINDS))
    sink.flush()
    sink.close()
    assert 150 < sink.redone < 300                # about two thirds were on the other masters
    assert all(cluster_client.hget(f"mvke:user:m{i}", "age") == b"a" for i in range(300))
    client.close()


def test_default_loader_processes_leave_a_core_to_a_local_redis(monkeypatch):
    import os

    from model_export.features_job import default_workers
    from mvke.runtime.redis_client import RedisTarget
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_workers(RedisTarget("redis://127.0.0.1:6379/0", False)) == 3
    assert default_workers(RedisTarget("redis://localhost:7000", True)) == 3
    assert default_workers(RedisTarget("unix:///run/redis.sock", False)) == 3
    assert default_workers(RedisTarget("rediss://redis.example.internal:6380", False)) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_workers(RedisTarget("redis://127.0.0.1:6379/0", False)) == 1


def test_load_over_tls_sends_inline_and_stores_every_user(tls_redis):
    """A TLS socket is not read and written from two threads: its batches go out inline."""
    table = awkward_table()
    client = connect(tls_redis.url)
    sink = _load(client, table, ttl_s=None, batch_rows=2)
    assert sink.nodes_written
    want = _expected_hashes(table)
    assert _read_all(client, want) == want
    client.close()


def test_a_read_that_times_out_never_returns_its_connection_to_the_pool(private_redis):
    """Redis stops answering mid-load (CLIENT PAUSE): the load fails with the timeout, and the half-read
    connection is dropped, not handed back to the pool where the next part would read stale replies."""
    r = private_redis.client()
    client = connect(private_redis.url, socket_timeout=1)
    sink = FeatureSink(client, "mvke:user:", "7", None)
    table = pa.table({"user_id": [f"p{i}" for i in range(50)], "age": ["a"] * 50, "clicked": [["t1"]] * 50})
    r.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    with pytest.raises(FeatureLoadError, match="reading Redis replies failed"):
        sink.write(store_columns(table, KINDS))
        sink.flush()
    conn = next(iter(sink.wires.values())).conn
    sink.close()
    assert conn._sock is None                  # disconnected, not released as a live stream
    r.execute_command("CLIENT", "UNPAUSE")
    sink = _load(client, table, batch_rows=20)  # the pool gives a fresh connection: every user loads
    assert all(r.hget(f"mvke:user:p{i}", "age") == b"a" for i in range(50))
    client.close()
