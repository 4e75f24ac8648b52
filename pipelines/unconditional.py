"""Diffusers checkpoints as `compose` models (a `schedule` and `eps(x, t)`), for `compose.sample` and `compose.ld3`.

`compose` itself never imports diffusers; code that wants to sample or learn a schedule on a diffusers folder outside
`ComposePipeline` (the LD3 command line, the schedule benchmarks) builds its model here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compose.predictions import scheduler_prediction_type, to_eps
from compose.schedule import NoiseSchedule


class DiffusersUnconditional:
    """A diffusers unconditional folder (unet/ + scheduler/) as a compose model (eps(x, t), schedule)."""

    def __init__(self, folder: str) -> None:
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(folder)
        self.unet = pipe.unet.eval().requires_grad_(False)
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.prediction_type = scheduler_prediction_type(pipe.scheduler)
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        self.sample_shape = (c, s, s)
        self.name = os.path.basename(os.path.normpath(folder))

    def eps(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        ts = self.schedule.timestep(t).to(torch.float32).expand(x.shape[0])
        pred = self.unet(x.to(torch.float32), ts).sample.to(x.dtype)
        return to_eps(pred, x, t, self.schedule, self.prediction_type)


__all__ = ["DiffusersUnconditional"]
