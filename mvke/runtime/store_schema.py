"""What the feature store holds, recorded beside the users, and whether a model can read it.

`mvke features load` writes a `StoreSchema` (the fields and kinds it wrote, their
fingerprint, and a sample of the stored values per field) under `Keys.features_schema`
when a load succeeds. `mvke publish` compares a bundle's manifest features with it and
refuses an incompatible bundle (`--force` overrides); the service compares again when it
loads a version (service/registry.py). One rule, here: `compare`.

A model and a store disagree when
- a field the model reads is not in the store (every user would get its OOV id / an
  empty list: one identical default answer for everyone, labelled as coming from the store);
- a field's kind differs (a list stored where the model reads one value, or the reverse);
- the stored values are not the model's values: less than MIN_KNOWN_SHARE of the sampled
  stored values of a field are in the model's vocabulary (a model trained on another
  dataset, or a store loaded from another one). Measured on occurrences, not distinct
  values, so rare values a vocabulary leaves out (min_count) barely count.
Fields the store has and the model does not read are fine (noted, not refused).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from mvke.runtime.encoded import MULTI_SEP
from mvke.runtime.keys import Keys

SAMPLE_VALUES = 1_000        # stored value occurrences kept per field (from the first rows loaded)
MIN_KNOWN_SHARE = 0.5        # below this share of known sampled values, the field's values are someone else's


@dataclass
class StoreSchema:
    """The feature store's schema as `mvke features load` last wrote it."""
    fields: dict[str, str]                                     # name -> cat | multi
    samples: dict[str, list[str]] = field(default_factory=dict)   # name -> stored values (items for multi)
    source: str = ""                                           # the users file(s) loaded
    users: int = 0
    written_at: float = 0.0
    example_user: str = ""                                     # a user the load wrote (/docs and /ui examples)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fields)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "fingerprint": self.fingerprint})

    @classmethod
    def from_json(cls, raw: str | bytes) -> "StoreSchema":
        d = json.loads(raw)
        d.pop("fingerprint", None)
        return cls(**d)


def fingerprint(fields: Mapping[str, str]) -> str:
    """16 hex of sha256 over the sorted (name, kind) pairs: equal iff the fields and kinds are."""
    return hashlib.sha256(json.dumps(sorted(fields.items())).encode()).hexdigest()[:16]


def model_fields(features: Mapping[str, Any]) -> dict[str, str]:
    """A manifest's `features` (FeatureSchema.to_dict()) -> name -> kind."""
    return {f["name"]: f["kind"] for f in features["fields"]}


def sample_values(value: Any, kind: str) -> list[str]:
    """One stored value -> the values a vocabulary would be asked for (multi: its items)."""
    if value is None or value == "":
        return []
    if kind == "multi":
        return [x for x in str(value).split(MULTI_SEP) if x]
    return [str(value)]


def compare(store: StoreSchema, features: Mapping[str, Any]) -> list[str]:
    """Why a model with these manifest `features` cannot read `store` (empty: it can). Each line names the field."""
    problems = []
    for f in features["fields"]:
        name, kind = f["name"], f["kind"]
        have = store.fields.get(name)
        if have is None:
            problems.append(f"field {name!r} ({kind}): the model reads it, the feature store has no such field")
            continue
        if have != kind:
            problems.append(f"field {name!r}: the model reads it as {kind}, the feature store holds it as {have}")
            continue
        sample = store.samples.get(name) or []
        if sample:
            vocab = set(f["vocab"])
            known = sum(v in vocab for v in sample)
            if known < MIN_KNOWN_SHARE * len(sample):
                problems.append(f"field {name!r}: only {known} of {len(sample)} sampled stored values are in the "
                                f"model's vocabulary (e.g. {sample[0]!r}): store and model come from different data")
    return problems


def mismatch_message(store: StoreSchema, features: Mapping[str, Any], problems: list[str]) -> str:
    """The one sentence publish, the service and the docs give for a mismatch (what differs, what to do)."""
    extra = sorted(set(store.fields) - set(model_fields(features)))
    return (f"the model's features do not match the feature store (store fingerprint {store.fingerprint}, "
            f"model {fingerprint(model_fields(features))}, loaded from {store.source or '?'}): "
            + "; ".join(problems)
            + (f" (store-only fields, unused: {', '.join(extra)})" if extra else "")
            + ". Load the store with this model's data (`mvke features load --data DIR`), or publish a model "
              "trained on the data in the store; `mvke publish --force` publishes anyway")


def write_store_schema(r, keys: Keys, schema: StoreSchema) -> None:
    schema.written_at = schema.written_at or time.time()
    r.set(keys.features_schema, schema.to_json())


def read_store_schema(r, keys: Keys) -> StoreSchema | None:
    """The recorded schema, or None when no `mvke features load` of this release completed here."""
    raw = r.get(keys.features_schema)
    return StoreSchema.from_json(raw) if raw else None


def check_model(store: StoreSchema | None, features: Mapping[str, Any]) -> str | None:
    """None when the model can read the store (or nothing is recorded), else the mismatch message."""
    if store is None:
        return None
    problems = compare(store, features)
    return mismatch_message(store, features, problems) if problems else None
