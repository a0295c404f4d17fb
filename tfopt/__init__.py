"""tfopt: model optimization for Keras 3.

Magnitude pruning and quantization-aware training during `model.fit`, and a
converter that emits verified, fully-int8 TFLite models for phones, Coral Edge
TPU and microcontrollers (`tfopt.tflite_export`). Callbacks live in
`tfopt.callbacks`.
"""

from tfopt import clustering, quantizers
from tfopt.channel_pruning import ChannelPruningReport, channel_report, prune_channels
from tfopt.clustering import ClusteringReport, ClusterWeights, cluster_weights, clustering_report, strip_clustering
from tfopt.distillation import distill, strip_distillation
from tfopt.low_rank import LowRankReport, low_rank_factorize, low_rank_report
from tfopt.pruning import PruneLowMagnitude, SparsityReport, prune_low_magnitude, sparsity_report, strip_pruning
from tfopt.qat import is_quantized_model, quantize_annotate_layer, quantize_annotate_model, quantize_apply, quantize_model
from tfopt.qat_composite import QuantizeComposite
from tfopt.qat_layers import QuantizeAnnotate, QuantizeConfig, QuantizeLayer, QuantizeWrapper
from tfopt.registry import LayerSpec, register_layer
from tfopt.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule

__version__ = "0.1.0"

__all__ = [
    "ChannelPruningReport",
    "ClusterWeights",
    "ClusteringReport",
    "ConstantSparsity",
    "LayerSpec",
    "LowRankReport",
    "PolynomialDecay",
    "PruneLowMagnitude",
    "PruningSchedule",
    "QuantizeAnnotate",
    "QuantizeConfig",
    "QuantizeLayer",
    "QuantizeWrapper",
    "QuantizeComposite",
    "SparsityReport",
    "channel_report",
    "cluster_weights",
    "clustering",
    "clustering_report",
    "distill",
    "is_quantized_model",
    "low_rank_factorize",
    "low_rank_report",
    "prune_channels",
    "prune_low_magnitude",
    "quantize_annotate_layer",
    "quantize_annotate_model",
    "quantize_apply",
    "quantize_model",
    "quantizers",
    "register_layer",
    "sparsity_report",
    "strip_clustering",
    "strip_distillation",
    "strip_pruning",
]


def __getattr__(name):
    # `import tfopt` then `tfopt.callbacks...` works without the core importing
    # its satellites up front (tflite_export pulls in TensorFlow).
    if name in ("callbacks", "tflite_export"):
        import importlib

        return importlib.import_module(f"tfopt.{name}")
    raise AttributeError(f"module 'tfopt' has no attribute {name!r}")
