"""Pydantic models of the HTTP edge (request/response bodies and their examples)."""
from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field

FeatureValue = Union[str, int, float, list[Union[str, int, float]]]

EXAMPLE_REQUEST = {"top_k": 5, "tasks": ["interest", "intention"], "min_score": 0.1,
                   "exclude_tags": ["cat03/tag0042"],
                   "features": {"age_bucket": "age3", "clicked_tags": ["t0012", "t0400"]}}
EXAMPLE_RESPONSE = {
    "user_id": "u0000042", "model_version": "3a9f83c7f0b52b4d", "model": "mvke-mt", "feature_source": "store",
    "tasks": {"interest": [{"tag": "cat07/tag0123", "score": 0.91}, {"tag": "cat07/tag0456", "score": 0.88}],
              "intention": [{"tag": "cat12/tag0777", "score": 0.42}]}}


class TagRequest(BaseModel):
    """Options of one tagging request; every field is optional."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    top_k: int | None = Field(None, ge=1, description="tags per task (default 20, max MVKE_TOP_K_MAX=200)")
    tasks: list[str] | None = Field(None, min_length=1, description="subset of the model's tasks (default all)")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="drop tags scoring below this probability")
    exclude_tags: list[str] = Field(default_factory=list, max_length=2000, description="tags never returned")
    features: dict[str, FeatureValue] | None = Field(
        None, description="raw feature values: for a user not in the feature store, or overriding stored ones")
    exact: bool = Field(False, description="score every tag exactly, also where the service ranks a large "
                                           "catalogue's candidates only (MVKE_ANN)")


class TagScore(BaseModel):
    tag: str
    score: float = Field(description="the model's probability for (user, tag) on this task")


class TagResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_RESPONSE]})

    user_id: str
    model_version: str
    model: str
    feature_source: str = Field(description="store | request | store+request")
    tasks: dict[str, list[TagScore]] = Field(description="per task, tags ranked by score")


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None
