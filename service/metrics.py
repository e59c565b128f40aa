"""Prometheus metrics of the service (one registry per worker process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FEATURE_AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86_400, 2 * 86_400, 7 * 86_400)
JACCARD_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SHIFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mvke_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("mvke_request_seconds", "HTTP request latency", ["route", "status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("mvke_step_seconds", "time per pipeline step and batch", ["step"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mvke_model_batch_size", "requests per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.model_info = Gauge("mvke_model_info", "loaded model versions (value 1) and their role",
                                ["version", "model", "provider", "role"], registry=r)
        self.version_requests = Counter("mvke_version_requests_total", "users answered per model version",
                                        ["version"], registry=r)
        self.model_swaps = Counter("mvke_model_swaps_total", "model versions loaded", registry=r)
        self.shed = Counter("mvke_shed_total", "requests refused with 503", ["reason"], registry=r)
        self.idle_calls = Counter("mvke_idle_calls_total", "lone requests whose model call asked for the idle "
                                  "threads (MVKE_ORT_IDLE_THREADS; after service/batcher.py's IDLE_STREAK in a row "
                                  "found the worker idle)",
                                  registry=r)
        self.missing_fields = Counter("mvke_missing_fields_total", "users whose features lacked this model field "
                                      "(served with `missing_fields`, or refused: MVKE_MISSING_FIELDS)", ["field"],
                                      registry=r)
        self.load_failing = Gauge("mvke_model_load_failing", "1 while the version this role asks for fails to "
                                  "load (/readyz load_errors names why)", ["role"], registry=r)
        self.schema_mismatch = Gauge("mvke_schema_mismatch", "1 while this role's version does not match the feature "
                                     "store's schema (active: served anyway; canary: not served)", ["role"], registry=r)

        # the canary's shadow on the active version's traffic and errors per version (service/shadow.py)
        self.version_errors = Counter("mvke_version_errors_total", "users answered 5xx per model version",
                                      ["version"], registry=r)
        self.shadow_jaccard = Histogram("mvke_shadow_jaccard", "Jaccard of the active and canary top-20 lists "
                                        "of a shadowed request", ["version"], buckets=JACCARD_BUCKETS, registry=r)
        self.shadow_shift = Histogram("mvke_shadow_score_shift", "|mean canary score - mean active score| of "
                                      "a shadowed request's top 20", ["version"], buckets=SHIFT_BUCKETS, registry=r)
        self.shadow_seconds = Histogram("mvke_shadow_seconds", "the canary's encode + predict time of a shadowed "
                                        "request (off the request path)", ["version"], buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.shadow_dropped = Counter("mvke_shadow_dropped_total", "shadow samples dropped: the queue was full",
                                      registry=r)
        self.shadow_failed = Counter("mvke_shadow_failed_total", "shadow comparisons that failed", ["version"],
                                     registry=r)

        # seconds since a stored user's features were loaded or last updated by an event (issue 22)
        self.feature_age = Histogram("mvke_feature_age_seconds", "age of the stored features an answer used",
                                     buckets=FEATURE_AGE_BUCKETS, registry=r)

    def set_models(self, loaded: list) -> None:
        """`loaded`: (LoadedModel, role) pairs, role "active" or "canary"."""
        self.model_info.clear()
        for m, role in loaded:
            self.model_info.labels(m.version, m.manifest.model, m.provider, role).set(1)
