"""mnn.distributed.experiments: measurements of the trainer and what they predict.

The benchmarks (``mnn-bench``: the MLP and the GPT step against PyTorch DDP, the
collectives), the weak-scaling runs of ``mnn-scaling`` with their reports and
plots, the alpha-beta cost model that projects them to more ranks, and the GPT
quality run. They may import every other part of ``mnn.distributed``: the core,
the training service and the launcher (they start their jobs through its plan);
nothing imports them but the entry points in ``mnn.scripts``.
"""
