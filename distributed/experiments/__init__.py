"""mnn.distributed.experiments: measurements of the trainer and what they predict.

The benchmarks (``mnn-bench``: the MLP and the GPT step against PyTorch DDP, the
collectives), the weak-scaling runs of ``mnn-scaling`` with their reports and
plots, the alpha-beta cost model that projects them to more ranks, and the GPT
quality run. One measurement kit serves them all:

- ``timing``: the one timed loop (warm up, agree on the count, time between
  barriers, medians with min–max);
- ``bench``: the one step builder (:func:`~mnn.distributed.experiments.bench.build_step`),
  for the MLP here and the GPT of ``gpt_bench``;
- ``collectives``: the one all-reduce timer (OSU's method);
- ``scaling_driver``: the one way to start a job on N ranks (through the
  launcher's plan) and to take rank counts in turns, used by ``mnn-scaling``
  and ``mnn-bench --scaling``; ``scaling_worker`` is what the ranks of
  ``mnn-scaling``'s jobs run; ``scaling`` what an experiment is and what the
  cost model makes of it; ``scaling_report`` and ``scaling_plots`` write it out.

Beside them, ``run_plots`` draws the training curves of finished (or running)
runs from their metrics.jsonl, for ``mnn-plot``.

They may import every other part of ``mnn.distributed``: the core, the training
service and the launcher (they start their jobs through its plan); nothing
imports them but the entry points in ``mnn.scripts``.
"""
