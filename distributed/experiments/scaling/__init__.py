"""mnn.distributed.experiments.scaling: the weak-scaling experiments of ``mnn-scaling``.

One experiment, in the order it runs:

- ``settings``: what an experiment measures (its settings, the measured points, their
  summaries), the cost model's prediction beside them, and loading a stored one;
- ``driver``: runs it, each rank count a child job started through the launcher's plan
  (``mnn-bench --scaling`` starts its runs with it too);
- ``worker``: what every rank of a child job runs
  (``python -m mnn.distributed.experiments.scaling.worker``);
- ``report``: what it writes (results.csv, results.jsonl, report.md);
- ``plots``: its plots, with matplotlib (the optional extra ``plot``).

Imports point down this list's dependencies only: ``settings`` imports none of the
others, ``report`` and ``plots`` read ``settings``, and only the driver starts workers.
"""
