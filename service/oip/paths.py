"""Route labels of the Open Inference paths for the request metrics (a bounded set of labels)."""
from __future__ import annotations

LABELS = ("/v2", "/v2/health/live", "/v2/health/ready")


def oip_route(path: str) -> str:
    """`/v2/models/mvke/versions/abc/infer` -> `/v2/models/{model}/versions/{version}/infer`."""
    if path in LABELS:
        return path
    parts = path.split("/")            # ['', 'v2', 'models', name, ...]
    if len(parts) < 4 or parts[2] != "models":
        return "other"
    rest = parts[4:]
    label = "/v2/models/{model}"
    if rest[:1] == ["versions"] and len(rest) >= 2:
        label, rest = label + "/versions/{version}", rest[2:]
    if rest in ([], ["ready"], ["infer"]):
        return label + "".join("/" + p for p in rest)
    return "other"
