"""diffusers pipelines built on `compose`.

`ComposePipeline` and friends are imported on first use (PEP 562), so `pipelines.cli` and `pipelines.jobs` load
without torch or diffusers (`compose --help` answers at once); `from pipelines import ComposePipeline` is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compose_pipeline import ComposeModel, ComposePipeline, ComposePipelineOutput

__all__ = ["ComposeModel", "ComposePipeline", "ComposePipelineOutput"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import compose_pipeline

        return getattr(compose_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
