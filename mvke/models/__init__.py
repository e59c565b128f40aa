"""Model registry: every model the experiments, tests and export iterate over."""
from __future__ import annotations

from mvke.models.cgc import CGC
from mvke.models.hard_sharing import HardSharing
from mvke.models.layers import ModelConfig, TwoTowerTagger
from mvke.models.mmoe import MMoE
from mvke.models.moe import MoE
from mvke.models.mvke import MVKE
from mvke.models.mvke_controls import MVKENoKernelAttention, MVKEPlainGate, MVKEUniformGate
from mvke.models.mvke_st import MVKESingleTask
from mvke.models.nomtl import NoMTL

MODELS: dict[str, type[TwoTowerTagger]] = {
    "mvke-mt": MVKE,
    "mvke-st": MVKESingleTask,
    "nomtl": NoMTL,
    "hard-sharing": HardSharing,
    "moe": MoE,
    "mmoe": MMoE,
    "cgc": CGC,
    # Controls of the virtual kernels (mvke/models/mvke_controls.py).
    "mvke-uniform-gate": MVKEUniformGate,
    "mvke-no-kernel-attention": MVKENoKernelAttention,
    "mvke-plain-gate": MVKEPlainGate,
}


def build_torch_model(cfg: ModelConfig) -> TwoTowerTagger:
    """A fresh (untrained) PyTorch model of `cfg.name`; the ONNX Runtime side loads a bundle with
    `mvke.runtime.model.build_model`."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose from {', '.join(MODELS)}")
    return MODELS[cfg.name](cfg)


__all__ = ["MODELS", "ModelConfig", "TwoTowerTagger", "build_torch_model"]
