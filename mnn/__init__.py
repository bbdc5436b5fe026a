"""mnn: manual neural networks.

NumPy layers whose backward passes are derived by hand (the math is in each
docstring), a ``SequentialLayers`` container and optimizers. The data-parallel
trainer lives in ``mnn.distributed``; this package never imports MPI.
"""

from mnn.layer import (
    CrossEntropyLossLayer,
    DropoutLayer,
    EmbeddingLayer,
    GeluLayer,
    Layer,
    LayerNormLayer,
    LinearLayer,
    LogLayer,
    LogSoftmaxLayer,
    LossLayer,
    MatrixProduct,
    MSELossLayer,
    MultiHeadAttention,
    NllLossLayer,
    PositionalEmbeddingLayer,
    ReluLayer,
    ReshapeLayer,
    SoftmaxLayer,
)
from mnn.optim import SGD, Adam, Optimizer
from mnn.seq_layers import Residual, SequentialLayers

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "ReluLayer", "LogLayer", "SoftmaxLayer", "LogSoftmaxLayer",
    "CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer", "MatrixProduct", "MultiHeadAttention", "ReshapeLayer",
    "EmbeddingLayer", "PositionalEmbeddingLayer", "LayerNormLayer", "GeluLayer", "DropoutLayer",
    "SequentialLayers", "Residual", "Optimizer", "SGD", "Adam",
]
