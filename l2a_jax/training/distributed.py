"""Joining a run of several processes (hosts) with JAX's own distributed runtime."""

from __future__ import annotations

import os

import jax


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when asked explicitly (a coordinator address, with the
    process count and this process's id) or when launched as one task of several under SLURM
    or Open MPI, whose variables JAX reads itself. Returns whether it did; a single process
    needs nothing. Must run before anything touches a device."""
    tasks = max(int(os.environ.get(name, "1")) for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and tasks <= 1:
        return False
    # CPU processes exchange data over gloo; GPUs use NCCL whatever this says
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
