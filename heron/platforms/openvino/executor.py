"""The openvino platform's executor: the in-process executor with OpenVINO's model runner."""
from __future__ import annotations

from typing import Any

from heron.worker.executor import UniProcExecutor


class OpenVinoExecutor(UniProcExecutor):
    def make_runner(self) -> Any:
        from heron.platforms.openvino.runner import OpenVinoModelRunner
        return OpenVinoModelRunner(self.config, self.platform.options, self.model_path)  # type: ignore[attr-defined]
