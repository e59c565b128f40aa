"""The Open Inference Protocol's pieces without servers: tensors, parameters, and
the benchmark's requests decoded by the service's own parsers (so the bench measures what the
service really accepts)."""
from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from service.oip import core
from service.oip.rest import parse_request
from service.oip.tensors import decode_bytes, encode_fp32, encode_strings, flatten_json
from service.tagger import ServiceError


def test_bytes_round_trip_and_malformed_data():
    items = ["cat1/tag0001", "", "ünï/çødé"]
    raw = encode_strings(items)
    assert raw[:4] == struct.pack("<I", len(items[0]))
    assert [x.decode() for x in decode_bytes("t", raw, 3)] == items
    assert encode_strings(items) == raw                              # from the cache, same bytes
    for bad, count in ((raw, 2), (raw, 4), (raw[:-1], 3), (b"\x01\x00", 1)):
        with pytest.raises(ServiceError) as e:
            decode_bytes("t", bad, count)
        assert e.value.status == 400 and e.value.message.startswith("inputs.t:")
    assert np.frombuffer(encode_fp32(np.array([[0.5, 0.25]], dtype=np.float32)), "<f4").tolist() == [0.5, 0.25]
    assert flatten_json("t", [["a"], ["b"]], 2) == ["a", "b"]
    with pytest.raises(ServiceError):
        flatten_json("t", [["a"], "b"], 2)


def test_parameters_become_the_native_options():
    req = core.tag_request({"top_k": 5, "tasks": "interest, intention", "tags": '["a/b", "c,d"]',
                            "binary_data_output": True}, "v1")
    assert (req.top_k, req.tasks, req.tags, req.model_version) == (5, ["interest", "intention"], ["a/b", "c,d"], "v1")
    assert core.tag_request({"top_k": 5, "tasks": "interest, intention", "tags": '["a/b", "c,d"]',
                             "binary_data_output": True}, "v1") is req       # validated once
    assert core.tag_request({"exact": True}, None).exact is True
    for params, words in (({"exact": 1}, "exact:"), ({"top_k": 0}, "top_k: Input should be greater"),
                          ({"top_k": "5"}, "top_k:"), ({"nope": 1}, "parameters.nope: unknown parameter"),
                          ({"tasks": {"a": 1}}, "tasks:")):
        with pytest.raises(ServiceError) as e:
            core.tag_request(params, None)
        assert e.value.status == 422 and e.value.message.startswith(words), (params, e.value.message)


def test_the_bench_sends_what_the_service_reads():
    from loadtest.loadgen import render
    from loadtest.oip_bench import grpc_requests, rest_requests
    from service.oip import inference_pb2 as pb
    from service.oip.grpc_server import decode_inputs, parameter_value
    (row,) = rest_requests(["u0000042"], True, 20)
    wire = render("h", 1, row[0], row[1], row[2].encode(), row[3])
    head, body = wire.split(b"\r\n\r\n", 1)
    assert b"Content-Type: application/octet-stream" in head and b"application/json" not in head
    doc, inputs = parse_request(body, row[3]["Inference-Header-Content-Length"])
    assert inputs[0].elements == [b"u0000042"] and doc["parameters"] == {"top_k": 20, "binary_data_output": True}
    (row,) = rest_requests(["u0000042"], False, 20)
    assert parse_request(row[2].encode(), None)[1][0].elements == [b"u0000042"]
    import base64
    req = pb.ModelInferRequest.FromString(base64.b64decode(grpc_requests(["u0000042"], 20)[0]))
    assert decode_inputs(req)[0].elements == [b"u0000042"]
    assert {k: parameter_value(v) for k, v in req.parameters.items()} == {"top_k": 20}
    assert orjson.loads(render("h", 1, "POST", "/x", b"{}").split(b"\r\n\r\n")[1]) == {}
