"""mnn: manual neural networks.

NumPy layers whose backward passes are derived by hand (the math is in each
docstring), a ``SequentialLayers`` container and optimizers. The data-parallel
trainer lives in ``mnn.distributed``; this package never imports MPI.
"""
from mnn.lazy import lazy_names

# The names are loaded on first use (PEP 562), not when ``mnn`` is imported: the
# console scripts live in this package (``mnn.scripts``) and hold Ctrl-C, SIGTERM
# and SIGHUP before NumPy and the layers load (mnn.scripts.entry), so that a
# signal in the first tenths of a second is handled like any other.
_SOURCES = {
    **dict.fromkeys(["Layer", "LossLayer", "LinearLayer", "ReluLayer", "LogLayer", "SoftmaxLayer",
                     "LogSoftmaxLayer", "CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer", "MatrixProduct",
                     "MultiHeadAttention", "ReshapeLayer", "EmbeddingLayer", "PositionalEmbeddingLayer",
                     "LayerNormLayer", "GeluLayer", "DropoutLayer", "BatchNormLayer", "Conv2DLayer",
                     "MaxPool2DLayer", "AvgPool2DLayer"], "mnn.layer"),
    **dict.fromkeys(["SequentialLayers", "Residual"], "mnn.seq_layers"),
    **dict.fromkeys(["Optimizer", "SGD", "Adam"], "mnn.optim"),
}

__all__ = list(_SOURCES)

__getattr__, __dir__ = lazy_names(__name__, _SOURCES, globals())
