"""Where a stage's batches are processed: ``local`` (this process, the default) or ``ray`` (a Ray cluster,
``pip install -e ".[ray]"``). Both keep the contract at the top of ``engine.stages.base``."""

from __future__ import annotations


def executor_for(name: str = "local", **options):
    """The executor a command line names; Ray is imported only when asked for."""
    if name == "local":
        from engine.stages.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from engine.stages.executors.ray import RayExecutor

        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; choose local or ray")
