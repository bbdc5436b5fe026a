"""mnn.distributed.training: the mnn-train service around the data-parallel core.

``train(config)`` (:mod:`.trainer`) runs one job: its settings (:mod:`.config`), the
data they name (:mod:`.job_data`), everything checked before the first step
(:mod:`.preflight`), the net, optimizer and evaluation of a task (:mod:`.task`), the
run's position (:mod:`.position`), what rank 0 prints and writes (:mod:`.reporting`, and
its TensorBoard event files: :mod:`.event_file`),
checkpoints (:mod:`.checkpoint`) and the output folder (:mod:`.output_dir`), Ctrl-C and
SIGTERM (:mod:`.stopping`), and what the ranks check of each other at start-up
(:mod:`.ranks`).

It imports the core (``mnn.distributed``) and the layer library, never the launcher
or the experiments. The entry point is ``mnn-train`` (``mnn.scripts.train``)::

    from mnn.distributed.training import TrainConfig, train
    summary = train(TrainConfig(layers=[64, 128, 10], optimizer="momentum", epochs=5))
"""
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.trainer import train

__all__ = ["TrainConfig", "train"]
