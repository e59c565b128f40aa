"""`mvke data split` and `mvke data example`: bringing your own logs (docs/OWN_DATA.md)."""
from __future__ import annotations

import argparse
import json
import sys


def _split(a: argparse.Namespace) -> None:
    from mvke.data.log_split import TimeSplitConfig, split_by_time, split_daily
    cfg = TimeSplitConfig(time_column=a.time_column, test_days=a.test_days, train_days=a.train_days,
                          timezone=a.timezone)
    report = (split_daily if a.daily else split_by_time)(a.log, a.out, cfg, meta_path=a.meta, users_path=a.users)
    for warning in report.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(json.dumps(report.summary(), indent=1))


def _example(a: argparse.Namespace) -> None:
    from mvke.data.example import ExampleConfig, generate_example
    out = generate_example(a.out, ExampleConfig(users=a.users, days=a.days, seed=a.seed))
    print(f"wrote log.parquet, users.parquet and meta.json to {out}; next: "
          f"mvke data split --by-time {out}/log.parquet --out DATASET_DIR")


def register(data_sub) -> None:
    """Add `split` and `example` under `mvke data`."""
    s = data_sub.add_parser(
        "split", help="cut an impression log into train/test days (your own data)",
        description="Cut LOG (one row per impression: user_id, tags, click, conversion and a time column) into "
                    "the dataset directory the trainer reads: the last --test-days calendar days become "
                    "test.parquet, the days before them train.parquet; meta.json and users.parquet are "
                    "copied beside them. Contract and example: docs/OWN_DATA.md.")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--by-time", action="store_true",
                      help="split by calendar day of --time-column (the only mode: test on later days)")
    s.add_argument("log", metavar="LOG", help="Parquet file of impressions")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write (train/test/users.parquet, meta.json)")
    s.add_argument("--time-column", default="timestamp", metavar="COLUMN",
                   help="column with the event time: Parquet timestamp or date, ISO-8601 string, or Unix "
                        "seconds (default: timestamp); both splits get it as `timestamp`, in Unix seconds")
    s.add_argument("--test-days", type=int, default=1, metavar="N", help="last calendar days that form the test split (default 1)")
    s.add_argument("--train-days", type=int, metavar="N",
                   help="calendar days before the test days kept for training (default: all of them)")
    s.add_argument("--timezone", default="UTC", metavar="TZ", help="where a calendar day starts, e.g. Asia/Shanghai (default UTC)")
    s.add_argument("--daily", action="store_true",
                   help="write one partition per calendar day (logs/day=YYYY-MM-DD/) instead of train/test: the "
                        "days layout `mvke cycle` reads (docs/OPERATIONS.md); --test-days/--train-days do not apply")
    s.add_argument("--meta", metavar="FILE", help="meta.json (default: beside LOG)")
    s.add_argument("--users", metavar="FILE", help="users.parquet, one feature row per user (default: beside LOG)")
    s.set_defaults(func=_split, extra=None)   # pandas + pyarrow: core dependencies

    e = data_sub.add_parser("example", help="write a small own-data example (log, users, meta.json)",
                            description="Write the small example of docs/OWN_DATA.md: log.parquet (impressions over "
                                        "--days days), users.parquet and meta.json. The copy in "
                                        "docs/examples/own-data is this command's output at the defaults.")
    e.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    e.add_argument("--users", type=int, default=300, metavar="N", help="users (default 300)")
    e.add_argument("--days", type=int, default=3, metavar="N", help="days of impressions (default 3)")
    e.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    e.set_defaults(func=_example, extra=None)
