"""The Open Inference Protocol's model `mvke`, independent of REST or gRPC.

Both transports decode their inputs into `InferInput`s and call `infer`, which maps the
protocol onto the native request: `user_id` BYTES [B] is one native request per row, the
request parameters are `TagRequest` fields (top_k, tasks, exclude_tags, tags, min_score,
exact), other BYTES [B] inputs named after the model's features are raw feature values (an
empty element leaves that row's feature out; a multi-valued feature's values `|`-joined), and the model version of the URL (or of the
gRPC request) is the native `model_version` pin. Each row is validated by the native
`validate_request` and tagged through `ServiceState.tag_many`, the dynamic batcher of the HTTP
routes (a request's rows, and the gRPC calls handed over together, enter its queue in one step):
same routing (active, canary, pinned), same answers, same error messages.

Outputs per task: `<task>_tags` BYTES [B, K] and `<task>_scores` FP32 [B, K]; K is the
longest row (a row cut short by min_score, exclusions or few candidates is padded with
empty tag names and score 0, which no sigmoid reaches). `model_version` BYTES [B] (the
version that answered each row) when asked for.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import orjson
from pydantic import ValidationError

from mvke.runtime.encoded import MULTI_SEP
from mvke.runtime.model import LoadedModel
from mvke.runtime.redis_client import REDIS_ERRORS
from service.registry import RoutingError
from service.schemas import TagRequest
from service.state import ServiceState, validate_request
from service.tagger import ServiceError, TagJob, TagResult, unavailable

MODEL_NAME = "mvke"
SERVER_NAME = "mvke"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "parameters"]
USER_INPUT = "user_id"
VERSION_OUTPUT = "model_version"
TAGS, SCORES = "_tags", "_scores"
LIST_PARAMETERS = ("tasks", "exclude_tags", "tags")          # a list, or a string: comma-separated or a JSON list
SCALAR_PARAMETERS = ("top_k", "min_score", "exact")
# parameters of the protocol itself (Triton's clients send some of them): accepted, not used
PROTOCOL_PARAMETERS = frozenset(("binary_data_output", "priority", "timeout", "sequence_id", "sequence_start",
                                 "sequence_end", "headers"))
MAX_USER_ID = 128   # as the native route's path parameter


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes]        # BYTES elements, flattened row-major


@dataclass
class InferOutput:
    name: str
    datatype: str                # BYTES | FP32
    shape: list[int]
    data: list[str] | np.ndarray    # BYTES: the elements as text (tag names, versions); FP32: an array


@dataclass
class InferAnswer:
    model_version: str           # the version that answered (comma-joined if the rows' versions differ)
    outputs: list[InferOutput]


def check_model(name: str) -> None:
    if name != MODEL_NAME:
        raise ServiceError(404, f"model: unknown model {name!r}; this service serves {MODEL_NAME!r}", field="model")


def resolve(state: ServiceState, version: str | None) -> LoadedModel:
    """The loaded model a version names (none: the active one); the native route's errors otherwise."""
    if version:
        try:
            model = state.registry.route("", version)
        except RoutingError as e:
            raise ServiceError(e.status, e.message, field="model_version") from None
    else:
        model = state.registry.current
    if model is None:
        raise unavailable(state.registry.last_error or "no model loaded")
    return model


async def not_ready(state: ServiceState) -> str | None:
    """Why the server is not ready (None: ready): no model loaded, or Redis not answering (as GET /readyz)."""
    if state.registry.current is None:
        return state.registry.not_ready_reason()
    try:
        await asyncio.wait_for(state.redis.ping(), state.settings.redis_timeout_s)
    except (*REDIS_ERRORS, asyncio.TimeoutError, OSError) as e:
        return f"redis unavailable: {type(e).__name__}"
    return None


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def model_metadata(state: ServiceState, version: str | None) -> dict:
    """Inputs and outputs (name, datatype, shape; -1: any size) of a loaded version, and the loaded versions."""
    model = resolve(state, version)
    inputs = [{"name": USER_INPUT, "datatype": "BYTES", "shape": [-1]}]
    inputs += [{"name": f.name, "datatype": "BYTES", "shape": [-1]} for f in model.schema.fields]
    outputs = []
    for task in model.manifest.task_names:
        outputs += [{"name": task + TAGS, "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": task + SCORES, "datatype": "FP32", "shape": [-1, -1]}]
    outputs.append({"name": VERSION_OUTPUT, "datatype": "BYTES", "shape": [-1]})
    return {"name": MODEL_NAME, "versions": list(state.registry.loaded()), "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs}


def _as_list(name: str, value) -> list:
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise ServiceError(422, f"{name}: not a JSON list: {e}", field=name) from None
        else:
            return [x.strip() for x in value.split(",") if x.strip()]
    return value            # a list (REST), or anything else for TagRequest to refuse by name


_REQUESTS: dict[tuple, TagRequest] = {}     # parameter sets seen -> their validated TagRequest
_MAX_REQUESTS = 1024


def tag_request(parameters: dict, version: str | None) -> TagRequest:
    """Request parameters (+ the version pin) -> the native request's options, validated by its schema.

    Clients send the same few parameter sets again and again (top_k 20, a task): each set is
    validated once and its TagRequest shared (nothing mutates one; a row's features are a copy)."""
    try:
        # the type too: True == 1 for a dict, not for the strict schema
        key = (version, *sorted((k, type(v), tuple(v) if isinstance(v, list) else v) for k, v in parameters.items()))
        hash(key)
    except TypeError:                       # an unhashable value (a JSON object): no memo, the schema refuses it
        return _tag_request(parameters, version)
    req = _REQUESTS.get(key)
    if req is None:
        req = _tag_request(parameters, version)
        if len(_REQUESTS) >= _MAX_REQUESTS:
            _REQUESTS.clear()
        _REQUESTS[key] = req
    return req


def _tag_request(parameters: dict, version: str | None) -> TagRequest:
    fields = {}
    for name, value in parameters.items():
        if name in PROTOCOL_PARAMETERS or name.startswith("triton_"):
            continue
        if name in LIST_PARAMETERS:
            value = _as_list(name, value)
        elif name not in SCALAR_PARAMETERS:
            raise ServiceError(422, f"parameters.{name}: unknown parameter; this model takes "
                                    f"{', '.join(SCALAR_PARAMETERS + LIST_PARAMETERS)}", field=f"parameters.{name}")
        fields[name] = value
    if version:
        fields["model_version"] = version
    try:
        return TagRequest.model_validate(fields)
    except ValidationError as e:   # the native route's wording: "<field>: <pydantic's message>"
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        raise ServiceError(422, f"{where}: {first['msg']}", field=where) from None


def _tasks_of(outputs: list[str] | None, state: ServiceState) -> list[str] | None:
    """The tasks the requested outputs need (None: every task); an output no model has is refused."""
    if not outputs:
        return None
    model = state.registry.current
    known = None if model is None else set(model.manifest.task_names)
    tasks = []
    for name in outputs:
        if name == VERSION_OUTPUT:
            continue
        task = name[:-len(TAGS)] if name.endswith(TAGS) else name[:-len(SCORES)] if name.endswith(SCORES) else None
        if task is None or (known is not None and task not in known):
            have = "" if model is None else "; this model's outputs: " + ", ".join(
                o["name"] for o in model_metadata(state, None)["outputs"])
            raise ServiceError(400, f"outputs: unknown output {name!r}{have}", field="outputs")
        tasks.append(task)
    return list(dict.fromkeys(tasks)) or None


def _rows(inputs: list[InferInput], limit: int) -> tuple[list[str], list[dict | None]]:
    """-> (user ids, per row its features from the feature inputs or None)."""
    by_name: dict[str, InferInput] = {}
    for t in inputs:
        if t.datatype != "BYTES" or t.name in by_name:
            why = f"datatype must be BYTES, got {t.datatype}" if t.datatype != "BYTES" else "given twice"
            raise ServiceError(400, f"inputs.{t.name}: {why}", field=f"inputs.{t.name}")
        by_name[t.name] = t
    users = by_name.pop(USER_INPUT, None)
    if users is None:
        raise ServiceError(400, f"inputs.{USER_INPUT}: missing; send the users as a BYTES tensor [B]",
                           field=f"inputs.{USER_INPUT}")
    n = len(users.elements)
    if not 1 <= n <= limit:
        raise ServiceError(422, f"inputs.{USER_INPUT}: 1 to {limit} users per call, got {n}",
                           field=f"inputs.{USER_INPUT}")
    ids = [_text(USER_INPUT, raw, "a user id") for raw in users.elements]
    bad = next((uid for uid in ids if not 1 <= len(uid) <= MAX_USER_ID), None)
    if bad is not None:
        raise ServiceError(422, f"user_id: a user id has 1 to {MAX_USER_ID} characters, got {len(bad)}",
                           field="user_id")
    features: list[dict | None] = [None] * n
    for name, t in by_name.items():
        if len(t.elements) != n:
            raise ServiceError(400, f"inputs.{name}: {len(t.elements)} elements for {n} users", field=f"inputs.{name}")
        for i, raw in enumerate(t.elements):
            if raw:                           # an empty element leaves this row's feature out
                features[i] = {**(features[i] or {}), name: _text(name, raw, "a value")}
    return ids, features


def _text(name: str, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        field = "user_id" if name == USER_INPUT else f"inputs.{name}"
        raise ServiceError(400, f"inputs.{name}: {what} is not UTF-8", field=field) from None


def _split_multi(state: ServiceState, user_id: str, req: TagRequest, features: dict[str, str]) -> dict:
    """A multi-valued feature's BYTES element holds its values `|`-joined (as the feature store does);
    the native request takes them as a list. The kinds are those of the version the row routes to."""
    try:
        model = state.registry.route(user_id, req.model_version)
    except RoutingError:
        return features                      # validate_request answers the pin's error
    if model is None:
        return features
    fields, position = model.schema.fields, model.schema.position
    return {name: value.split(MULTI_SEP) if name in position and fields[position[name]].kind == "multi" else value
            for name, value in features.items()}


@dataclass
class Prepared:
    """A request checked and turned into the batcher's jobs (one per row)."""
    jobs: list[TagJob]
    outputs: list[str] | None


def prepare(state: ServiceState, inputs: list[InferInput], parameters: dict, outputs: list[str] | None,
            version: str | None) -> Prepared:
    """Every row through the native validation -> its job (a ServiceError naming the field otherwise)."""
    req = tag_request(parameters, version)
    tasks = _tasks_of(outputs, state)
    if tasks is not None and req.tasks is None:
        req = req.model_copy(update={"tasks": tasks})
    ids, features = _rows(inputs, state.settings.max_batch_users)
    jobs = [validate_request(state, uid, req if feats is None else
                             req.model_copy(update={"features": _split_multi(state, uid, req, feats)}))
            for uid, feats in zip(ids, features)]
    return Prepared(jobs, outputs)


def finish(prepared: Prepared, results: list[TagResult | ServiceError]) -> InferAnswer:
    """The rows' results -> the output tensors; the first failing row answers for the request."""
    for r in results:
        if isinstance(r, ServiceError):
            raise r
    return _answer(results, prepared.outputs)  # type: ignore[arg-type]


async def infer(state: ServiceState, inputs: list[InferInput], parameters: dict, outputs: list[str] | None,
                version: str | None) -> InferAnswer:
    """One inference request: its rows through the batcher (queued together) -> the output tensors."""
    prepared = prepare(state, inputs, parameters, outputs, version)
    return finish(prepared, await state.tag_many(prepared.jobs))


async def infer_many(state: ServiceState, calls: list[tuple]) -> list[InferAnswer | ServiceError]:
    """Requests that arrived together (`infer`'s arguments each) -> per request its answer or its error.

    All their rows enter the batcher in one step, so they share model calls (gRPC hands its calls
    over this way: grpc_server.py)."""
    prepared: list[Prepared | ServiceError] = []
    for call in calls:
        try:
            prepared.append(prepare(state, *call))
        except ServiceError as e:
            prepared.append(e)
    jobs = [job for p in prepared if isinstance(p, Prepared) for job in p.jobs]
    results = iter(await state.tag_many(jobs) if jobs else [])
    out: list[InferAnswer | ServiceError] = []
    for p in prepared:
        if isinstance(p, ServiceError):
            out.append(p)
            continue
        try:
            out.append(finish(p, [next(results) for _ in p.jobs]))
        except ServiceError as e:
            out.append(e)
    return out


def _answer(results: list[TagResult], outputs: list[str] | None) -> InferAnswer:
    n = len(results)
    versions = list(dict.fromkeys(r.model_version for r in results))
    tensors: dict[str, InferOutput] = {}
    for task in dict.fromkeys(t for r in results for t in r.tasks):
        rows = [r.tasks.get(task, ()) for r in results]
        k = max(len(row) for row in rows)
        tags: list[str] = []
        scores: list[float] = []
        for row in rows:
            tags += [tag for tag, _ in row]
            scores += [score for _, score in row]
            if len(row) < k:
                tags += [""] * (k - len(row))
                scores += [0.0] * (k - len(row))
        tensors[task + TAGS] = InferOutput(task + TAGS, "BYTES", [n, k], tags)
        tensors[task + SCORES] = InferOutput(task + SCORES, "FP32", [n, k],
                                             np.array(scores, dtype=np.float32).reshape(n, k))   # [B, K]
    if outputs:
        tensors[VERSION_OUTPUT] = InferOutput(VERSION_OUTPUT, "BYTES", [n], [r.model_version for r in results])
        missing = [name for name in outputs if name not in tensors]
        if missing:
            raise ServiceError(400, f"outputs: {missing[0]!r} belongs to a task that parameters.tasks leaves out",
                               field="outputs")
        chosen = [tensors[name] for name in outputs]
    else:
        chosen = list(tensors.values())
    return InferAnswer(",".join(versions), chosen)
