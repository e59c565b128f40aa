"""Your own data (docs/OWN_DATA.md): the committed example is the generator's output, and
`mvke data split --by-time` cuts a log into a dataset the trainer reads, with errors that
name the file and the column."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvke.cli import main as mvke_main
from mvke.data.dataset import DataError, load_dataset
from mvke.data.example import ExampleConfig, example_variant, generate_example, with_value
from mvke.data.log_split import TimeSplitConfig, split_by_time

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "own-data"


def test_committed_example_is_the_generators_output(tmp_path):
    generate_example(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads((EXAMPLE / "meta.json").read_text())
    for name in ("log.parquet", "users.parquet"):
        # Values, not bytes or pandas dtypes: those follow the pyarrow/pandas versions.
        assert pq.read_table(tmp_path / name).to_pylist() == pq.read_table(EXAMPLE / name).to_pylist(), \
            f"docs/examples/own-data/{name} is stale: mvke data example --out docs/examples/own-data"


def test_split_the_example_by_time(tmp_path, capsys):
    assert mvke_main(["data", "split", "--by-time", str(EXAMPLE / "log.parquet"), "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_days"] == ["2024-05-01", "2024-05-02"] and summary["test_days"] == ["2024-05-03"]
    ds = load_dataset(tmp_path)
    log = pd.read_parquet(EXAMPLE / "log.parquet")
    assert len(ds.train) + len(ds.test) == len(log) == sum(summary["rows"].values())
    assert ds.train["timestamp"].max() < ds.test["timestamp"].min()
    assert pd.api.types.is_integer_dtype(ds.train["timestamp"])  # Unix seconds, what the trainer orders by
    assert ds.meta["split"]["test_days"] == ["2024-05-03"]
    assert ds.meta["tags"] == json.loads((EXAMPLE / "meta.json").read_text())["tags"]


def test_train_window_and_timezone(tmp_path):
    src = tmp_path / "src"
    generate_example(src, ExampleConfig(users=40, days=4))
    report = split_by_time(src / "log.parquet", tmp_path / "a", TimeSplitConfig(test_days=1, train_days=2))
    assert report.train_days == ["2024-05-02", "2024-05-03"] and report.test_days == ["2024-05-04"]
    assert report.dropped_rows > 0
    # In UTC+14 the evening hours of each day fall on the next calendar day: a fifth day appears.
    shifted = split_by_time(src / "log.parquet", tmp_path / "b", TimeSplitConfig(timezone="Pacific/Kiritimati"))
    assert shifted.test_days == ["2024-05-05"]


def _write_variant(src: Path, dst: Path, change) -> Path:
    """A copy of the example whose log went through `change` (DataFrame -> DataFrame)."""
    dst.mkdir()
    shutil.copy(src / "meta.json", dst / "meta.json")
    shutil.copy(src / "users.parquet", dst / "users.parquet")
    log = change(pd.read_parquet(src / "log.parquet"))
    pq.write_table(pa.Table.from_pandas(log, preserve_index=False), dst / "log.parquet")
    return dst / "log.parquet"


@pytest.mark.parametrize("change, column, message", [
    (lambda d: d.drop(columns=["timestamp"]), "timestamp", "missing column"),
    (lambda d: d.assign(timestamp=True), "timestamp", "got booleans"),
    (lambda d: d.assign(timestamp="yesterday"), "timestamp", "cannot read 'yesterday' (row 0;"),
    # issue 28 §4: rows and values, units, types
    (lambda d: d.assign(timestamp=d.timestamp.astype(str).where(d.index != 7, "2024-13-45")), "timestamp",
     "cannot read '2024-13-45' (row 7; 1 rows)"),
    (lambda d: d.assign(timestamp=d.timestamp.astype("int64") // 1000), "timestamp", "look like milliseconds"),
    (lambda d: d.assign(timestamp=d.timestamp.astype("int64")), "timestamp", "look like microseconds"),
    (lambda d: d.assign(conversion=d.conversion.where(d.index != 5, 2)), "conversion", "got 2 in row 5 (1 rows"),
    (lambda d: d.assign(click=d.click.astype(float).where(d.index != 3)), "click", "missing label in row 3"),
    (lambda d: d.assign(click=d.click.astype(str)), "click", "got str '0' in row 0"),
    (lambda d: d.assign(user_id=d.user_id.where(d.index != 4)), "user_id", "missing user id in row 4"),
    (lambda d: d.assign(user_id=d.user_id.str[4:].astype(float)), "user_id", "got float"),
    (lambda d: d.assign(timestamp=pd.Timestamp("2024-05-01", tz="UTC")), "timestamp", "covers 1 day"),
    (lambda d: d.drop(columns=["click"]), "click", "missing column"),
    (lambda d: d.assign(conversion=2), "conversion", "expected 0/1 labels"),
    (lambda d: d.assign(tags="sports/tag01"), "tags", "expected lists"),
    (lambda d: d.assign(tags=[["sports/tag99"]] * len(d)), "tags", "not in meta.json's tags"),
    (lambda d: d.assign(user_id="stranger"), "user_id", "no feature row for user 'stranger'"),
    (lambda d: d.assign(gender="f"), "age_bucket", "other user fields are inline"),
])
def test_split_errors_name_file_and_column(tmp_path, change, column, message):
    log_path = _write_variant(EXAMPLE, tmp_path / "src", change)
    with pytest.raises(DataError) as e:
        split_by_time(log_path, tmp_path / "out")
    assert e.value.column == column and message in str(e.value)
    expected_file = "users.parquet" if message.startswith("no feature row") else "log.parquet"
    assert e.value.file.endswith(expected_file), str(e.value)
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_split_errors_from_the_cli(tmp_path, capsys):
    log_path = _write_variant(EXAMPLE, tmp_path / "src", lambda d: d.drop(columns=["timestamp"]))
    assert mvke_main(["data", "split", "--by-time", str(log_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "log.parquet, column 'timestamp': missing column" in err
    assert mvke_main(["data", "split", "--by-time", str(log_path), "--out", str(tmp_path / "o"),
                      "--time-column", "when"]) == 2
    assert "column 'when'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the mode is required
        mvke_main(["data", "split", str(log_path), "--out", str(tmp_path / "o")])
    assert "--by-time" in capsys.readouterr().err


def test_unix_seconds_and_iso_strings_are_times(tmp_path):
    def seconds(d):
        return (d["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    epoch = _write_variant(EXAMPLE, tmp_path / "epoch", lambda d: d.assign(timestamp=seconds(d)))
    iso = _write_variant(EXAMPLE, tmp_path / "iso", lambda d: d.assign(
        when=d["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")).drop(columns="timestamp"))
    a = split_by_time(epoch, tmp_path / "a")
    b = split_by_time(iso, tmp_path / "b", TimeSplitConfig(time_column="when"))
    assert a.rows == b.rows and a.test_days == b.test_days == ["2024-05-03"]
    expected = seconds(pd.read_parquet(EXAMPLE / "log.parquet"))
    for out in (tmp_path / "a", tmp_path / "b"):
        got = pd.concat([pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "test.parquet")])
        assert sorted(got["timestamp"]) == sorted(expected)


def test_time_column_must_not_shadow_timestamp(tmp_path):
    log_path = _write_variant(EXAMPLE, tmp_path / "src", lambda d: d.assign(when=d["timestamp"]))
    with pytest.raises(DataError, match="rename this column"):
        split_by_time(log_path, tmp_path / "out", TimeSplitConfig(time_column="when"))


def _copy_example(dst: Path, users=None, meta=None, log=None) -> Path:
    return example_variant(EXAMPLE, dst, log=log, users=users, meta=meta)


_set = with_value


@pytest.mark.parametrize("where, column, message", [
    (dict(users=lambda u: _set(u, "clicked_tags", 9, ["sports/tag01", "a|b"])), "clicked_tags",
     "row 9: item 'a|b': list items must not contain '|'"),
    (dict(users=lambda u: _set(u, "user_id", 2, None)), "user_id", "missing user id in row 2"),
    (dict(users=lambda u: u.assign(user_id=u.user_id.str[4:].astype(int)),
          log=lambda d: d.assign(user_id=d.user_id)), "user_id", "integers here and strings in log.parquet"),
    (dict(meta=lambda m: {**m, "fields": {**m["fields"], "gender": "categorical"}}), "fields",
     "field 'gender': kind 'categorical' is not one of cat, multi"),
    (dict(meta=lambda m: {**m, "tags": m["tags"] + m["tags"][:1]}), "tags", "listed twice"),
    (dict(meta=lambda m: {**m, "max_lens": {"gender": 3}}), "max_lens", "'gender' is not a multi field"),
])
def test_split_checks_users_and_meta_up_front(tmp_path, where, column, message):
    """Issue 28 §4: users.parquet and meta.json problems that train or features load would hit later are
    found before anything is written, naming file, column, row and value."""
    log_path = _copy_example(tmp_path / "src", **where)
    with pytest.raises(DataError) as e:
        split_by_time(log_path, tmp_path / "out")
    assert e.value.column == column and message in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_empty_tag_lists_are_a_warning_with_the_count(tmp_path, capsys):
    log_path = _copy_example(tmp_path / "src", log=lambda d: _set(_set(d, "tags", 0, []), "tags", 1, []))
    assert mvke_main(["data", "split", "--by-time", str(log_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "WARNING" in out.err and "2 of 3582 impressions have an empty tag list" in out.err
    assert json.loads(out.out)["warnings"]
