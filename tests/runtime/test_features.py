"""The feature schema and its one encoder, `FeatureSchema.encode` (mvke/runtime/features.py).

Every path gives the ids of the written-out rule (`reference_ids` below: global id 0 is
padding, field f's OOV id is its offset, its i-th known value offset + 1 + i; `str(value)`
is looked up; multi values are lists or `|`-joined strings cut to max_len): the
feature-store fast path (rows of str), the value-by-value path (any raw values), and the
vectorised Arrow path (batch tagging), which must also report the same errors.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvke.runtime.features import MULTI_SEP, PAD_ID, FeatureError, FeatureSchema, FieldSpec, to_store_value


def reference_ids(schema: FeatureSchema, row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """The id rule spelled out for one well-typed row: (cat ids, multi ids per multi field)."""
    def known(f: FieldSpec, v: Any) -> int:
        off = schema.offsets[schema.names.index(f.name)]
        return off + 1 + f.vocab.index(str(v)) if str(v) in f.vocab else off
    cat = [schema.offsets[schema.names.index(f.name)] if row.get(f.name) is None else known(f, row[f.name])
           for f in schema.cat_fields]
    multi = []
    for f in schema.multi_fields:
        v = row.get(f.name)
        items = [] if v is None or v == "" else (v.split(MULTI_SEP) if isinstance(v, str) else list(v))
        ids = [known(f, x) for x in items[: f.max_len]]
        multi.append(ids + [PAD_ID] * (schema.multi_len - len(ids)))
    return cat, multi


@pytest.fixture(scope="module")
def synth_users(dataset_dir) -> pa.Table:
    return pq.read_table(dataset_dir("synthetic") / "users.parquet")


@pytest.fixture(scope="module")
def synth_schema(dataset_dir, synth_users) -> FeatureSchema:
    """Vocabularies from 200 users only, so the other users bring unseen values (OOV)."""
    meta = json.loads((dataset_dir("synthetic") / "meta.json").read_text())
    users = synth_users.slice(0, 200).to_pylist()
    return FeatureSchema.build({k: [u[k] for u in users] for k in meta["fields"]}, meta["fields"],
                               meta.get("max_lens"))


def _toy_schema() -> FeatureSchema:
    return FeatureSchema.build({"g": ["a", "b", "a", None], "h": [["x", "y"], ["y"], [], None]},
                               {"g": "cat", "h": "multi"}, {"h": 3})


def test_unseen_values_map_to_the_field_oov_id():
    s = _toy_schema()
    g, h = s.offsets
    assert s.fields[0].vocab == ["a", "b"] and s.fields[1].vocab == ["x", "y"]
    cat, multi = s.encode([{"g": "a", "h": ["y", "new", "x", "x"]}, {"g": "zzz", "h": "y|new"}, {}]).ids()
    ida, idy, idx_ = cat[0, 0], multi[0, 0, 0], multi[0, 0, 2]
    assert g < ida <= g + 2 and h < idy <= h + 2 and idx_ != idy
    assert multi[0, 0].tolist() == [idy, h, idx_]          # max_len 3 keeps the first three
    assert cat[1, 0] == g                                  # unseen -> OOV of that field
    assert multi[1, 0].tolist() == [idy, h, PAD_ID]        # "|"-joined string == list
    assert cat[2, 0] == g and multi[2, 0].tolist() == [PAD_ID] * 3  # missing field
    assert s.num_ids == 1 + 3 + 3


@pytest.mark.parametrize("row, field", [
    ({"g": ["a"]}, "g"), ({"g": ("a", "b")}, "g"), ({"g": {"a": 1}}, "g"), ({"g": np.array(["a"])}, "g"),
    ({"h": 5}, "h"), ({"h": {"x": 1}}, "h"), ({"h": [["x"]]}, "h"), ({"h": [np.array(["x"])]}, "h"),
])
def test_wrong_type_names_the_field_and_spares_the_other_rows(row, field):
    enc = _toy_schema().encode([{"g": "a"}, row, {"h": ["x"]}])
    assert set(enc.errors) == {1} and enc.ok.tolist() == [True, False, True]
    err = enc.errors[1]
    assert err.field == field and str(err).startswith(f"{field}: ")
    with pytest.raises(FeatureError) as raised:
        enc.ids()
    assert raised.value is err


def test_schema_round_trip():
    s = _toy_schema()
    again = FeatureSchema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again.to_dict() == s.to_dict()
    assert again.offsets == s.offsets and again.num_ids == s.num_ids and again.multi_len == s.multi_len
    rows = [{"g": "b", "h": ["x", "q"]}, {"g": "?", "h": "y"}]
    for a, b in zip(s.encode(rows).ids(), again.encode(rows).ids()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="kind"):
        FieldSpec("bad", "dense")


# ---------------------------------------------------------------- the feature-store fast path
def test_store_rows_fast_path_gives_the_rule(synth_schema, synth_users):
    """Rows of str (as the service reads feature-store hashes): the ids of the rule, and the same ids
    when a row of the batch takes the value-by-value path instead."""
    schema = synth_schema
    rows = [{k: to_store_value(v) for k, v in u.items() if k != "user_id" and v is not None}
            for u in synth_users.to_pylist()]
    multi = schema.multi_fields[0].name
    rows[0][multi] = ""                                   # empty history
    rows[1][schema.cat_fields[0].name] = ""               # empty value
    rows[2][schema.cat_fields[0].name] = "never-seen"     # OOV
    del rows[3][schema.cat_fields[1].name]                # missing field
    rows[4][multi] = "|".join(["x", "", *schema.multi_fields[0].vocab[:3]] * 20)  # too long, blanks, OOV
    rows[5] = {}
    rows[6]["_loaded_at"] = "1700000000"                  # the loader's bookkeeping field is ignored
    for batch in (rows[:1], rows[:7], rows):
        enc = schema.encode(batch)
        assert not enc.errors and enc.cat_ids.dtype == enc.multi_ids.dtype == np.int64
        assert enc.cat_ids.shape == (len(batch), len(schema.cat_fields))
        assert enc.multi_ids.shape == (len(batch), len(schema.multi_fields), schema.multi_len)
        for i, row in enumerate(batch[:60]):
            c, m = reference_ids(schema, row)
            assert enc.cat_ids[i].tolist() == c and enc.multi_ids[i].tolist() == m, i
    # one row as a list instead of a joined string sends only that row down the value-by-value path
    mixed = [dict(r) for r in rows[:7]]
    mixed[4][multi] = mixed[4][multi].split(MULTI_SEP)
    a, b = schema.encode(rows[:7]), schema.encode(mixed)
    np.testing.assert_array_equal(a.cat_ids, b.cat_ids)
    np.testing.assert_array_equal(a.multi_ids, b.multi_ids)


def bad_rows(users: pa.Table) -> tuple[pa.Table, dict[str | None, str]]:
    """A second input file with one bad row per kind (+ one good row) and the expected rejects."""
    base = users.slice(0, 5).to_pylist()
    rows = []
    for i, r in enumerate(base):
        r = dict(r)
        r["user_id"] = f"bad{i}"
        rows.append(r)
    rows[0]["user_id"] = None                      # missing user id
    rows[1]["user_id"] = ""                        # empty user id
    rows[2]["age_bucket"] = ["age1", "age2"]       # a list in a single-valued field
    rows[3]["clicked_tags"] = 7                    # a scalar where a list is expected
    rows[4]["user_id"] = "fine0"                   # good (age_bucket null -> OOV, clicked_tags null -> empty)
    for r in rows:
        if r is not rows[2]:
            r["age_bucket"] = None
        if r is not rows[3]:
            r["clicked_tags"] = None
    fields = []
    for f in users.schema:
        if f.name == "age_bucket":
            f = pa.field("age_bucket", pa.list_(pa.string()))
        elif f.name == "clicked_tags":
            f = pa.field("clicked_tags", pa.int64())
        fields.append(f)
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    expected = {None: "user_id", "": "user_id", "bad2": "age_bucket", "bad3": "clicked_tags"}
    return table, expected



# ---------------------------------------------------------------- the column path == the row path


def _assert_columns_equal_rows(schema: FeatureSchema, table: pa.Table) -> None:
    """encode(Arrow table) == encode(its rows), id for id, error for error (field and reason)."""
    got = schema.encode(table)
    want = schema.encode(table.to_pylist())
    assert {i: (e.field, e.reason) for i, e in got.errors.items()} == \
        {i: (e.field, e.reason) for i, e in want.errors.items()}
    ok = want.ok
    np.testing.assert_array_equal(got.ok, ok)
    np.testing.assert_array_equal(got.cat_ids[ok], want.cat_ids[ok])
    np.testing.assert_array_equal(got.multi_ids[ok], want.multi_ids[ok])
    for i in np.flatnonzero(ok)[:50]:          # and the row path == the written-out rule
        c, m = reference_ids(schema, table.slice(int(i), 1).to_pylist()[0])
        assert got.cat_ids[i].tolist() == c and got.multi_ids[i].tolist() == m, f"row {i}"


def test_column_path_matches_row_path(synth_schema, synth_users):
    """Vectorised encoding of Arrow columns == the row encoder, on every column form."""
    schema, users = synth_schema, synth_users
    _assert_columns_equal_rows(schema, users)              # the dataset as written (large_string, list<string>)
    bad, _ = bad_rows(users)
    _assert_columns_equal_rows(schema, bad)                # list in a cat field, int in a multi field

    rng = np.random.default_rng(0)
    n = 60
    cat_names = [f.name for f in schema.cat_fields]
    multi_names = [f.name for f in schema.multi_fields]
    vocab = {f.name: f.vocab for f in schema.fields}

    def known(name, i):
        v = vocab[name]
        return v[i % len(v)] if v else "x"

    cols = {"user_id": pa.array([f"u{i}" if i % 17 else None for i in range(n)])}
    # cat fields in every scalar form: strings with nulls/unknowns, dictionary, ints, floats (NaN), bools
    forms = ["str", "dict", "int", "float", "bool", "large"]
    for j, name in enumerate(cat_names):
        form = forms[j % len(forms)]
        vals = [None if i % 7 == 0 else (known(name, i) if i % 3 else "unknown-value") for i in range(n)]
        if form == "str":
            cols[name] = pa.array(vals, pa.string())
        elif form == "large":
            cols[name] = pa.array(vals, pa.large_string())
        elif form == "dict":
            cols[name] = pa.array(vals, pa.string()).dictionary_encode()
        elif form == "int":
            cols[name] = pa.array([None if i % 7 == 0 else i % 5 for i in range(n)], pa.int64())
        elif form == "float":
            cols[name] = pa.array([None if i % 7 == 0 else (float("nan") if i % 5 == 0 else i % 4 / 2)
                                   for i in range(n)], pa.float64())
        else:
            cols[name] = pa.array([None if i % 7 == 0 else bool(i % 2) for i in range(n)], pa.bool_())
    # multi fields: list<string> (null items, too long, empty), '|'-joined strings, list<int>, large_list
    mforms = ["list", "joined", "ints", "large_list", "list"]
    for j, name in enumerate(multi_names):
        form = mforms[j % len(mforms)]
        f = schema.fields[schema.names.index(name)]
        lists = []
        for i in range(n):
            if i % 11 == 0:
                lists.append(None)
                continue
            length = int(rng.integers(0, f.max_len + 4))
            items = [known(name, int(x)) if x % 4 else "nope" for x in rng.integers(0, 1000, length)]
            if form == "list" and length and i % 5 == 0:
                items[0] = None
            lists.append(items)
        if form == "joined":
            cols[name] = pa.array([None if v is None else "|".join(x for x in v) for v in lists], pa.string())
        elif form == "ints":
            cols[name] = pa.array([None if v is None else [int(x) for x in rng.integers(0, 9, len(v))]
                                   for v in lists], pa.list_(pa.int64()))
        elif form == "large_list":
            cols[name] = pa.array(lists, pa.large_list(pa.string()))
        else:
            cols[name] = pa.array(lists, pa.list_(pa.string()))
    table = pa.table(cols)
    _assert_columns_equal_rows(schema, table)
    _assert_columns_equal_rows(schema, table.slice(13, 30))      # offsets of sliced arrays

    # types without a vectorised path (value-by-value fallback) and bad nesting
    m0, c0 = multi_names[0], cat_names[0]
    odd = pa.table({
        "user_id": pa.array([f"o{i}" for i in range(6)]),
        m0: pa.array([[["a"]], [], None, [[]], [["x", "y"]], [[known(m0, 1)]]], pa.list_(pa.list_(pa.string()))),
        c0: pa.UnionArray.from_sparse(pa.array([0, 1, 0, 1, 0, 0], pa.int8()),
                                      [pa.array([known(c0, 1), None, "zz", None, None, known(c0, 2)]),
                                       pa.array([None, 3, None, None, 1, None], pa.int64())]),
    })
    _assert_columns_equal_rows(schema, odd)


def test_column_path_str_semantics_of_non_string_values():
    """Vocabularies holding '1', '0.5', 'nan', 'True', 'None': ids follow str(value) exactly as the row path."""
    schema = FeatureSchema([
        FieldSpec("c_int", "cat", vocab=["1", "2", "3"]), FieldSpec("c_float", "cat", vocab=["0.5", "1.0", "1", "nan"]),
        FieldSpec("c_bool", "cat", vocab=["True", "true"]), FieldSpec("c_str", "cat", vocab=["", "a", "b"]),
        FieldSpec("m_str", "multi", 3, ["", "None", "x", "y"]), FieldSpec("m_int", "multi", 2, ["1", "2"]),
        FieldSpec("m_float", "multi", 4, ["1.5", "2.0", "nan", "None"]), FieldSpec("m_joined", "multi", 3, ["", "p", "q"]),
    ])
    rng = np.random.default_rng(2)
    n = 80
    pick = lambda seq: [seq[i] for i in rng.integers(0, len(seq), n)]  # noqa: E731
    table = pa.table({
        "user_id": pa.array([f"u{i}" for i in range(n)]),
        "c_int": pa.array(pick([1, 2, 3, 4, None]), pa.int32()),
        "c_float": pa.array(pick([0.5, 1.0, float("nan"), 2.25, None]), pa.float32()),
        "c_bool": pa.array(pick([True, False, None]), pa.bool_()),
        "c_str": pa.array(pick(["", "a", "b", "c", None]), pa.string()),
        "m_str": pa.array([None if i % 9 == 0 else pick(["x", "y", "", None, "z"])[: i % 6] for i in range(n)],
                          pa.list_(pa.string())),
        "m_int": pa.array([pick([1, 2, 3, None])[: i % 4] for i in range(n)], pa.list_(pa.int64())),
        "m_float": pa.array([pick([1.5, 2.0, float("nan"), None])[: i % 6] for i in range(n)],
                            pa.list_(pa.float64())),
        "m_joined": pa.array(pick(["p|q", "", "p||q", "|", "q|p|p|q", None, "r"]), pa.string()),
    })
    _assert_columns_equal_rows(schema, table)
    # the same values as a fixed-size list and a dictionary-encoded column
    fixed = table.set_column(table.schema.get_field_index("m_int"), "m_int",
                             pa.array([[1, 2]] * n, pa.list_(pa.int64(), 2)))
    fixed = fixed.set_column(fixed.schema.get_field_index("c_str"), "c_str",
                             table.column("c_str").combine_chunks().dictionary_encode())
    _assert_columns_equal_rows(schema, fixed)
