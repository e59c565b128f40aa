#!/usr/bin/env bash
# Regenerate the committed gRPC stubs of the Open Inference Protocol (service/oip/inference.proto).
#
# The committed stubs were made with grpcio-tools==1.71.0 (protobuf gencode 5.29), so the service
# needs only grpcio>=1.71 and protobuf>=5.29 at run time (newer majors included):
#   python -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.71.0 && PYTHON=/tmp/gt/bin/python bash scripts/gen_oip_stubs.sh
# A newer grpcio-tools (the dev extra's) works too, but its stubs require its own grpcio and
# protobuf versions at run time: raise the floors in pyproject.toml's serve-base with them.
#
# Then one edit: the messages go into a descriptor pool of their own instead of protobuf's
# default pool, because tritonclient.grpc (and KServe's client) register the same `inference.*`
# names in the default pool, and a process that imports both (the tests: service and client in
# one process) would fail with "duplicate symbol". The wire format does not depend on the pool.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -I service/oip --python_out=service/oip --grpc_python_out=service/oip \
    service/oip/inference.proto
# the grpc stub imports its messages as a top-level module; make it the package's
sed -i 's/^import inference_pb2 as inference__pb2$/from service.oip import inference_pb2 as inference__pb2/' \
    service/oip/inference_pb2_grpc.py
sed -i 's/_descriptor_pool\.Default()/_descriptor_pool.DescriptorPool()/' service/oip/inference_pb2.py
