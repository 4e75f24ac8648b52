"""diffusers pipelines built on `compose`."""

from .compose_pipeline import ComposePipeline, ComposePipelineOutput

__all__ = ["ComposePipeline", "ComposePipelineOutput"]
