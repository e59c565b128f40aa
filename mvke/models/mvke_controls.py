"""Controls for MVKE's virtual kernels (docs/MODELS.md): MVKE-mt with one part switched off or replaced.

* `mvke-uniform-gate`: every tag's gate weight is exactly 1/K_task, so the kernels act
  only inside the experts;
* `mvke-no-kernel-attention`: every expert's weight on every field is exactly 1/F, so the
  kernels act only in the gate (the experts differ by their towers alone);
* `mvke-plain-gate`: the published code's gate (vkg_layer in core/mvke_ops.py), softmax of
  the plain product E_T . VK, without mvke-mt's learned projection.

Each is tuned and seeded like every other model; the option it pins cannot be overridden.
"""
from __future__ import annotations

from dataclasses import replace

from mvke.models.layers import ModelConfig
from mvke.models.mvke import MVKE


class MVKEUniformGate(MVKE):
    def __init__(self, cfg: ModelConfig):
        super().__init__(replace(cfg, gate="uniform"))


class MVKENoKernelAttention(MVKE):
    def __init__(self, cfg: ModelConfig):
        super().__init__(replace(cfg, attention="uniform"))


class MVKEPlainGate(MVKE):
    def __init__(self, cfg: ModelConfig):
        super().__init__(replace(cfg, gate="plain"))
