"""`mvke data split --by-time`: cut one impression log into a dataset directory.

Input (docs/OWN_DATA.md has the full contract): a Parquet log with one row per
impression (`user_id`, `tags`, `click`, `conversion` and a time column),
`meta.json` and `users.parquet`. Output: the dataset directory every trainer
reads (`train.parquet`, `test.parquet`, `users.parquet`, `meta.json`), the last
`test_days` calendar days going to test and the days before them to train, as
the paper's offline evaluation trains on earlier days and tests on a later one.
Both splits carry the event time as `timestamp` (Unix seconds, int64), the column
the trainer's validation split orders each user's events by.
Errors are `DataError`s naming the input file and column, like `load_dataset`'s; every check
runs before anything is written (mvke/data/own_checks.py: rows and values too), and warnings
(empty tag lists) are in the summary.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mvke.data.dataset import (
    DataError,
    _read_parquet,
    _require,
    check_samples,
    load_dataset,
    read_meta,
)
from mvke.data.own_checks import (check_list_items, check_same_id_type, check_time_strings, check_unix_unit,
                                  check_user_ids, empty_tag_lists)


@dataclass
class TimeSplitConfig:
    """How to cut the log; `timezone` decides where a calendar day starts."""

    time_column: str = "timestamp"
    test_days: int = 1
    train_days: int | None = None   # None: every day before the test days
    timezone: str = "UTC"


@dataclass
class SplitReport:
    out: Path
    train_days: list[str]
    test_days: list[str]
    rows: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    dropped_rows: int = 0           # rows older than the train window (`train_days`)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "train_days": self.train_days, "test_days": self.test_days,
                "rows": self.rows, "users": self.users, "dropped_rows": self.dropped_rows,
                "warnings": self.warnings}


TIMESTAMP = "timestamp"   # the output column: Unix seconds


def event_times(times: pd.Series, path: Path, column: str) -> pd.Series:
    """Each event's time as a UTC timestamp.

    Accepts Parquet timestamps (naive ones are taken as UTC), dates, ISO-8601
    strings and Unix seconds (integers or floats).
    """
    if pd.api.types.is_bool_dtype(times):
        raise DataError(path, column, "expected timestamps, dates or Unix seconds, got booleans")
    if pd.api.types.is_numeric_dtype(times):
        check_unix_unit(times, path, column)
    elif not (pd.api.types.is_datetime64_any_dtype(times)):
        check_time_strings(times, path, column)
    try:
        if pd.api.types.is_numeric_dtype(times):
            stamps = pd.to_datetime(times, unit="s", utc=True)
        else:
            stamps = pd.to_datetime(times, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError) as e:
        raise DataError(path, column, f"expected timestamps, dates or Unix seconds ({e})") from e
    if stamps.isna().any():
        row = int(stamps.isna().to_numpy().argmax())
        raise DataError(path, column, f"missing time in row {row}")
    return stamps


def calendar_days(stamps: pd.Series, timezone: str, path: Path, column: str) -> pd.Series:
    """The calendar day (YYYY-MM-DD in `timezone`) of each UTC timestamp."""
    try:
        local = stamps.dt.tz_convert(timezone)
    except Exception as e:  # unknown zone names raise several types across pandas versions
        raise DataError(path, column, f"unknown timezone {timezone!r} ({e})") from e
    return local.dt.strftime("%Y-%m-%d")


def _check_log(log: pd.DataFrame, path: Path, meta: dict[str, Any], cfg: TimeSplitConfig) -> str:
    """The checks `load_dataset` makes on a split, on the log before it is cut, and the time column.
    -> the type of its user ids."""
    check_samples(log, path, meta)
    id_kind = check_user_ids(log["user_id"], path)
    for name, kind in meta["fields"].items():
        if kind == "multi" and name in log.columns:
            check_list_items(log[name], path, name)
    if cfg.time_column not in log.columns:
        raise DataError(path, cfg.time_column, "missing column (the event time; --time-column names it)")
    if cfg.time_column != TIMESTAMP and TIMESTAMP in log.columns:
        raise DataError(path, TIMESTAMP, f"the split writes the event time ({cfg.time_column!r}) as {TIMESTAMP!r}: "
                                         "rename this column or pass --time-column timestamp")
    known = set(meta["tags"])
    unknown = log["tags"].map(lambda ts: [t for t in (ts if ts is not None else []) if t not in known])
    bad = unknown.map(len) > 0
    if bad.any():
        raise DataError(path, "tags", f"tag {unknown[bad].iloc[0][0]!r} is not in meta.json's tags "
                                      f"(row {int(bad.to_numpy().argmax())}; {int(bad.sum())} rows have unknown tags)")
    return id_kind


def _check_users(users: pd.DataFrame, path: Path, meta: dict[str, Any], log: pd.DataFrame,
                 log_path: Path, log_id_kind: str) -> None:
    _require(users, path, "user_id", "cat")
    check_same_id_type(log_id_kind, log_path, check_user_ids(users["user_id"], path), path)
    for name, kind in meta["fields"].items():
        _require(users, path, name, kind)
        if kind == "multi":
            check_list_items(users[name], path, name)
    if not all(n in log.columns for n in meta["fields"]):
        missing = ~log["user_id"].isin(set(users["user_id"]))
        if missing.any():
            raise DataError(path, "user_id", f"no feature row for user {log['user_id'][missing].iloc[0]!r} "
                                             f"(of {log_path.name}; {int(missing.sum())} rows)")


def pick_days(days: list[str], cfg: TimeSplitConfig, path: Path) -> tuple[list[str], list[str]]:
    """Sorted distinct days -> (train days, test days)."""
    if cfg.test_days < 1:
        raise ValueError(f"test_days must be >= 1, got {cfg.test_days}")
    if cfg.train_days is not None and cfg.train_days < 1:
        raise ValueError(f"train_days must be >= 1, got {cfg.train_days}")
    if len(days) <= cfg.test_days:
        raise DataError(path, cfg.time_column, f"the log covers {len(days)} day(s) ({', '.join(days)}); "
                                               f"a split by time needs more than --test-days={cfg.test_days}")
    test, train = days[-cfg.test_days:], days[: -cfg.test_days]
    if cfg.train_days is not None:
        train = train[-cfg.train_days:]
    return train, test


def _read_checked(log_path: str | Path, cfg: TimeSplitConfig, meta_path: str | Path | None,
                  users_path: str | Path | None) -> tuple[Path, Path, dict[str, Any], pd.DataFrame, list[str]]:
    """(log path, users path, meta, log): meta.json and users.parquet beside the log unless given, all checked."""
    log_path = Path(log_path)
    meta_path = Path(meta_path) if meta_path else log_path.parent / "meta.json"
    users_path = Path(users_path) if users_path else log_path.parent / "users.parquet"
    meta = read_meta(meta_path)
    log = _read_parquet(log_path)
    id_kind = _check_log(log, log_path, meta, cfg)
    _check_users(_read_parquet(users_path), users_path, meta, log, log_path, id_kind)
    warnings = [w for w in [empty_tag_lists(log["tags"], log_path)] if w]
    return log_path, users_path, meta, log, warnings


def split_by_time(log_path: str | Path, out: str | Path, cfg: TimeSplitConfig | None = None,
                  meta_path: str | Path | None = None, users_path: str | Path | None = None) -> SplitReport:
    """Log (+ meta.json, users.parquet beside it unless given) -> dataset directory `out`."""
    cfg = cfg or TimeSplitConfig()
    log_path, users_path, meta, log, warnings = _read_checked(log_path, cfg, meta_path, users_path)

    stamps = event_times(log[cfg.time_column], log_path, cfg.time_column)
    day = calendar_days(stamps, cfg.timezone, log_path, cfg.time_column)
    train_days, test_days = pick_days(sorted(day.unique()), cfg, log_path)
    log = log.assign(**{TIMESTAMP: (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)})
    parts = {"train": log[day.isin(train_days)], "test": log[day.isin(test_days)]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in parts.items():
        pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), out / f"{name}.parquet")
    if users_path.resolve() != (out / "users.parquet").resolve():
        shutil.copyfile(users_path, out / "users.parquet")
    split = {"by": "time", "source": log_path.name, "time_column": cfg.time_column, "timezone": cfg.timezone,
             "train_days": train_days, "test_days": test_days}
    (out / "meta.json").write_text(json.dumps({**meta, "split": split}, indent=1))
    load_dataset(out)  # the trainer's own checks, on what was written
    return SplitReport(out, train_days, test_days,
                       rows={k: len(v) for k, v in parts.items()},
                       users={k: int(v["user_id"].nunique()) for k, v in parts.items()},
                       dropped_rows=int(len(log) - sum(len(v) for v in parts.values())), warnings=warnings)


def split_daily(log_path: str | Path, out: str | Path, cfg: TimeSplitConfig | None = None,
                meta_path: str | Path | None = None, users_path: str | Path | None = None) -> SplitReport:
    """`--daily`: the log -> the days layout of mvke/data/days.py (`logs/day=YYYY-MM-DD/part-00000.parquet`,
    every calendar day of `cfg.timezone`), the input of `mvke cycle`. users.parquet is copied to the
    root: one feature row per user for every day, so features are point-in-time only if the log's
    rows carry them inline or you add `snapshots/day=YYYY-MM-DD/users.parquet` (the end of each day)."""
    from mvke.data.days import LOGS, PART
    cfg = cfg or TimeSplitConfig()
    log_path, users_path, meta, log, warnings = _read_checked(log_path, cfg, meta_path, users_path)
    stamps = event_times(log[cfg.time_column], log_path, cfg.time_column)
    day = calendar_days(stamps, cfg.timezone, log_path, cfg.time_column)
    log = log.assign(**{TIMESTAMP: (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)})
    out = Path(out)
    days = sorted(day.unique())
    for d in days:
        part = out / LOGS / f"day={d}" / PART
        part.parent.mkdir(parents=True, exist_ok=True)
        rows = log[day == d].sort_values(["user_id", TIMESTAMP], kind="stable").reset_index(drop=True)
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), part)
    if users_path.resolve() != (out / "users.parquet").resolve():
        shutil.copyfile(users_path, out / "users.parquet")
    split = {"by": "time", "daily": True, "source": log_path.name, "time_column": cfg.time_column,
             "timezone": cfg.timezone}
    (out / "meta.json").write_text(json.dumps({**meta, "days": days, "split": split}, indent=1))
    return SplitReport(out, days, [], rows={d: int((day == d).sum()) for d in days},
                       users={d: int(log["user_id"][day == d].nunique()) for d in days}, warnings=warnings)
