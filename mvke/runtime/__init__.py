"""The ground floor every stage stands on: torch-free, fastapi-free, ray-free, pandas-free.

contract.py   bundle files and the manifest (what `mvke export` writes and every reader checks)
keys.py       every Redis key (models, feature store, batch output)
features.py   the feature schema and its one encoder, `FeatureSchema.encode`
              (row_encoder.py, column_encoder.py: its two paths)
scoring.py    all-tag scoring in two GEMMs and `rank`, the one top-k ranker
model.py      a loaded version: ORT session + tag sides (`build_model`)
versions.py   reading a published version from Redis (sync; the service runs it in a thread)
redis_client.py  connecting: one node or a Redis Cluster, AUTH and TLS, from one URL grammar
parts.py      a users table cut into parts: the unit of work and resumption of tag-all and features load
system.py     usable CPUs, BLAS threads (threadpoolctl), load average

Nothing here imports a stage (mvke.data/models/training, model_export, service, batch,
loadtest); import-linter checks it (pyproject.toml, [tool.importlinter]).
"""
