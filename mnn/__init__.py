"""mnn: manual neural networks.

NumPy layers whose backward passes are derived by hand (the math is in each
docstring), a ``SequentialLayers`` container and optimizers. The data-parallel
trainer lives in ``mnn.distributed``; this package never imports MPI.
"""

from mnn.layer import CrossEntropyLossLayer, Layer, LinearLayer, LossLayer, ReluLayer
from mnn.optim import SGD, Adam, Optimizer
from mnn.seq_layers import SequentialLayers

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "ReluLayer", "CrossEntropyLossLayer",
    "SequentialLayers", "Optimizer", "SGD", "Adam",
]
