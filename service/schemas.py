"""Pydantic models of the HTTP edge (request/response bodies and their neutral examples).

The edge is strict: a number must be a JSON number (`"5"` and `true` are not a top_k), and
every rejection names the field. The served OpenAPI document is these models refined with
the loaded model's task names, tag catalogue and feature vocabulary (service/openapi.py).
"""
from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Annotated, Any, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator
from pydantic_core import PydanticCustomError

from mvke.runtime.feature_values import ITEMS_SCALAR, NOT_SCALAR
from mvke.runtime.versions import PublishedVersion

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
    """The JSON shape of a feature value (one clear error per bad value: a plain Union would report one per
    branch): a string or number, or a list of them. Whether it fits its field (one value or a list) is the
    rule of mvke/runtime/feature_values.py, checked against the answering model's schema (service/state.py)
    with the same message as a feature load or a tag-all; so is a list's nested item here."""
    tv = type(v)
    if tv is str or tv is int or tv is float:
        return v
    if tv is list:
        if len(v) > MAX_FEATURE_LIST:
            raise PydanticCustomError("too_long", "at most {n} values per feature", {"n": MAX_FEATURE_LIST})
        for x in v:
            if type(x) not in (str, int, float):
                if isinstance(x, NOT_SCALAR):
                    raise PydanticCustomError("feature_value", ITEMS_SCALAR)
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


BATCH_USER_SCHEMA = {"type": "object", "required": ["user_id"],
                     "properties": {"user_id": {"type": "string", "minLength": 1, "maxLength": 128}},
                     "description": "the user and its own options (those of TagOptions), validated per user: a "
                                    "bad option is this user's 422 in its answer, not the call's"}


class BatchRequest(BaseModel):
    """Body of POST /tags:batch: up to MVKE_MAX_BATCH_USERS users, each with its own options.
    `defaults` apply to every user; a user's own fields replace them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # each user is validated on its own (service/app.py `tag_batch`): one user's bad option is its own 422 in
    # the answer, so the documented item is any object with a user id (its options: TagOptions)
    users: list[Annotated[dict[str, Any], WithJsonSchema(BATCH_USER_SCHEMA)]] = Field(
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
    feature_age_s: float | None = Field(None, description="with MVKE_FEATURE_AGE_IN_ANSWERS or MVKE_MAX_FEATURE_AGE_S: "
                                        "seconds since the stored features were loaded or last updated by an event")
    stale: bool | None = Field(None, description="with MVKE_MAX_FEATURE_AGE_S: the stored features are older than it")


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


# A published version as GET /models answers it: mvke.runtime.versions.PublishedVersion's fields (the one
# reader's record; its canary share is under `canary`), and what this service adds: canary, loaded.
VersionState = create_model(
    "VersionState",
    **{f.name: (get_type_hints(PublishedVersion)[f.name], ...) for f in dataclass_fields(PublishedVersion)
       if f.name != "canary_percent"},
    canary=(bool, Field(description="the canary this service routes a share of users to")),
    loaded=(bool, Field(description="loaded by this service process (servable with model_version)")))


class CanaryState(BaseModel):
    version: str
    percent: float
    source: str = Field(description="redis (mvke publish --canary) or env (MVKE_CANARY)")


class VersionsResponse(BaseModel):
    active: str | None
    canary: CanaryState | None
    versions: list[VersionState] = Field(description="newest first")


# ---- audiences (service/audiences.py) ---------------------------------------------------------------
MAX_AUDIENCE_PAGE = 1000
MAX_AUDIENCE_SAMPLE = 100


class AudienceEstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expression: str = Field(min_length=1, max_length=4096,
                            description="tags as `<task>:<tag>` combined with AND, OR, NOT and parentheses "
                                        "(tags with spaces or parentheses in double quotes)",
                            examples=["interest:cat07/tag0123 AND NOT intention:cat02/tag0042"])
    sample: int = Field(10, ge=0, le=MAX_AUDIENCE_SAMPLE, description="user ids to return, spread over the audience")


class AudienceEstimateResponse(BaseModel):
    size: int = Field(description="exact number of users the expression selects")
    sample: list[str] = Field(description="up to `sample` of them, spread evenly over the audience")
    expression: str = Field(description="the expression as parsed (fully parenthesised)")
    version: str = Field(description="the audience index version that answered")
    users: int = Field(description="users in that index (the universe of NOT)")


class AudiencePage(BaseModel):
    tag: str
    task: str
    size: int = Field(description="users in the tag's audience for the task")
    users: list[str] = Field(description="one page of their ids (ascending user number)")
    cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last page")
    version: str = Field(description="the index version (a cursor pins it: every user once, across a switch)")


class AudienceTask(BaseModel):
    tags: list[str]
    sizes: list[int]


class AudienceInfo(BaseModel):
    version: str
    model_version: str
    users: int
    rule: dict
    built_at: str
    tasks: dict[str, AudienceTask]
