"""diffusion-compose demo, laid out as a Hugging Face Space: compose diffusion models / prompts at sampling time.

    python examples/space/app.py [--port 7860] [--host 127.0.0.1]

Pick shipped models (or give any local folder / hub id), prompts (one per line) and an operator; the page shows the
images and, for every term, kappa (the operator's weight) and the tracked log-density over the steps, so one can see
which model "won" where. Limits (steps, images, terms, resolution; environment variables COMPOSE_MAX_STEPS,
COMPOSE_MAX_IMAGES, COMPOSE_MAX_TERMS, COMPOSE_MAX_SIDE) keep one visitor from exhausting the machine; requests
queue (one runs at a time). Bad input shows as a message in the page, never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
for root in (HERE, HERE.parents[1]):  # a Space bundle (package next to app.py) or this repository
    if (root / "pipelines" / "jobs.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
        break

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from compose.grids import GRIDS  # noqa: E402
from pipelines import jobs as J  # noqa: E402
from pipelines.compose_pipeline import OPERATORS  # noqa: E402

if (HERE / "model_cards").is_dir():  # the Space bundle ships the models next to app.py
    J.SHIPPED_DIRS = (HERE / "model_cards", *J.SHIPPED_DIRS)


def space_limits() -> J.Limits:
    """The Space's limits (environment variables override the defaults)."""
    env = os.environ.get
    return J.Limits(
        max_steps=int(env("COMPOSE_MAX_STEPS", 100)),
        max_images=int(env("COMPOSE_MAX_IMAGES", 8)),
        max_terms=int(env("COMPOSE_MAX_TERMS", 4)),
        max_side=int(env("COMPOSE_MAX_SIDE", 512)),
        max_particles=int(env("COMPOSE_MAX_PARTICLES", 8)),
        max_langevin_steps=int(env("COMPOSE_MAX_LANGEVIN_STEPS", 2)),
    )


class App:
    """The demo's state (loaded pipelines, limits) and its generation function."""

    def __init__(self, limits: J.Limits | None = None, cache_size: int = 2) -> None:
        self.limits = limits or space_limits()
        self.pipes = J.PipelineCache(size=cache_size)

    def job(
        self,
        models: list[str] | None,
        other_models: str,
        prompts: str,
        operator: str,
        steps: float,
        schedule: str,
        guidance: float,
        seed: float,
        images: float,
        size: float,
        particles: float = 4,
        moves: float = 0,
    ) -> J.Job:
        """The form's fields -> a checked `Job` (ValueError naming the field on bad input)."""
        names = list(models or []) + [m.strip() for m in (other_models or "").splitlines() if m.strip()]
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        terms = J.count_terms(len(names), len(lines))
        raw = {
            "models": names,
            "prompts": lines,
            "operator": operator if terms > 1 else None,
            "steps": steps,
            "schedule": schedule,
            "guidance": guidance,
            "seed": seed,
            "images": images,
        }
        if size:
            raw["height"] = raw["width"] = size
        if operator == "product_smc" and terms > 1:
            raw["num_particles"] = particles
            if moves:  # Langevin rejuvenation moves per step (0: none; the field is left out of the job)
                raw["langevin_steps"] = moves
        return J.parse_job(raw, self.limits)

    def run(self, job: J.Job, progress=None) -> J.JobResult:
        """Load (cached) and run a checked job; ValueError for what the user can fix."""
        pipe = self.pipes.get(job.models)
        if not job.prompts and any(m.is_text for m in pipe.models):
            raise ValueError("prompts is empty; write one prompt per line (a model with a text encoder was chosen).")
        if job.prompts and not any(m.is_text for m in pipe.models):
            raise ValueError("prompts: the chosen models are unconditional (no text encoder); clear the prompts box.")
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        if job.height is None and native > self.limits.max_side:
            raise ValueError(
                f"size: the model's native resolution {native} is over this Space's limit {self.limits.max_side}; "
                f"set a size of at most {self.limits.max_side}."
            )
        return J.run_job(pipe, job, progress=progress)

    def generate(self, *fields, progress=gr.Progress()):  # noqa: B008 -- gradio's progress tracker idiom
        """The page's handler: form fields -> (gallery items, kappa / log q figure, summary markdown).

        Raises gr.Error (a message in the page) for every failure; unexpected ones are logged on the server.
        """
        try:
            job = self.job(*fields)

            def on_step(k: int, n: int) -> None:
                progress((k, n), desc="sampling", unit="steps")

            res = self.run(job, progress=on_step)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 -- never a stack trace in the page; the log keeps it
            traceback.print_exc()
            raise gr.Error(f"internal error ({type(err).__name__}); the server log has the details.") from None
        gallery = [(_enlarge(im), f"seed {job.seed + i}") for i, im in enumerate(res.images)]
        fig = plot_traces(res)
        plt.close(fig)
        return gallery, fig, summary_markdown(res, job)


def _enlarge(image, target: int = 192):
    """Small images (the shapes models are 24x24) are shown enlarged with nearest-neighbour pixels."""
    from PIL import Image

    scale = max(1, target // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def plot_traces(res: J.JobResult):
    """Two panels over the steps: kappa of every term and log q_i - mean_j log q_j (mean over images, min-max band)."""
    kappa, log_q = res.kappa.numpy(), res.log_q.numpy()
    steps = range(1, kappa.shape[0] + 1)
    fig, (ax_k, ax_q) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    rel = log_q - log_q.mean(-1, keepdims=True)
    for j, name in enumerate(res.terms):
        if kappa.shape[-1] == len(res.terms):
            ax_k.plot(steps, kappa[:, :, j].mean(1), label=name)
            ax_k.fill_between(steps, kappa[:, :, j].min(1), kappa[:, :, j].max(1), alpha=0.2)
        ax_q.plot(steps, rel[:, :, j].mean(1), label=name)
        ax_q.fill_between(steps, rel[:, :, j].min(1), rel[:, :, j].max(1), alpha=0.2)
    if kappa.shape[-1] != len(res.terms):
        ax_k.plot(steps, kappa.mean((1, 2)), label="kappa")
    ax_k.set(title="kappa (operator weight) per term", xlabel="step (noise -> data)")
    ax_q.set(title="tracked log q_i - mean over terms (nats)", xlabel="step (noise -> data)")
    for ax in (ax_k, ax_q):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_k.legend(fontsize=8)
    ax_q.legend(fontsize=8)
    return fig


def summary_markdown(res: J.JobResult, job: J.Job) -> str:
    """A table per term: mean / last kappa, final log q, images won; the run's timing."""
    s = res.summary()
    op = job.operator or "none (one term)"
    lines = [
        f"**{op}** over {len(res.terms)} term(s), {job.steps} steps ({job.schedule}), guidance "
        f"{job.guidance if job.guidance is not None else 'default'}, seeds {job.seed}..{job.seed + job.images - 1}: "
        f"{res.seconds:.1f} s ({res.seconds / job.images:.2f} s/image).",
        "",
        "| term | mean kappa | kappa at last step | final log q (mean) | images won |",
        "|---|---:|---:|---:|---:|",
    ]
    won = s.get("images_won", [job.images])
    per_term = len(s["kappa_mean"]) == len(res.terms)
    for j, name in enumerate(res.terms):
        km = f"{s['kappa_mean'][j]:.3f}" if per_term else "-"
        kl = f"{s['kappa_last'][j]:.3f}" if per_term else "-"
        lines.append(f"| {name} | {km} | {kl} | {s['log_q_final'][j]:.1f} | {won[j]} |")
    return "\n".join(lines)


def build_demo(app: App | None = None) -> gr.Blocks:
    """The page. Element ids (for tests and styling): models, other_models, prompt, operator, run, out, plot."""
    app = app or App()
    lim = app.limits
    shipped = J.shipped_models()
    with gr.Blocks(title="diffusion-compose") as demo:
        gr.Markdown(
            "# diffusion-compose\nCompose diffusion models or prompts at sampling time: **OR** (SuperDiff mixture), "
            "**AND** (equal densities), average, product (Composable Diffusion). The plots show each term's weight "
            "kappa and tracked log-density over the steps: which model won where."
        )
        with gr.Row():
            with gr.Column():
                models = gr.CheckboxGroup(
                    shipped,
                    value=["shapes-text"] if "shapes-text" in shipped else [],
                    label="shipped models",
                    elem_id="models",
                )
                other = gr.Textbox(
                    label="other checkpoints (local folder or hub id, one per line)", lines=2, elem_id="other_models"
                )
                prompts = gr.Textbox(
                    "a red shape\na circle",
                    label="prompts (one per line; empty for unconditional models)",
                    lines=3,
                    elem_id="prompt",
                )
                operator = gr.Dropdown(list(OPERATORS), value="and", label="operator", elem_id="operator")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(50, lim.max_steps), step=1, label="steps")
                    schedule = gr.Dropdown(
                        list(GRIDS),
                        value="log_snr",
                        label="schedule (a name, or a learned-schedule JSON path)",
                        allow_custom_value=True,
                    )
                with gr.Row():
                    guidance = gr.Slider(1, 15, value=4, step=0.5, label="guidance (1 = none)")
                    seed = gr.Number(0, precision=0, minimum=0, label="seed")
                with gr.Row():
                    images = gr.Slider(1, lim.max_images, value=min(4, lim.max_images), step=1, label="images")
                    size = gr.Number(0, precision=0, minimum=0, maximum=lim.max_side, label="size (0 = native)")
                particles = gr.Slider(
                    2,
                    lim.max_particles,
                    value=min(4, lim.max_particles),
                    step=1,
                    label="particles per image (operator product_smc)",
                )
                moves = gr.Slider(
                    0,
                    lim.max_langevin_steps,
                    value=0,
                    step=1,
                    label="Langevin moves per step (product_smc; each one more network call per particle)",
                )
                run = gr.Button("Generate", variant="primary", elem_id="run")
            with gr.Column():
                out = gr.Gallery(label="images", columns=4, elem_id="out", height="auto")
                summary = gr.Markdown(elem_id="summary")
        plot = gr.Plot(label="kappa and log q over the steps", elem_id="plot")
        run.click(
            app.generate,
            inputs=[models, other, prompts, operator, steps, schedule, guidance, seed, images, size, particles, moves],
            outputs=[out, plot, summary],
            api_name="generate",
        )
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build_demo().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
