"""Training checkpoints with Orbax: the ``TrainState`` and the data iterator's position,
saved together every N steps in the background, the last K kept. With several processes the
state is written collectively and each process's iterator position goes to a file of its own
(grain's checkpoint handler).

Orbax writes each checkpoint into a temporary directory and renames it into place only when
every file is written, so a process killed mid-save leaves no checkpoint that looks complete:
the next run resumes from the latest finished one.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from l2a_jax.weights import CheckpointError


class Checkpoints:
    """``latest()``, ``restore(step, abstract_state, batches)``, ``save(step, state,
    batches)``; ``batches`` is the grain iterator whose position travels with the state."""

    def __init__(self, directory: str | Path, *, every: int, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True
            ),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, batches, *, force: bool = False) -> bool:
        """Starts writing (returns at once) when ``step`` is due or ``force``; True if it did."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(batches)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state, batches):
        """The state of ``step``, placed like ``abstract_state``'s shardings; ``batches`` is
        moved to the position it had then."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(batches),
                ),
            )
        except Exception as e:  # Orbax raises many types for a damaged or foreign checkpoint
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored into this run "
                f"({type(e).__name__}: {str(e)[:300]}); it is damaged or was written by a "
                "different model, config or l2a-jax version. Move it aside to resume from the "
                "one before, or use a new workdir"
            ) from e
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(state):
    """Shapes, dtypes and shardings of ``state``: what ``restore`` fills."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
