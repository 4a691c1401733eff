"""ONNX graph passes (onnx-ir), one per file. Their order is written once, in `onnx/build.py`."""

from .base import GraphPass, PostconditionError, PreconditionError
from .dedupe import DedupeConstants
from .detect import DetectShared
from .permute import LayerOrder, PermuteGather
from .share import ShareMerged, Target
from .simplify import SIMPLIFIERS, SharingSafeSimplify
from .transposes import FoldWeightTransposes

__all__ = [
    "SIMPLIFIERS",
    "DedupeConstants",
    "DetectShared",
    "FoldWeightTransposes",
    "GraphPass",
    "LayerOrder",
    "PermuteGather",
    "PostconditionError",
    "PreconditionError",
    "ShareMerged",
    "SharingSafeSimplify",
    "Target",
]
