"""Long-context evaluation: RULER-style tasks (``tasks``), scoring by generation or likelihood
and perplexity (``scoring``), runs that write JSON and resume (``run``), and plots."""

from l2a_jax.evals.run import EvalSettings, evaluate, evaluate_ruler, parse_lengths, summary_line
from l2a_jax.evals.tasks import RULER_TASKS, TASK_NAMES, Materials, task_spec

__all__ = [
    "RULER_TASKS",
    "TASK_NAMES",
    "EvalSettings",
    "Materials",
    "evaluate",
    "evaluate_ruler",
    "parse_lengths",
    "summary_line",
    "task_spec",
]
