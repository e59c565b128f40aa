"""`mvke data synth | ml100k`: registered into the `mvke` command line (entry point group `mvke.commands`)."""
from __future__ import annotations

import argparse

EXTRA = "train"


def _synth(a: argparse.Namespace) -> None:
    from mvke.data.synthetic import SynthConfig, generate
    out = generate(SynthConfig(users=a.users, tags=a.tags, seed=a.seed, world=a.world, facets=a.facets), a.out)
    print(f"wrote synthetic dataset to {out}")


def _ml100k(a: argparse.Namespace) -> None:
    from mvke.data.movielens import build
    out = build(a.out, negatives=a.negatives, seed=a.seed)
    print(f"wrote MovieLens-100K dataset to {out}")


def register(sub) -> None:
    data = sub.add_parser("data", help="build a dataset").add_subparsers(dest="source", required=True)
    s = data.add_parser("synth", help="synthetic ad logs (paper schema)")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=20_000)
    s.add_argument("--tags", type=int, default=1_780)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--world", choices=["facets", "flat"], default="facets",
                   help="facets: per-facet preferences (default); flat: one preference vector per user")
    s.add_argument("--facets", type=int, default=4, help="latent preference facets per user")
    s.set_defaults(func=_synth, extra=EXTRA)
    m = data.add_parser("ml100k", help="MovieLens-100K from the recbole wheel")
    m.add_argument("--out", required=True)
    m.add_argument("--negatives", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_ml100k, extra=EXTRA)
