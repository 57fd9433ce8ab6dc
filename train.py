"""Train an L2A model: ``python train.py --config configs/NAME.py [--workdir DIR]
[--config.train.steps=100 ...]``. Rerunning the same command resumes from the workdir's latest
checkpoint. See ``l2a_jax/training/run_config.py`` for every field.

Several processes (hosts): start one per host with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``, or launch under SLURM / Open MPI (``srun python
train.py ...``), whose variables are read on their own."""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from l2a_jax.config import ConfigError
from l2a_jax.training.distributed import initialize_distributed
from l2a_jax.training.loop import NonFiniteLoss, run
from l2a_jax.weights import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "a config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run lives (default: config.workdir)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a run of several processes"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in the run")


def parse_flags(argv):
    """absl's parsing, with a bad flag or config override reported in one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e)
        if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
            message = message[1:-1]  # ml_collections quotes its own message
        message = " ".join(message.replace("\\n", " ").replace("\\'", "'").split())
        sys.exit(f"error: {message} (fields and defaults: l2a_jax/training/run_config.py)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every save at INFO
    logging.getLogger("l2a_jax").setLevel(logging.INFO)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        workdir = run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, FileNotFoundError, NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    print(f"done: {workdir}/model (HF-style), {workdir}/metrics.jsonl, {workdir}/training.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
