"""The served OpenAPI document: the pydantic models, refined with what the loaded model accepts.

FastAPI's document says a task is any string and a tag any string; the service answers 422
for a task or tag the model does not have. So that the document tells the truth (and a
schema fuzzer's valid requests are valid), it is rebuilt whenever the loaded versions
change: task names and catalogue tags become enums (those every loaded version knows),
request features get one property per model feature, `top_k` and list sizes get the
configured limits, and the examples are built from the catalogue. With API keys on, the
protected operations declare the bearer / X-API-Key schemes.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi.openapi.utils import get_openapi

from service.schemas import FEATURE_VALUE_SCHEMA, SCALAR_SCHEMA, ErrorResponse

ERRORS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body could not be read (not UTF-8)"},
    401: {"model": ErrorResponse, "description": "API keys are on and none (or a wrong one) was sent"},
    404: {"model": ErrorResponse, "description": "user not in the feature store (field `user_id`) or "
                                                 "`model_version` not published (field `model_version`); audience "
                                                 "routes: unknown tag (`tag`), cursor of a retired index (`query.cursor`)"},
    409: {"model": ErrorResponse, "description": "`model_version` is published but not loaded here"},
    413: {"model": ErrorResponse, "description": "body larger than MVKE_MAX_BODY_BYTES"},
    414: {"model": ErrorResponse, "description": "request path longer than 65,535 bytes (answered by the HTTP "
                                                 "layer, service/http_protocol.py)"},
    415: {"model": ErrorResponse, "description": "a body that is not sent as application/json"},
    422: {"model": ErrorResponse, "description": "invalid body or option; `field` names it, `errors` lists all"},
    503: {"model": ErrorResponse, "description": "no model loaded, Redis unavailable or overloaded "
                                                 "(with Retry-After)"},
}
ENUM_LIMIT = 20_000   # a bigger catalogue is described, not enumerated
OPEN_OPERATIONS = {"/healthz", "/readyz"}
EXAMPLE_USER = "u0000042"   # the demo's user, when the feature store recorded none (mvke/runtime/store_schema.py)


class ServedOpenAPI:
    """`app.openapi`: the document for the versions loaded right now (cached per version set)."""

    def __init__(self, app, state):
        self.app, self.state = app, state
        self._base: dict | None = None
        self._cache: tuple[tuple, dict] | None = None

    def __call__(self) -> dict:
        registry = self.state.registry
        models = [m for m in (registry.current, registry.canary) if m is not None]
        key = tuple(m.version for m in models)
        if self._cache is None or self._cache[0] != key:
            if self._base is None:
                app = self.app
                self._base = get_openapi(title=app.title, version=app.version, description=app.description,
                                         routes=app.routes)
            self._cache = (key, refine(copy.deepcopy(self._base), models, self.state))
        return self._cache[1]


def _common(models, get) -> list:
    """Items every loaded model has, in the first model's order."""
    if not models:
        return []
    first = list(get(models[0]))
    rest = [set(get(m)) for m in models[1:]]
    return [x for x in first if all(x in r for r in rest)]


def refine(doc: dict, models: list, state) -> dict:
    s = state.settings
    schemas = doc["components"]["schemas"]
    tasks = _common(models, lambda m: m.manifest.task_names)
    tags = _common(models, lambda m: m.tags)
    if models and len(tags) <= ENUM_LIMIT:
        schemas["TagName"] = {"type": "string", "enum": tags, "description": "a tag of the served catalogue"}
        tag_item = {"$ref": "#/components/schemas/TagName"}
    else:
        tag_item = {"type": "string", "description": "a tag of the served catalogue (GET /model)"}
    # Only the single-user body: in a batch, an option the model refuses is that user's 422 inside
    # a 200 answer, so there the document keeps the plain types and limits pydantic enforces.
    for name in ("TagRequest",):
        props = schemas[name]["properties"]
        props["top_k"] = {**_nullable_int(props["top_k"]), "maximum": s.top_k_max}
        if models:
            props["tasks"] = {"anyOf": [{"type": "array", "items": {"type": "string", "enum": tasks},
                                         "minItems": 1}, {"type": "null"}],
                              "description": props["tasks"].get("description", "")}
        props["exclude_tags"] = {**props["exclude_tags"], "items": tag_item}
        props["tags"] = {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1,
                                    "maxItems": s.max_candidate_tags}, {"type": "null"}],
                         "description": props["tags"].get("description", "")}
        if models:
            props["features"] = {"anyOf": [_features_schema(models), {"type": "null"}],
                                 "description": props["features"].get("description", "")}
        # `tags` must be catalogue tags unless ignore_unknown is true (then unknown ones are listed)
        schemas[name]["if"] = {"properties": {"ignore_unknown": {"const": True}}, "required": ["ignore_unknown"]}
        schemas[name]["then"] = {}
        schemas[name]["else"] = {"properties": {"tags": {"anyOf": [{"type": "array", "items": tag_item},
                                                                   {"type": "null"}]}}}
    schemas["BatchRequest"]["properties"]["users"]["maxItems"] = s.max_batch_users
    if models:
        _examples(doc, models[0], tasks, tags, state.registry.example_user or EXAMPLE_USER)
    if state.api_keys.enabled:
        _security(doc, state.api_keys.metrics_need_key)
    return doc


def _nullable_int(prop: dict) -> dict:
    out = {k: v for k, v in prop.items() if k != "anyOf"}
    branch = next((b for b in prop.get("anyOf", []) if b.get("type") == "integer"), {"type": "integer"})
    out["anyOf"] = [{**branch}, {"type": "null"}]
    return out


def _features_schema(models) -> dict:
    names = _common(models, lambda m: m.schema.names)
    schema = models[0].schema
    props = {}
    for name in names:
        f = schema.fields[schema.names.index(name)]
        if f.kind == "cat":
            props[name] = {**SCALAR_SCHEMA, "description": f"one value (known: {_vocab_hint(f.vocab)})"}
        else:
            props[name] = {**FEATURE_VALUE_SCHEMA["anyOf"][1],
                           "description": f"a list of values (first {f.max_len} used; known: {_vocab_hint(f.vocab)})"}
    return {"type": "object", "properties": props, "additionalProperties": False}


def _vocab_hint(vocab: list[str]) -> str:
    shown = ", ".join(vocab[:5])
    return shown + (f", ... ({len(vocab)} values)" if len(vocab) > 5 else "")


def _examples(doc: dict, model, tasks: list[str], tags: list[str], user: str) -> None:
    """Examples the served model answers with 200: its own fields and values, and `user`, a user the last
    `mvke features load` wrote (the /ui page takes its placeholders from here too)."""
    schema = model.schema
    features = {}
    for f in schema.cat_fields[:1]:
        if f.vocab:
            features[f.name] = f.vocab[0]
    for f in schema.multi_fields[:1]:
        if f.vocab:
            features[f.name] = f.vocab[:2]
    example = {"top_k": 5, "tasks": tasks[:2], "min_score": 0.0}
    if len(tags) > 1:
        example["exclude_tags"] = [tags[-1]]
    if features:
        example["features"] = features
    candidates = {"tags": tags[:3], "explain": True}
    schemas = doc["components"]["schemas"]
    schemas["TagRequest"]["examples"] = [example, candidates, {}]
    schemas["BatchRequest"]["examples"] = [{"users": [{"user_id": user},
                                                      {"user_id": "new-user", "features": features}],
                                            "defaults": {"top_k": 3}}]
    answer = {"user_id": user, "model_version": model.version, "model": model.manifest.model,
              "feature_source": "store",
              "tasks": {t: [{"tag": tag, "score": round(0.9 - 0.05 * i, 2)} for i, tag in enumerate(tags[:2])]
                        for t in tasks}}
    schemas["TagResponse"]["examples"] = [answer]


def _security(doc: dict, metrics_need_key: bool) -> None:
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    for path, ops in doc["paths"].items():
        if path in OPEN_OPERATIONS or (path == "/metrics" and not metrics_need_key):
            continue
        for op in ops.values():
            op["security"] = [{"bearer": []}, {"apiKey": []}]
