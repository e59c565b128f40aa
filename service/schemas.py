"""Pydantic models of the HTTP edge (request/response bodies and their neutral examples).

The edge is strict: a number must be a JSON number (`"5"` and `true` are not a top_k), and
every rejection names the field. The served OpenAPI document is these models refined with
the loaded model's task names, tag catalogue and feature vocabulary (service/openapi.py).
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

MAX_FEATURE_LIST = 1000   # longest list accepted for one multi-valued feature (the model keeps its max_len)

SCALAR_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}]}
FEATURE_VALUE_SCHEMA = {"anyOf": [SCALAR_SCHEMA, {"type": "array", "items": SCALAR_SCHEMA,
                                                  "maxItems": MAX_FEATURE_LIST}],
                        "description": "one value (string or number), or a list of them for a multi-valued "
                                       "feature; raw value vocabulary (e.g. `t0012`), not catalogue tag names"}


def json_type(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", dict: "an object", list: "a list", str: "a string",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _feature_value(v: Any) -> Any:
    """JSON types only (one clear error per bad value: a plain Union would report one per branch). Whether a
    value fits its field (one value, a list, scalar items) is the rule of mvke/runtime/feature_values.py,
    checked against the answering model's schema (service/state.py), so a list or an object is let through
    here to get the same message as in a feature load or a tag-all."""
    tv = type(v)
    if tv is str or tv is int or tv is float or tv is dict:
        return v
    if tv is list:
        if len(v) > MAX_FEATURE_LIST:
            raise PydanticCustomError("too_long", "at most {n} values per feature", {"n": MAX_FEATURE_LIST})
        for x in v:
            if type(x) not in (str, int, float, list, dict):
                raise PydanticCustomError("feature_value", "list items must be strings or numbers, got {got}",
                                          {"got": json_type(x)})
        return v
    raise PydanticCustomError("feature_value", "must be a string or a number (a list of them for a multi-valued "
                              "feature), got {got}; leave the feature out to use its out-of-vocabulary value",
                              {"got": json_type(v)})


FeatureValue = Annotated[Any, AfterValidator(_feature_value), WithJsonSchema(FEATURE_VALUE_SCHEMA)]


def _integral(v: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; strings and booleans stay refused (strict edge)."""
    return int(v) if type(v) is float and v.is_integer() else v





class TagOptions(BaseModel):
    """Options of one tagging request; every field is optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(None, ge=1, description="tags per task (default 20, max MVKE_TOP_K_MAX=200); "
                                                      "with `tags`, default all of them")
    tasks: list[str] | None = Field(None, min_length=1, description="subset of the model's tasks (default all)")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="drop tags scoring below this probability")
    exclude_tags: list[str] = Field(default_factory=list, max_length=2000, description="tags never returned")
    features: dict[str, FeatureValue] | None = Field(
        None, description="raw feature values: for a user not in the feature store, or overriding stored ones. "
                          "Values use the raw value vocabulary of the training data (e.g. clicked_tags "
                          "`t0012`), not the catalogue tag names of the answers (`cat28/tag0362`); values "
                          "the model never saw are counted in the answer's `unknown_values`")
    exact: bool = Field(False, description="score every tag exactly, also where the service ranks a large "
                                           "catalogue's candidates only (MVKE_ANN)")
    tags: list[str] | None = Field(None, min_length=1, description="candidate scoring: score exactly these tags "
                                   "(per task, ranked; top_k and min_score still apply; max MVKE_MAX_CANDIDATE_TAGS)")
    ignore_unknown: bool = Field(False, description="with `tags`: list tags the model does not know under "
                                                    "`unknown_tags` instead of answering 422")
    explain: bool = Field(False, description="per returned tag: the gate weights over the task's experts and each "
                                             "expert's share of the score")
    model_version: str | None = Field(None, min_length=1, max_length=64,
                                      description="serve from this published and loaded version (active or "
                                                  "canary); 404 if not published, 409 if not loaded")

    _whole_top_k = field_validator("top_k", mode="before")(staticmethod(_integral))


class TagRequest(TagOptions):
    """Body of POST /users/{user_id}/tags."""


class BatchUser(TagOptions):
    user_id: str = Field(min_length=1, max_length=128, description="the user, as in the single-user route's path")


class BatchRequest(BaseModel):
    """Body of POST /tags:batch: up to MVKE_MAX_BATCH_USERS users, each with its own options.
    `defaults` apply to every user; a user's own fields replace them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # each user is validated on its own (service/app.py `tag_batch`): one user's bad option is its own 422
    users: list[Annotated[dict[str, Any], WithJsonSchema(BatchUser.model_json_schema())]] = Field(
        min_length=1, description="answered in this order")
    defaults: TagOptions | None = Field(None, description="options for every user (a user's own fields win)")


class TagExplanation(BaseModel):
    experts: list[int] = Field(description="the task's experts (0-based ids, as in the manifest)")
    gates: list[float] = Field(description="the tag's gate weight on each expert (sum 1)")
    contributions: list[float] = Field(description="each expert's additive part of the cosine: "
                                                   "gate_k * (V_k . e_t) / (|e_t| |E_u(t)|); they sum to `cosine`")
    shares: list[float] = Field(description="contribution / cosine (sum 1; negative for an expert pulling the "
                                            "score down)")
    cosine: float
    scale: float
    bias: float = Field(description="score = sigmoid(scale * cosine + bias)")


class TagScore(BaseModel):
    tag: str
    score: float = Field(description="the model's probability for (user, tag) on this task")
    explain: TagExplanation | None = Field(None, description="only with `explain: true`")


class TagResponse(BaseModel):
    user_id: str
    model_version: str = Field(description="the version that answered (active, canary or the pinned one)")
    model: str
    feature_source: str = Field(description="store | request | store+request")
    tasks: dict[str, list[TagScore]] = Field(description="per task, tags ranked by score")
    unknown_values: dict[str, int] | None = Field(
        None, description="only when request features held values the model never saw: count per feature "
                          "(they are encoded as that feature's out-of-vocabulary value)")
    unknown_tags: list[str] | None = Field(None, description="only with `ignore_unknown: true`: candidate tags "
                                                             "the model does not know")
    missing_fields: list[str] | None = Field(None, description="only when the user's stored and request features "
                                             "lacked some of the model's fields (scored with their "
                                             "out-of-vocabulary values; MVKE_MISSING_FIELDS=reject refuses instead)")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="`<field>: <what is wrong>`, one line")
    field: str | None = Field(None, description="the offending input (body field, `user_id`, `model_version`)")
    errors: list[ValidationIssue] | None = Field(None, description="422 only: every problem found")


class BatchError(BaseModel):
    user_id: str
    error: ErrorResponse = Field(description="what a single-user request would have answered, with its status")
    status: int


class BatchResponse(BaseModel):
    results: list[TagResponse | BatchError] = Field(description="one per user, in request order")


class VersionState(BaseModel):
    version: str
    model: str
    created_at: str
    published_at: float
    bytes: int
    active: bool
    canary: bool
    rolled_back: bool
    loaded: bool = Field(description="loaded by this service process (servable with model_version)")
    gate: dict | None = Field(None, description="`mvke cycle`'s gate summary (day, decision, reasons, compared_with, "
                                                "window, warm_start); null for a version published by hand")


class CanaryState(BaseModel):
    version: str
    percent: float
    source: str = Field(description="redis (mvke publish --canary) or env (MVKE_CANARY)")


class VersionsResponse(BaseModel):
    active: str | None
    canary: CanaryState | None
    versions: list[VersionState] = Field(description="newest first")
