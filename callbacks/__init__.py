"""Keras callbacks for tfopt (installed as `tfopt.callbacks`)."""

from tfopt.callbacks.pruning_summaries import PruningSummaries
from tfopt.callbacks.update_pruning_step import UpdatePruningStep

__all__ = ["PruningSummaries", "UpdatePruningStep"]
