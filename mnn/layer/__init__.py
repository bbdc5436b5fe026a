"""Layers with hand-derived backward passes; see each class's docstrings for the math."""

from mnn.layer._base import Layer, LossLayer
from mnn.layer.activation import ReluLayer
from mnn.layer.linear import LinearLayer
from mnn.layer.loss import CrossEntropyLossLayer

__all__ = ["Layer", "LossLayer", "LinearLayer", "ReluLayer", "CrossEntropyLossLayer"]
