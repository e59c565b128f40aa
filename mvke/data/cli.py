"""`mvke data synth | ml100k`: registered into the `mvke` command line (entry point group `mvke.commands`)."""
from __future__ import annotations

import argparse

from mvke.runtime.options import at_least_one
from mvke.data.own_data_cli import register as register_own_data

EXTRA = "train"


def _synth(a: argparse.Namespace) -> None:
    from mvke.data.synthetic import SynthConfig, generate
    if a.days is not None:   # a world with days (mvke/data/days.py); the two-day world below is untouched
        from mvke.data.days import DaysConfig, generate_days
        out = generate_days(SynthConfig(users=a.users, tags=a.tags, seed=a.seed, world=a.world, facets=a.facets),
                            DaysConfig(days=a.days, start=a.start), a.out)
        print(f"wrote {a.days} days of synthetic logs to {out}")
        return
    out = generate(SynthConfig(users=a.users, tags=a.tags, seed=a.seed, world=a.world, facets=a.facets), a.out,
                   part_users=a.part_users, resume=a.resume, jobs=a.jobs)
    print(f"wrote synthetic dataset to {out}")


def _ml100k(a: argparse.Namespace) -> None:
    from mvke.data.movielens import build
    out = build(a.out, negatives=a.negatives, seed=a.seed)
    print(f"wrote MovieLens-100K dataset to {out}")


def register(sub) -> None:
    data = sub.add_parser("data", help="build a dataset (synthetic, MovieLens-100K, or your own log)",
                          description="Write a dataset directory (meta.json, train/test/users.parquet) that "
                                      "`mvke train` reads: docs/DATA.md, docs/OWN_DATA.md."
                          ).add_subparsers(dest="source", required=True, metavar="SOURCE")
    s = data.add_parser("synth", help="synthetic ad logs (paper schema)",
                        description="Synthetic ad logs with the paper's user fields (Table 2), a training and a test "
                                    "day, and the true click/conversion probabilities (oracle AUC): docs/DATA.md.")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    s.add_argument("--users", type=int, default=20_000, help="users (default 20000; about 16 training impressions each)")
    s.add_argument("--tags", type=int, default=1_780, help="tags in the catalogue (default 1780, as in the paper)")
    s.add_argument("--seed", type=int, default=0, help="seed; one seed fixes the whole dataset (default 0)")
    s.add_argument("--world", choices=["facets", "flat"], default="facets",
                   help="facets: per-facet preferences (default); flat: one preference vector per user (docs/DATA.md)")
    s.add_argument("--facets", type=int, default=4, help="latent preference facets per user (default 4)")
    s.add_argument("--part-users", type=int, default=None, metavar="N",
                   help="users per part file (a multiple of 4096), 0 for one Parquet file per table (default: one "
                        "file up to 65536 users, parts of 4096 users above: docs/SCALING.md); either way the "
                        "dataset is written block by block with bounded memory")
    s.add_argument("--resume", action="store_true",
                   help="keep the parts an interrupted run with the same options finished and write the rest")
    s.add_argument("--jobs", type=at_least_one, default=1, metavar="N",
                   help="processes drawing the users' blocks (default 1); the dataset is the same for any N, "
                        "each process holds one world (~0.5 GB at peak): docs/SCALING.md")
    s.add_argument("--days", type=at_least_one, metavar="D",
                   help="a world with days: logs/day=YYYY-MM-DD/ and a feature snapshot at the end of each day "
                        "(drift, new and retired tags, new and quiet users; histories from earlier events), the "
                        "input of `mvke cycle` (docs/DATA.md). Without it: the two-day world (train/test)")
    s.add_argument("--start", default="2026-01-01", metavar="YYYY-MM-DD", help="first day of --days (default 2026-01-01)")
    s.set_defaults(func=_synth, extra=EXTRA)
    m = data.add_parser("ml100k", help="MovieLens-100K from the recbole wheel",
                        description="MovieLens-100K (shipped inside the recbole wheel) as a two-task dataset: tags "
                                    "are genres, interest = rated, intention = rated >= 4, sampled negatives.")
    m.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    m.add_argument("--negatives", type=int, default=4, help="sampled negatives per rating (default 4)")
    m.add_argument("--seed", type=int, default=0, help="seed of the negative sampling (default 0)")
    m.set_defaults(func=_ml100k, extra=EXTRA)
    register_own_data(data)
