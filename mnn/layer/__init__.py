"""Layers with hand-derived backward passes; see each class's docstrings for the math."""

from mnn.layer._base import Layer, LossLayer
from mnn.layer.activation import LogLayer, ReluLayer
from mnn.layer.attention import MatrixProduct, MultiHeadAttention
from mnn.layer.linear import LinearLayer
from mnn.layer.loss import CrossEntropyLossLayer, MSELossLayer, NllLossLayer
from mnn.layer.shape import ReshapeLayer
from mnn.layer.softmax import LogSoftmaxLayer, SoftmaxLayer

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "ReluLayer", "LogLayer", "SoftmaxLayer", "LogSoftmaxLayer",
    "CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer", "MatrixProduct", "MultiHeadAttention", "ReshapeLayer",
]
