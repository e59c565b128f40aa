"""Service configuration: one settings object, read from environment variables.

Every field maps to `MVKE_<NAME>` (e.g. `MVKE_REDIS_POOL_SIZE=64`), except the
Redis URL, which is also read from the conventional `REDIS_URL`.
"""
from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mvke.runtime.keys import DEFAULT_PREFIX, DEFAULT_URL
from mvke.runtime.system import container_cpus


# How long an idle session's extra threads spin after a call before they sleep, by default
# (MVKE_ORT_IDLE_SPIN_US; mvke/runtime/model.py build_model). ONNX Runtime's own default (about a
# million pause instructions, tens of ms) kept them burning the other cores after idle calls that came between batches at c=32 (half the QPS
# lost). 1 ms covers the gap between two requests of one client (~0.4 ms at c=1 on 2 cores), so the
# next call finds its thread awake (c=1 p50 -11% against 200 us, which let it fall asleep), and ends
# soon after the client stops; the idle calls run only while the other workers have nothing in flight
# (service/busy_board.py), so the spin takes a core nobody else is using
# (docs/results/predictor_ab/README.md, tenth and eleventh sessions).
IDLE_SPIN_US = 1000


def idle_bypass_runs(idle_bypass: bool, max_wait_ms: float) -> bool:
    """The batcher's idle bypass runs only with no wait to fill a batch (MVKE_MAX_WAIT_MS=0)."""
    return idle_bypass and max_wait_ms == 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MVKE_", extra="ignore")

    redis_url: str = Field(DEFAULT_URL, validation_alias=AliasChoices("REDIS_URL", "MVKE_REDIS_URL"),
                           description="Redis holding the published models and the feature store "
                                       "(redis://, rediss:// for TLS, redis+cluster:// for a Redis Cluster)")
    redis_cluster: bool = Field(False, description="treat a redis:// or rediss:// URL as a Redis Cluster "
                                                   "(a redis+cluster:// URL is one regardless)")
    key_prefix: str = Field(DEFAULT_PREFIX, description="prefix of every Redis key (MVKE_KEY_PREFIX, as the commands)")
    redis_pool_size: int = Field(64, ge=1, description="max Redis connections per worker")
    redis_pool_wait_s: float = Field(0.2, ge=0, description="wait for a free pooled connection before a 503")
    redis_timeout_s: float = Field(0.5, gt=0, description="socket timeout of Redis calls")
    model_read_timeout_s: float = Field(60.0, gt=0, description="socket timeout of reading a version's files "
                                        "(a worker thread, off the hot path; a 1M-tag bundle is about 0.5 GB)")
    model_poll_s: float = Field(0.5, gt=0, description="how often the active alias is checked for a new version")
    model_retry_s: float = Field(1.0, gt=0, description="first wait before a version that failed to load (a Redis "
                                 "timeout, a missing file, a bad checksum, an ONNX error) is tried again; doubles "
                                 "per failure up to model_retry_max_s while it stays the active or canary version")
    model_retry_max_s: float = Field(60.0, gt=0, description="longest wait between load attempts of a failing version")
    ort_intra_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: 1, or the CPU quota / workers for batch-heavy use)")
    ort_idle_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads of the model call of a "
                                  "request that finds its worker idle (MVKE_IDLE_BYPASS) after IDLE_STREAK such "
                                  "requests in a row (service/batcher.py); 0: 2 where the CPU "
                                  "quota has 2 cores or more (the other worker is idle too at that load), "
                                  "1: off; the answers are the same")
    ort_idle_spin_us: int = Field(IDLE_SPIN_US, ge=0, description="how long the idle session's extra threads spin "
                                  "after a call before they sleep (microseconds): long enough for one client's next "
                                  "request to find them awake; lower it on a box shared with other work")
    ort_provider: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto: CUDA when it really runs, else CPU")
    ann: str = Field("auto", pattern="^(auto|on|off)$", description="rank a large catalogue's candidates from its "
                     "candidate index (exact rerank): auto from ann_min_tags tags up, on whenever the version has "
                     "an index, off never; a request with \"exact\": true is always scored exactly")
    ann_min_tags: int = Field(50_000, ge=1, description="catalogue size from which MVKE_ANN=auto uses the index")
    scoring: str = Field("auto", pattern="^(auto|onnx|numpy)$", description="auto/onnx: tower + scoring + TopK "
                         "in one ONNX call when the version ships that graph (faster than numpy on the CPU, "
                         "and on the GPU with the CUDA provider); numpy: tower in ONNX, scoring in numpy")
    batching: bool = Field(True, description="coalesce concurrent requests into one model call")
    max_batch_size: int = Field(16, ge=1, description="most requests per model call (16 measured best on 2 cores: "
                                                       "the batch runs on the event loop, and smaller batches "
                                                       "interleave with reading requests; per-user cost is flat "
                                                       "from about 16 up)")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait to fill a batch (0: take what is queued)")
    idle_bypass: bool = Field(True, description="with max_wait_ms 0: a request that finds the model idle and "
                                                "nobody queued runs its batch of one itself (no hand-over to the "
                                                "batch worker and back); measured in docs/results/performance.md")
    max_queue: int = Field(512, ge=1, description="queued requests beyond this are shed with 503")
    blas_threads: int = Field(1, ge=1, description="threads of the BLAS behind numpy's scoring GEMMs (OpenBLAS "
                                                   "spins one per core by default, which only contends here)")
    compute_offload_min_batch: int = Field(0, ge=0, description="batches of at least this many requests run "
                                           "in a worker thread so the event loop keeps reading requests; 0: "
                                           "never (fastest here: the thread's Python parts fight the loop for "
                                           "the GIL, which cost 2-4x in throughput on 2 cores)")
    fast_path: bool = Field(True, description="serve well-formed POST /users/{id}/tags requests without "
                                              "FastAPI's per-request validation (same responses; anything "
                                              "unusual still goes through FastAPI)")
    request_timeout_s: float = Field(2.0, gt=0, description="a request waiting longer gets 503")
    missing_fields: str = Field("serve", pattern="^(serve|reject)$", description="a user whose stored and/or "
                                "request features lack some of the model's fields: serve (the default; the answer "
                                "lists them in `missing_fields`, their out-of-vocabulary values are used) or "
                                "reject (422 naming them)")
    top_k_default: int = Field(20, ge=1)
    top_k_max: int = Field(200, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="larger bodies get 413 (1 MiB: room for "
                                                                  "10,000 candidate tags or a batch of 256 users)")
    max_candidate_tags: int = Field(10_000, ge=1, description="most tags in one request's `tags` (candidate scoring)")
    max_batch_users: int = Field(256, ge=1, description="most users in one POST /tags:batch")
    feature_age_in_answers: bool = Field(False, description="answers of stored users carry `feature_age_s`: seconds "
                                         "since their features were loaded or last updated by an event (always "
                                         "observed in /metrics as mvke_feature_age_seconds)")
    max_feature_age_s: float | None = Field(None, gt=0, description="features older than this are answered with "
                                            "\"stale\": true (and `feature_age_s`); unset: off")
    event_partitions: int = Field(8, ge=1, description="partition streams of POST /events (by a hash of the user "
                                  "id); `mvke features stream --partitions` must agree")
    event_stream_maxlen: int = Field(1_000_000, ge=1000, description="approximate length bound of each partition "
                                     "stream (XADD MAXLEN ~): older entries are trimmed, read or not")
    max_events_batch: int = Field(1000, ge=1, le=10_000, description="most events in one POST /events")
    canary: str | None = Field(None, description="`<version>:<percent>`: serve that share of users (by a hash of "
                                                 "the user id) from a second published version; overrides the "
                                                 "canary set with `mvke publish --canary`")
    shadow_share: float = Field(0.02, ge=0, le=1, description="share of the users the active version answers that "
                                "the canary also scores off the request path while one is loaded (its top-20 overlap, "
                                "score shift and latency: /metrics and {prefix}:v<id>:live for `mvke promote --auto`); "
                                "0: no shadow")
    shadow_queue: int = Field(64, ge=1, description="shadow samples waiting at most; more are dropped "
                                                    "(mvke_shadow_dropped_total), never waited for")
    live_flush_s: float = Field(1.0, gt=0, description="how often a worker adds its answers / errors / shadow "
                                                        "counters per version to Redis ({prefix}:v<id>:live)")
    api_keys: str | None = Field(None, description="comma-separated API keys; when set (or api_keys_file), the "
                                                   "tag and model routes answer 401 without one")
    api_keys_file: str | None = Field(None, description="file of API keys' sha256 hex digests, one per line "
                                                        "(`mvke api-key` makes one); # starts a comment")
    metrics_need_key: bool = Field(False, description="with API keys on, /metrics asks for one too")
    grpc_port: int | None = Field(None, ge=1, le=65535, description="serve the Open Inference Protocol over gRPC "
                                  "on this port too (`mvke serve --grpc-port`); every worker binds it with "
                                  "SO_REUSEPORT. Unset: no gRPC")
    grpc_host: str = Field("127.0.0.1", description="address of the gRPC port (`mvke serve` sets it to its --host)")
    grpc_switch_interval_ms: float = Field(0.5, gt=0, description="CPython's GIL switch interval while the gRPC "
                                           "thread runs (service/oip/grpc_server.py); Python's 5 ms let the app's "
                                           "loop keep the GIL that long while gRPC calls wait: 0.5 ms measured "
                                           "+40% gRPC QPS at c=32 (docs/results/oip_bench.md)")
    audience_poll_s: float = Field(0.5, ge=0, description="how long the audience index version ({prefix:audiences}:"
                                   "latest) is reused before it is read again (0: every query reads it)")
    audience_cache_mb: int = Field(256, ge=0, description="deserialised audience bitmaps kept per worker, most "
                                   "recently used first (a version's bitmaps never change, so a hit is always right)")
    profile_poll_s: float = Field(0.5, ge=0, description="how long the daily profiles' version ({prefix:usertags}:"
                                  "latest, written by `mvke tag-all --to-redis`) is reused before it is read again "
                                  "(0: every GET /users/{id}/profile reads it)")
    log_level: str = Field("INFO")
    access_log: bool = Field(False, description="one JSON log line per request")
    otel: bool = Field(False, description="FastAPI's own OpenTelemetry spans and metrics per request, when an "
                       "OpenTelemetry SDK is configured in the process; off: not even its per-request check runs "
                       "(the service's figures are its Prometheus /metrics)")
    workers: int = Field(0, ge=0, description="uvicorn worker processes (mvke serve); 0 (default): one per CPU "
                                              "this process may use (cgroup quota or affinity), what a serving host "
                                              "wants (2 workers: +30% QPS over 1 on a dedicated 2-core host). On a "
                                              "machine shared with other work, set 1")

    def worker_count(self) -> int:
        """Worker processes `mvke serve` starts: `workers`, or one per usable CPU when it is 0."""
        return self.workers or max(1, int(container_cpus()))

    def serving_summary(self) -> dict:
        """The settings that shape throughput (GET /model; the benchmark reports them beside its figures)."""
        return {"workers": self.worker_count(), "batching": self.batching, "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms,
                "idle_bypass": self.idle_bypass, "ort_threads": self.ort_threads(),
                "ort_idle_threads": self.ort_idle_thread_count(), "ort_idle_spin_us": self.ort_idle_spin_us,
                "redis_pool_size": self.redis_pool_size, "compute_offload_min_batch": self.compute_offload_min_batch,
                "fast_path": self.fast_path}

    def ort_threads(self) -> int:
        if self.ort_intra_threads:
            return self.ort_intra_threads
        return 1  # batch 1-64 runs fastest on one thread; more threads only help large batches

    def ort_idle_thread_count(self) -> int:
        """Threads of an idle request's model call (1: no idle session): only the batcher's idle bypass
        makes such calls. 2 by default: measured on 2 cores (c=1 p50 -12 to -26%); more is untested."""
        if not (self.batching and idle_bypass_runs(self.idle_bypass, self.max_wait_ms)):
            return 1
        return self.ort_idle_threads or min(2, int(container_cpus()))
