"""Layers with hand-derived backward passes; see each class's docstrings for the math."""

from mnn.layer._base import Layer, LossLayer
from mnn.layer.activation import GeluLayer, LogLayer, ReluLayer
from mnn.layer.attention import MatrixProduct, MultiHeadAttention
from mnn.layer.conv import Conv2DLayer
from mnn.layer.dropout import DropoutLayer
from mnn.layer.embedding import EmbeddingLayer, PositionalEmbeddingLayer
from mnn.layer.linear import LinearLayer
from mnn.layer.loss import CrossEntropyLossLayer, MSELossLayer, NllLossLayer
from mnn.layer.normalization import BatchNormLayer, LayerNormLayer
from mnn.layer.pooling import AvgPool2DLayer, MaxPool2DLayer
from mnn.layer.shape import ReshapeLayer
from mnn.layer.softmax import LogSoftmaxLayer, SoftmaxLayer

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "ReluLayer", "LogLayer", "SoftmaxLayer", "LogSoftmaxLayer",
    "CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer", "MatrixProduct", "MultiHeadAttention", "ReshapeLayer",
    "EmbeddingLayer", "PositionalEmbeddingLayer", "LayerNormLayer", "GeluLayer", "DropoutLayer",
    "Conv2DLayer", "MaxPool2DLayer", "AvgPool2DLayer",
    "BatchNormLayer",
]
