"""diffusers' entry to this folder: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

model_index.json names ["compose_pipeline", "ComposePipeline"], so diffusers runs this file and takes ComposePipeline
from it. The class comes from the diffusion-compose package (its repository: pip install -e .); this file only
imports it. `from pipelines import ComposePipeline; ComposePipeline.from_pretrained(folder)` needs no
trust_remote_code (it does not run this file).
"""

try:
    from pipelines.compose_pipeline import ComposePipeline
except ImportError as err:
    raise ImportError(
        "this folder's pipeline is ComposePipeline from the diffusion-compose package, which this environment cannot "
        f"import ({err}); install it (pip install -e . in its repository) and load the folder again."
    ) from err

__all__ = ["ComposePipeline"]
