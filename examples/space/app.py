"""diffusion-compose demo, laid out as a Hugging Face Space: compose diffusion models / prompts at sampling time.

    python examples/space/app.py [--port 7860] [--host 127.0.0.1]

Pick shipped models (and, where the Space's operator set COMPOSE_MODELS_DIR, folders of that one directory), prompts
(one per line) and an operator; the page shows the images and, for every term, kappa (the operator's weight) and the
tracked log-density over the steps, so one can see which model "won" where, and every image's lift per term (its
concept score, `pipelines.verify`) in the summary table; `candidates` K keeps the best of K samples per image by it.

Every input is hostile: limits on every field (prompt length in characters and in tokens, steps, size, images,
terms, particles, Langevin moves, candidates, which count as images; environment variables COMPOSE_MAX_*, see
`space_limits`) are checked on the server before any work, a request stops at its time limit (COMPOSE_MAX_SECONDS),
and the queue is bounded (COMPOSE_MAX_QUEUE waiting, one running). The schedule is a choice from the named grids
and the learned schedules the Space ships; no server path is ever read from the form, and a refused model or schedule
gets the same message whatever the reason (it does not tell whether a file exists). Bad input shows as a message,
never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
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

from compose import GRIDS  # noqa: E402
from compose.options import LORA_MODES, OPERATORS  # noqa: E402
from pipelines import jobs as J  # noqa: E402
from pipelines import shipped  # noqa: E402
from pipelines.verify import DEFAULT_LEVELS, MAX_DRAWS  # noqa: E402

if (HERE / "model_cards").is_dir():  # the Space bundle ships the models next to app.py
    shipped.SHIPPED_DIRS = (HERE / "model_cards", *shipped.SHIPPED_DIRS)


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
        max_candidates=int(env("COMPOSE_MAX_CANDIDATES", 4)),
        max_prompt_chars=int(env("COMPOSE_MAX_PROMPT_CHARS", 200)),
        max_prompt_tokens=int(env("COMPOSE_MAX_PROMPT_TOKENS", 75)),
        max_seconds=float(env("COMPOSE_MAX_SECONDS", 120)),
    )


MAX_NAME = 100  # a model folder name in COMPOSE_MODELS_DIR
LORA_COMPOSE = "compose (operator, one call)"  # the LoRA-mode choice that leaves the operator in charge
LIFTS = ("auto", "renoise", "tracked", J.NO_LIFT)  # the lift box: the pipeline's estimators, "none" for no lift
ESTIMATORS = {
    "tracked": "free, read along the sampling path; noisy on these pixel models, 'renoise' detects better",
    "renoise": f"the finished image noised again at {len(DEFAULT_LEVELS)} log-SNR levels, "
    "scored by each term and its reference",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ABS_PATH = re.compile(r"(?<![\w.~/-])/[\w.@+-]+(?:/[\w.@+-]*)*")  # an absolute POSIX path inside a message


class App:
    """The demo's state (loaded pipelines, limits, what it offers) and its generation function.

    models_dir: the one directory whose model folders visitors may name in the "other checkpoints" box (default: the
        COMPOSE_MODELS_DIR environment variable; None: the box takes nothing). Shipped models are ticked instead.
    queue_size: requests waiting at most (default COMPOSE_MAX_QUEUE, 16); one runs at a time.
    """

    def __init__(
        self,
        limits: J.Limits | None = None,
        cache_size: int = 2,
        models_dir: str | os.PathLike | None = None,
        queue_size: int | None = None,
    ) -> None:
        self.limits = limits or space_limits()
        self.pipes = J.PipelineCache(size=cache_size)
        models_dir = models_dir or os.environ.get("COMPOSE_MODELS_DIR") or None
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.queue_size = queue_size or int(os.environ.get("COMPOSE_MAX_QUEUE", 16))
        self.schedules = offered_schedules()

    # ------------------------------------------------------------------ what the Space offers
    def other_models(self) -> list[str]:
        """Folder names under `models_dir` holding a model (model_index.json), symlinks out of it left out."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        names = []
        for p in sorted(self.models_dir.iterdir()):
            try:
                inside = p.resolve().parent == self.models_dir
            except OSError:
                continue
            if inside and NAME.fullmatch(p.name) and len(p.name) <= MAX_NAME and (p / "model_index.json").is_file():
                names.append(p.name)
        return names

    def _other_model(self, name: str) -> str:
        """A name typed in the "other checkpoints" box -> its folder in `models_dir`. Whatever is wrong with it (a
        path, a hub id, a name that does not exist, a folder without a model, a link out of the directory) the
        message is the same, so the box tells nothing about the server's files."""
        offered = self.other_models()
        if NAME.fullmatch(name) and len(name) <= MAX_NAME and name in offered:
            return str(self.models_dir / name)
        raise ValueError(
            f"other checkpoints: {J.show(name)} is not a model this Space offers; give the folder name of one of "
            f"{offered or 'none (this Space takes no other checkpoints: tick shipped models)'}."
        )

    def _public(self, message: str, typed: list[str] = ()) -> str:
        """A message for the page, without server paths: shipped schedule files by their labels, the Space's folders
        by public names ("." for the app's folder, "<models>" for COMPOSE_MODELS_DIR), and any other absolute path
        (a package's file, a temporary folder) as "<server path>", unless the visitor typed it (`typed`: the form's
        text, echoed back in "... is not offered")."""
        for label, value in sorted(self.schedules.items(), key=lambda kv: -len(kv[1])):
            if value != label:  # a shipped schedule file: its path -> its label
                message = message.replace(value, label)
        folders = [(self.models_dir, "<models>"), (HERE, "."), (HERE.parents[1], ".")]
        for folder, label in sorted(((f, lb) for f, lb in folders if f is not None), key=lambda fl: -len(str(fl[0]))):
            message = message.replace(str(folder) + os.sep, label + "/").replace(str(folder), label)
        return ABS_PATH.sub(lambda m: m[0] if any(m[0] in t for t in typed) else "<server path>", message)

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
        loras: list[str] | None = None,
        lora_mode: str = LORA_COMPOSE,
        candidates: float = 1,
        lift: str = "auto",
        lift_levels: str = "",
        lift_draws: float = 1,
    ) -> J.Job:
        """The form's fields -> a checked `Job` (ValueError naming the field on bad input).

        loras: shipped LoRAs (choices of `J.shipped_loras`, never paths), trained on the first model: one term per
        LoRA with the single prompt, or paired with the prompts line by line. lora_mode: LORA_COMPOSE (the operator
        composes the LoRA terms in one network call per step) or a baseline of `LORA_MODES` (no operator).
        candidates: samples per image, the best by its lift kept (1: one sample, the field left out of the job);
        they count as images (images x candidates <= the images limit).  lift: the estimator (`LIFTS`; "auto": the
        field left out, the pipeline's default).  lift_levels ("3,2,1,0"; empty: the pipeline's) and lift_draws (noise
        draws per level; 1 leaves the field out): the "renoise" lift's options, refused by the job without it.

        The cheap, size-bounding checks come first (a 20 MB prompt is refused before it is split into lines)."""
        lim = self.limits
        prompts, other_models = prompts or "", other_models or ""
        if not isinstance(prompts, str) or not isinstance(other_models, str):
            raise ValueError("prompts and other checkpoints must be text.")
        if len(prompts) > (lim.max_prompt_chars + 1) * lim.max_terms:
            raise ValueError(
                f"prompts: the box holds {len(prompts)} characters; the limit is {lim.max_prompt_chars} per prompt "
                f"and {lim.max_terms} prompts. Shorten them."
            )
        if len(other_models) > (MAX_NAME + 1) * lim.max_terms:
            raise ValueError(
                f"other checkpoints: the box holds {len(other_models)} characters; give at most {lim.max_terms} "
                f"folder names of at most {MAX_NAME} characters, one per line."
            )
        models = list(models or [])
        shipped = J.shipped_models()
        bad = [m for m in models if not isinstance(m, str) or m not in shipped]
        if bad:
            raise ValueError(f"shipped models: {J.show(bad[0])} is not one of {shipped}; tick those only.")
        names = models + [self._other_model(m.strip()) for m in other_models.splitlines() if m.strip()]
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        loras = list(loras or [])
        offered = J.shipped_loras()
        bad = [v for v in loras if not isinstance(v, str) or v not in offered]
        if bad:
            raise ValueError(f"LoRA experts: {J.show(bad[0])} is not one of {offered}; tick those only.")
        if lora_mode != LORA_COMPOSE and lora_mode not in LORA_MODES:
            raise ValueError(f"LoRA mode: {J.show(lora_mode)} is not offered; choose one from the list.")
        lora_mode = None if lora_mode == LORA_COMPOSE or not loras else lora_mode
        if not isinstance(schedule, str) or schedule not in self.schedules:
            raise ValueError(
                f"schedule: {J.show(schedule)} is not offered; choose a named grid or a shipped learned schedule from "
                "the list."
            )
        terms = J.count_terms(len(names), len(lines))
        if loras and terms == 1:
            terms = len(loras)
        raw = {
            "models": names,
            "prompts": lines,
            "operator": operator if terms > 1 and lora_mode is None else None,
            "steps": steps,
            "schedule": self.schedules[schedule],
            "guidance": guidance,
            "seed": seed,
            "images": images,
        }
        if schedule not in GRIDS and schedule != "scheduler":  # a learned schedule brings its steps (and solver)
            raw.pop("steps")
        if size:
            raw["height"] = raw["width"] = size
        if loras:
            raw["lora"] = loras
            if lora_mode is not None:
                raw["lora_mode"] = lora_mode
        if candidates != 1:  # 1 leaves the field out: the job (and its key) of a request without candidates
            raw["candidates"] = candidates
        if lift != "auto":
            raw["lift"] = lift
        if lift_levels is not None and not isinstance(lift_levels, str):
            raise ValueError('lift levels must be text: log-SNR values separated by commas, e.g. "3,2,1,0".')
        if lift_levels and lift_levels.strip():
            raw["lift_levels"] = lift_levels.strip()
        if lift_draws != 1:  # 1 leaves the field out: the job of a request without it
            raw["lift_draws"] = lift_draws
        if operator == "product_smc" and terms > 1 and lora_mode is None:
            raw["num_particles"] = particles
            if moves:  # Langevin rejuvenation moves per step (0: none; the field is left out of the job)
                raw["langevin_steps"] = moves
        return J.parse_job(raw, self.limits)

    def run(self, job: J.Job, progress=None, deadline: J.Deadline | None = None) -> J.JobResult:
        """Load (cached) and run a checked job; ValueError for what the user can fix.

        A model that fails to load is reported without the loader's details (they go to the server log)."""
        try:
            pipe = self.pipes.get(job.models)
        except ValueError as err:
            print(f"loading {job.models} failed: {err}", file=sys.stderr)
            names = [Path(m).name for m in job.models]
            raise ValueError(f"models: {names} cannot be loaded; the server log has the details.") from None
        if deadline is not None:
            deadline.check()
        J.check_prompt_tokens(pipe, job, self.limits)
        if not job.prompts and any(m.is_text for m in pipe.models):
            raise ValueError("prompts is empty; write one prompt per line (a model with a text encoder was chosen).")
        if job.prompts and not any(m.is_text for m in pipe.models):
            raise ValueError("prompts: the chosen models are unconditional (no text encoder); clear the prompts box.")
        first = pipe.models[0]
        native = first.family.native_size(first, pipe.vae_scale_factor)
        if job.height is None and native > self.limits.max_side:
            raise ValueError(
                f"size: the model's native resolution {native} is over this Space's limit {self.limits.max_side}; "
                f"set a size of at most {self.limits.max_side}."
            )
        return J.run_job(pipe, job, progress=progress, deadline=deadline)

    def generate(
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
        loras: list[str] | None = None,
        lora_mode: str = LORA_COMPOSE,
        candidates: float = 1,
        lift: str = "auto",
        lift_levels: str = "",
        lift_draws: float = 1,
        progress=gr.Progress(),  # noqa: B008 -- gradio's progress tracker idiom
    ):
        """The page's handler (API endpoint "/generate"): form fields -> (gallery items, kappa / log q figure,
        summary markdown). The parameter names are the API's input names (gradio_client's keyword arguments); the
        page's initial values are their defaults (see `build_demo`).

        Raises gr.Error (a message in the page) for every failure; unexpected ones are logged on the server. The
        time limit (`Limits.max_seconds`) counts from here: loading, then every step.
        """
        start = time.monotonic()
        fields = (models, other_models, prompts, operator, steps, schedule, guidance, seed, images, size, particles,
                  moves, loras, lora_mode, candidates, lift, lift_levels, lift_draws)  # fmt: skip
        typed = [v for f in fields for v in (f if isinstance(f, (list, tuple)) else [f]) if isinstance(v, str)]
        try:
            job = self.job(*fields)
            deadline = J.Deadline(self.limits.max_seconds, start) if self.limits.max_seconds is not None else None

            def on_step(k: int, n: int) -> None:
                progress((k, n), desc="sampling", unit="steps")

            res = self.run(job, progress=on_step, deadline=deadline)
        except ValueError as err:
            raise gr.Error(self._public(str(err), typed), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 -- never a stack trace in the page; the log keeps it
            traceback.print_exc()
            raise gr.Error(f"internal error ({type(err).__name__}); the server log has the details.") from None
        gallery = [(_enlarge(im), f"seed {job.seed + i}") for i, im in enumerate(res.images)]
        fig = plot_traces(res)
        plt.close(fig)
        return gallery, fig, summary_markdown(res, job, self.schedule_label(job.schedule))

    def schedule_label(self, value: str) -> str:
        """The name the page shows for a schedule (a grid's name, a shipped file's folder/name)."""
        return next((label for label, v in self.schedules.items() if v == value), value)


def offered_schedules() -> dict[str, str]:
    """What the schedule box offers: the named grids (value = name) and the learned-schedule files shipped next to
    the models (label "schedules-.../x.json" -> its path). Nothing else is accepted."""
    out = {name: name for name in GRIDS}
    out["scheduler"] = "scheduler"  # a flow-matching checkpoint's own sigmas (shift, dynamic shift); UNets refuse it
    for d in shipped.SHIPPED_DIRS:
        for f in sorted(Path(d).glob("schedules-*/*.json")):
            out.setdefault(f"{f.parent.name}/{f.name}", str(f))
    return out


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


def summary_markdown(res: J.JobResult, job: J.Job, schedule: str | None = None) -> str:
    """A table per term: mean / last kappa, final log q, lift (mean over the images, then each image's), images
    won; the run's timing, and what the lift is (estimator, score per image, candidates kept, rows it cost)."""
    s = res.summary()
    op = job.operator or (f"LoRA {job.lora_mode}" if job.lora_mode else "none (one term)")
    lines = [
        f"**{op}** over {len(res.terms)} term(s), {job.steps} steps ({schedule or job.schedule}), guidance "
        f"{job.guidance if job.guidance is not None else 'default'}, seeds {job.seed}..{job.seed + job.images - 1}: "
        f"{res.seconds:.1f} s ({res.seconds / job.images:.2f} s/image).",
        "",
        "| term | mean kappa | kappa at last step | final log q (mean) | lift (mean; per image) | images won |",
        "|---|---:|---:|---:|---|---:|",
    ]
    won = s.get("images_won", [job.images])
    per_term = len(s["kappa_mean"]) == len(res.terms)
    lift_per_term = res.lift is not None and res.lift_terms == res.terms
    for j, name in enumerate(res.terms):
        km = f"{s['kappa_mean'][j]:.3f}" if per_term else "-"
        kl = f"{s['kappa_last'][j]:.3f}" if per_term else "-"
        lift = _lift_cell(res.lift[:, j]) if lift_per_term else "-"
        lines.append(f"| {name} | {km} | {kl} | {s['log_q_final'][j]:.1f} | {lift} | {won[j]} |")
    if res.lift is not None and not lift_per_term:  # lora_mode "merge": one lift per merged LoRA
        lines += ["", "| lift term | lift (mean; per image) |", "|---|---|"]
        lines += [f"| {name} | {_lift_cell(res.lift[:, j])} |" for j, name in enumerate(res.lift_terms)]
    lines += ["", lift_note(res, job)]
    return "\n".join(lines)


def _lift_cell(values) -> str:
    """ "mean (image 1 / image 2 / ...)" of one term's lifts, in nats."""
    return f"{float(values.mean()):.2f} ({' / '.join(f'{float(v):.1f}' for v in values)})"


def lift_note(res: J.JobResult, job: J.Job | None = None) -> str:
    """One line on the lift: its estimator (and the renoise levels and draws a job chose), each image's score, the
    candidates kept and the rows it cost."""
    if res.lift is None:
        return "Lift: none (lift 'none', operator product_smc, or 'tracked' without guidance: try 'renoise')."
    scores = " / ".join(f"{float(v):.1f}" for v in res.scores())
    text = (
        f"Lift: `{res.estimator}` estimator ({ESTIMATORS.get(res.estimator, '')}), log q_term - log q_ref of each "
        "image in nats (above 0: the term explains the image better than its reference); score per image "
        f"({res.score_rule} over the terms): {scores}."
    )
    if job is not None and res.estimator == "renoise" and (job.lift_levels or job.lift_draws):
        v = job.verification()  # the levels and draws that ran (the pipeline's defaults where the job left them out)
        levels = ", ".join(f"{x:g}" for x in v.levels)
        text += f" Read at log-SNR {levels}, {v.draws} noise draw{'s' if v.draws > 1 else ''} per level."
    if res.candidate is not None:
        kept = ", ".join(str(int(v)) for v in res.candidate)
        text += f" Best of {res.candidates} candidates per image; kept: {kept}."
    if res.verification_rows:
        text += f" The lift cost {res.verification_rows} network rows per image."
    return text


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
                offered = app.other_models()
                other = gr.Textbox(
                    "",  # an initial value: the API input is optional (a default), not required
                    label=f"other checkpoints (folder names, one per line: {', '.join(offered)})",
                    lines=2,
                    elem_id="other_models",
                    max_length=(MAX_NAME + 1) * lim.max_terms,
                    visible=bool(offered),
                )
                prompts = gr.Textbox(
                    "a red shape\na circle",
                    label=f"prompts (one per line, at most {lim.max_prompt_chars} characters each; empty for "
                    "unconditional models)",
                    lines=3,
                    elem_id="prompt",
                    max_length=(lim.max_prompt_chars + 1) * lim.max_terms,
                )
                operator = gr.Dropdown(list(OPERATORS), value="and", label="operator", elem_id="operator")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(50, lim.max_steps), step=1, label="steps")
                    schedule = gr.Dropdown(
                        list(app.schedules),
                        value="log_snr",
                        label="schedule (a named grid, or a shipped learned schedule: it brings its steps and solver)",
                        allow_custom_value=False,
                        elem_id="schedule",
                    )
                with gr.Row():
                    guidance = gr.Slider(1, 15, value=4, step=0.5, label="guidance (1 = none)")
                    seed = gr.Number(0, precision=0, minimum=0, maximum=2**53, label="seed")
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
                with gr.Row():
                    loras = gr.CheckboxGroup(
                        J.shipped_loras(),
                        value=[],
                        label="LoRA experts (on the first model; one term per LoRA, or paired with the prompts)",
                        elem_id="loras",
                    )
                    lora_mode = gr.Dropdown(
                        [LORA_COMPOSE, *LORA_MODES],
                        value=LORA_COMPOSE,
                        label="LoRA mode (merge / switch / composite: the baselines, operator unused)",
                        allow_custom_value=False,
                        elem_id="lora_mode",
                    )
                with gr.Row():
                    candidates = gr.Slider(
                        1,
                        lim.max_candidates,
                        value=1,
                        step=1,
                        label="candidates per image (the best by its lift kept; each costs as much as an image)",
                        elem_id="candidates",
                    )
                    lift = gr.Dropdown(
                        list(LIFTS),
                        value="auto",
                        label="lift (per-image concept score: auto = tracked for 1 candidate, renoise to choose)",
                        allow_custom_value=False,
                        elem_id="lift",
                    )
                with gr.Row():
                    lift_levels = gr.Textbox(
                        "",
                        label="lift levels (renoise; log-SNR, e.g. 3,2,1,0 for fine detail; empty = -1,-2,-3,-4)",
                        max_lines=1,
                        elem_id="lift_levels",
                    )
                    lift_draws = gr.Slider(
                        1,
                        MAX_DRAWS,
                        value=1,
                        step=1,
                        label="lift draws (renoise: noise draws per level; steadier, at that many times the rows)",
                        elem_id="lift_draws",
                    )
                run = gr.Button("Generate", variant="primary", elem_id="run")
            with gr.Column():
                out = gr.Gallery(label="images", columns=4, elem_id="out", height="auto")
                summary = gr.Markdown(elem_id="summary")
        plot = gr.Plot(label="kappa and log q over the steps", elem_id="plot")
        run.click(
            app.generate,
            inputs=[models, other, prompts, operator, steps, schedule, guidance, seed, images, size, particles, moves,
                    loras, lora_mode, candidates, lift, lift_levels, lift_draws],  # fmt: skip
            outputs=[out, plot, summary],
            api_name="generate",
        )
    demo.queue(default_concurrency_limit=1, max_size=app.queue_size)  # one runs, at most queue_size wait
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
