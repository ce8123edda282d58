"""The example platform's own executor, built from heron's public names only.

Most platforms need no executor of their own: heron picks one for the configuration
(one process, a process per rank, or Ray). A platform whose runtime must own the
processes brings its own by subclassing `heron.worker.executor.Executor` and returning
the class from `Platform.executor_class()`. This one keeps heron's in-process executor
and adds what a backend author might want to see first: how many steps ran and how
long they took.
"""
from __future__ import annotations

import time

from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.worker.executor import UniProcExecutor


class ExampleExecutor(UniProcExecutor):
    """heron's in-process executor, counting steps and their time."""

    steps_run = 0
    seconds_in_steps = 0.0

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        start = time.perf_counter()
        output = super().execute_model(sched)
        self.steps_run += 1
        self.seconds_in_steps += time.perf_counter() - start
        return output
