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
from mvke.data.example import ExampleConfig, generate_example
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
    (lambda d: d.assign(timestamp="yesterday"), "timestamp", "expected timestamps"),
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
    expected_file = "users.parquet" if column == "user_id" else "log.parquet"
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
