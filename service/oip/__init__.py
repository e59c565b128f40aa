"""The Open Inference Protocol (KServe v2) beside the native routes: REST under /v2 (rest.py) and
gRPC (`inference.GRPCInferenceService`, grpc_server.py) on its own port, both on the service's
one `ServiceState` (same versions, same batcher) through core.py; installed by install.py."""
