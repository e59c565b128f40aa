"""The scoring step as an ONNX graph: all tags of every task, then TopK, inside ONNX Runtime.

Same maths as the numpy scoring (paper section 4.3, derivation in the scoring module's
docstring): per task, from the task's slice V [B, K, D] of `expert_values`,

    num    = vec(V) @ W                    [B, T]   (W [K*D, T]: gate (x) unit tag embedding)
    norm2  = vec(V V^T) @ Q                [B, T]   (Q [K*K, T]: gate outer products)
    logit  = scale * num / max(sqrt(max(norm2, 0)), EPS) + bias
    top k  = TopK(logit), probabilities = sigmoid of the k kept logits only

The tag-side matrices are graph INPUTS, not initialisers: the graph is a few kilobytes whatever
the catalogue, the service feeds the W and Q it already holds (ONNX Runtime reads numpy memory
in place on the CPU; on CUDA they are bound once as device OrtValues), and one graph serves
every catalogue size. The output is only the top k per row, so with the CUDA provider the
[B, T] products never leave the GPU.

`fuse_with_tower` appends this graph to the user tower, so one `session.run` covers
tower -> scores -> TopK (one call per batch on the hot path instead of one ONNX call plus a
dozen numpy calls).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

EPS = 1e-8
VALUES = "expert_values"
TOP_K = "top_k"


def input_names(task: str) -> tuple[str, str]:
    """Graph inputs of one task's tag side: (W [K*D, T], Q [K*K, T])."""
    return f"tag_w_{task}", f"tag_q_{task}"


def output_names(task: str) -> tuple[str, str]:
    """Graph outputs of one task: (tag indices [B, k] int64, probabilities [B, k] float32), best first."""
    return f"top_idx_{task}", f"top_prob_{task}"


def _const(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    arr = np.asarray(value, dtype=dtype)
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name))


def scoring_nodes(tasks: list[tuple[str, int, int, float, float]], out_dim: int) -> tuple[list, list, list]:
    """Nodes, extra inputs and outputs of the scoring part, for tasks (name, start, stop, scale, bias)
    reading `expert_values` [B, sum K, out_dim]."""
    nodes, inputs, outputs = [], [], []
    nodes.append(_const("sg_eps", EPS, np.float32))
    nodes.append(_const("sg_zero", 0.0, np.float32))
    nodes.append(_const("sg_axis1", [1]))
    for name, start, stop, scale, bias in tasks:
        k = stop - start
        w, q = input_names(name)
        idx, prob = output_names(name)
        p = f"sg_{name}_"
        inputs += [helper.make_tensor_value_info(w, TensorProto.FLOAT, [None, "num_tags"]),
                   helper.make_tensor_value_info(q, TensorProto.FLOAT, [None, "num_tags"])]
        outputs += [helper.make_tensor_value_info(idx, TensorProto.INT64, ["batch", "k"]),
                    helper.make_tensor_value_info(prob, TensorProto.FLOAT, ["batch", "k"])]
        nodes += [
            _const(p + "start", [start]), _const(p + "stop", [stop]),
            _const(p + "flat", [-1, k * out_dim]), _const(p + "gflat", [-1, k * k]),
            _const(p + "scale", scale, np.float32), _const(p + "bias", bias, np.float32),
            helper.make_node("Slice", [VALUES, p + "start", p + "stop", "sg_axis1"], [p + "v"]),        # [B, K, D]
            helper.make_node("Reshape", [p + "v", p + "flat"], [p + "vf"]),                             # [B, K*D]
            helper.make_node("MatMul", [p + "vf", w], [p + "num"]),                                     # [B, T]
            helper.make_node("Transpose", [p + "v"], [p + "vt"], perm=[0, 2, 1]),                       # [B, D, K]
            helper.make_node("MatMul", [p + "v", p + "vt"], [p + "gram"]),                              # [B, K, K]
            helper.make_node("Reshape", [p + "gram", p + "gflat"], [p + "gf"]),                         # [B, K*K]
            helper.make_node("MatMul", [p + "gf", q], [p + "n2"]),                                      # [B, T]
            helper.make_node("Max", [p + "n2", "sg_zero"], [p + "n2p"]),
            helper.make_node("Sqrt", [p + "n2p"], [p + "norm"]),
            helper.make_node("Max", [p + "norm", "sg_eps"], [p + "den"]),
            helper.make_node("Div", [p + "num", p + "den"], [p + "cos"]),
            helper.make_node("Mul", [p + "cos", p + "scale"], [p + "sc"]),
            helper.make_node("Add", [p + "sc", p + "bias"], [p + "logit"]),                             # [B, T]
            helper.make_node("TopK", [p + "logit", TOP_K], [p + "best", idx], axis=-1, largest=1, sorted=1),
            helper.make_node("Sigmoid", [p + "best"], [prob]),                                          # [B, k]
        ]
    return nodes, inputs, outputs


def fuse_with_tower(tower_bytes: bytes, tasks: list[tuple[str, int, int, float, float]], out_dim: int) -> bytes:
    """The user tower with the scoring appended: inputs cat_ids, multi_ids, top_k, each task's W and Q;
    outputs per task the top-k indices and probabilities (expert_values stays internal)."""
    tower = onnx.load_from_string(tower_bytes)
    nodes, inputs, outputs = scoring_nodes(tasks, out_dim)
    g = tower.graph
    g.node.extend(nodes)
    g.input.extend([helper.make_tensor_value_info(TOP_K, TensorProto.INT64, [1]), *inputs])
    del g.output[:]
    g.output.extend(outputs)
    g.name = "mvke_tower_and_scoring"
    onnx.checker.check_model(tower)
    return tower.SerializeToString()
