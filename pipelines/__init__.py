"""diffusers pipelines built on `compose`."""

from .compose_pipeline import ComposeModel, ComposePipeline, ComposePipelineOutput

__all__ = ["ComposeModel", "ComposePipeline", "ComposePipelineOutput"]
