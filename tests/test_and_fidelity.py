"""AND against SuperDiff's own two-prompt closed form, the "ddim" solver against diffusers' DDIM / Euler schedulers,
the checkpoint's x0 clipping, and N steps = N network evaluations (issue 19).

SuperDiff's Stable Diffusion script (Skreta et al., arXiv 2412.17762, their official code) steps in the variance-
exploding variable s = sigma / alpha, y = x / alpha, with CFG around the pair (obj, bg):
    dy_ind = 2 ds (u + w (bg - u)) + sqrt(2 |ds| s) z,   ds = s' - s < 0,
    kappa  = ( |ds| <bg - obj, bg + obj> - <dy_ind, obj - bg> ) / (2 ds w |obj - bg|^2)                     (SDE)
and moves by dy = dy_ind + 2 ds w kappa (obj - bg). For deterministic sampling (dy = ds eps_bar) equal increments of
d log q_i = |ds| (div_y eps_i - <eps_i, eps_i - eps_bar> / s) give
    kappa  = ( s (div_y bg - div_y obj) + |obj|^2 - |bg|^2 - <obj - bg, u + w (bg - u)> ) / (w |obj - bg|^2)  (ODE)
with div_y = alpha div_x. `solver="ddim"` takes exactly these steps, so our general AND solve must reproduce them.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from test_pipeline import cond_unet, make_tokenizer, text_encoder, uncond_unet

import compose
from compose.composer import Composer, divergence
from compose.predictions import eps_to_x0
from compose.solvers import X0Clip, first_order, solver_step, step_rates
from compose.toy import GaussianMixture
from pipelines import ComposePipeline

W = 3.0  # guidance scale of the closed-form tests


class TextTerm:
    """A tiny SD UNet with one fixed prompt as a compose model (eps(x, t) on the SD noise table)."""

    def __init__(self, unet, schedule, hidden, name):
        self.unet, self.schedule, self.hidden, self.name = unet, schedule, hidden, name

    def eps(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        ts = self.schedule.timestep(t).float().reshape(-1).expand(x.shape[0])
        ehs = self.hidden.expand(x.shape[0], -1, -1)
        return self.unet(x.float(), ts, encoder_hidden_states=ehs, return_dict=False)[0].to(x.dtype)


@pytest.fixture(scope="module")
def sd_terms(tmp_path_factory):
    tok = make_tokenizer(str(tmp_path_factory.mktemp("tok")))
    enc = text_encoder()
    unet = cond_unet(seed=3).eval()
    sch = compose.NoiseSchedule.from_scheduler(
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    with torch.no_grad():
        hid = {p: enc(tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
               for p in ("a cat", "a dog", "")}  # fmt: skip
    return (TextTerm(unet, sch, hid["a cat"], "obj"), TextTerm(unet, sch, hid["a dog"], "bg"),
            TextTerm(unet, sch, hid[""], "u"))  # fmt: skip


def closed_form_sde(obj, bg, u, w, s, s_next, z):
    """SuperDiff's SDE kappa (module docstring) per sample, float64. All of obj, bg, u, z: (n, d)."""
    ds = s_next - s
    dy_ind = 2 * ds * (u + w * (bg - u)) + math.sqrt(2 * abs(ds) * s) * z
    num = abs(ds) * ((bg - obj) * (bg + obj)).sum(-1) - (dy_ind * (obj - bg)).sum(-1)
    return num / (2 * ds * w * ((obj - bg) ** 2).sum(-1))


def closed_form_ode(obj, bg, u, w, s, div_y_obj, div_y_bg):
    """SuperDiff's deterministic kappa (module docstring) per sample, float64."""
    num = s * (div_y_bg - div_y_obj) + (obj**2).sum(-1) - (bg**2).sum(-1) - ((obj - bg) * (u + w * (bg - u))).sum(-1)
    return num / (w * ((obj - bg) ** 2).sum(-1))


def flat(e):
    return e.reshape(e.shape[0], -1).double()


def replay(method, x_T, ts, terms, generator_seed, probes=1):
    """Re-draw the sampler's noise / probes (compose.loop.TorchDraws' order) step by step."""
    g = torch.Generator().manual_seed(generator_seed)
    out = []
    for k in range(ts.numel() - 1):
        final = float(ts[k + 1]) == 0.0
        z = None if method != "sde" or final else torch.randn(x_T.shape, generator=g, dtype=torch.float64)
        zeta = None
        if method == "ode":
            zeta = (2 * torch.randint(0, 2, (probes, *x_T.shape), generator=g) - 1).to(x_T.dtype)
        out.append((z, zeta))
    return out


# ---------------------------------------------------------------------- 1. AND == SuperDiff's closed form
@pytest.mark.parametrize("method", ["sde", "ode"])
def test_and_reproduces_superdiffs_closed_form_along_a_tiny_sd_trajectory(sd_terms, method):
    """Guided(AND(obj, bg), u, w) with solver="ddim": at every step where the closed form is well conditioned
    (|obj - bg| >= 1e-3 |eps|) our kappa equals it to 1e-3 (relative to max(1, |kappa|)); the step to the data solves
    its own kappa (the deterministic formula, without divergence under the SDE)."""
    obj, bg, u = sd_terms
    sch = obj.schedule
    expr = compose.Guided(compose.AND(obj, bg), u, W)
    ts = compose.make_grid(sch, 12)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sch.sigma(ts[0]))
    states = [x_T]
    with torch.no_grad():
        res = compose.sample(expr, x_T=x_T, timesteps=ts, method=method, solver="ddim", divergence="hutchinson_fd",
                             generator=torch.Generator().manual_seed(1),
                             callback=lambda k, t, x, lq: states.append(x.clone()))  # fmt: skip
    draws = replay(method, x_T, ts, sd_terms, 1)
    checked, rs = 0, []
    for k in range(ts.numel() - 1):
        x, t = states[k], float(ts[k])
        s = float(sch.sigma(t) / sch.alpha(t))
        s_next = 0.0 if float(ts[k + 1]) == 0 else float(sch.sigma(ts[k + 1]) / sch.alpha(ts[k + 1]))
        with torch.no_grad():
            e = {m.name: m.eps(x, t) for m in sd_terms}
        eo, eb, eu = (flat(e[n]) for n in ("obj", "bg", "u"))
        r = ((eo - eb).norm(dim=1) / eb.norm(dim=1)).min()
        rs.append(float(r))
        z, zeta = draws[k]
        if method == "sde" and z is not None:
            want = closed_form_sde(eo, eb, eu, W, s, s_next, flat(z))
        else:
            if zeta is not None:
                fd = 1e-3 * float(sch.sigma(t))
                alpha = float(sch.alpha(t))
                with torch.no_grad():
                    dv = {m.name: alpha * divergence(lambda y, m=m, t=t: m.eps(y, t), x, kind="hutchinson_fd",
                                                     probes=zeta, fd_eps=fd) for m in (obj, bg)}  # fmt: skip
                d_obj, d_bg = dv["obj"].double(), dv["bg"].double()
            else:  # the SDE's step to the data: no divergence
                d_obj = d_bg = torch.zeros(eo.shape[0], dtype=torch.float64)
            want = closed_form_ode(eo, eb, eu, W, s, d_obj, d_bg)
        got = res.kappa[k, :, 0]
        if float(r) >= 1e-3:
            checked += 1
            tol = 1e-3 * torch.clamp(got.abs(), min=1.0)
            assert bool(((got - want).abs() <= tol).all()), (k, got, want, float(r))
        torch.testing.assert_close(res.kappa[k].sum(-1), torch.ones(3, dtype=torch.float64))
    assert checked >= ts.numel() - 2, (checked, rs)
    assert max(rs) > 1e-2 and min(rs) < 3e-3  # the trajectory spans an order of magnitude of r
    assert bool(torch.isfinite(res.samples).all())


@pytest.mark.parametrize("r", [1e-1, 1e-2, 1e-3])
def test_and_is_the_exact_solve_down_to_relative_differences_of_1e_3(sd_terms, r):
    """Two float32 predictions that differ by a relative r (built from the UNet's own outputs): kappa equals the
    closed form to 1e-3 at r = 1e-1, 1e-2 and 1e-3. (The previous ridge of 1e-6 on the normal equations of
    B / |eps|^2 ~ r^2 shrank the solve by (B^2 / (B^2 + 1e-6)): 0.02 at r = 1e-2, i.e. to the average.)"""
    obj, bg, u = sd_terms
    sch = obj.schedule
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.8
    t, t_next = 0.55, 0.5
    with torch.no_grad():
        eb, eo, eu = bg.eps(x, t), obj.eps(x, t), u.eps(x, t)
    direction = (eo - eb) / flat(eo - eb).norm(dim=1).reshape(-1, 1, 1, 1)
    eo = (eb + r * flat(eb).norm(dim=1).reshape(-1, 1, 1, 1) * direction).float()  # float32, as a network gives
    expr = compose.Guided(compose.AND(obj, bg), u, W)
    comp = Composer(expr, schedule=sch, method="sde")
    eps = torch.stack([eo, eb, eu])  # leaves in the core's order: obj, bg, u
    assert [m.name for m in comp.leaves] == ["obj", "bg", "u"]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rates = step_rates("ddim", sch, t, t_next)
    out = comp.weigh(eps, torch.zeros(4, 3, dtype=torch.float64), rates, noise=z)
    s, s_next = (float(sch.sigma(v) / sch.alpha(v)) for v in (t, t_next))
    want = closed_form_sde(flat(eo), flat(eb), flat(eu), W, s, s_next, flat(z))
    got = out.kappa["root.0"][:, 0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_coinciding_and_collinear_predictions_give_finite_minimum_norm_weights():
    sch = compose.NoiseSchedule.vp_linear()
    leaves = [GaussianMixture([[0.0, 0.0]], 1.0, schedule=sch, name=f"m{i}") for i in range(3)]
    g = torch.Generator().manual_seed(0)
    base, d = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    z = torch.randn(5, 6, generator=g)
    rates = step_rates("euler", sch, 0.5, 0.45)
    for M in (2, 3):  # identical predictions: kappa = 1/M exactly
        comp = Composer(compose.AND(*leaves[:M]), method="sde")
        out = comp.weigh(base.expand(M, -1, -1).clone(), torch.zeros(5, M, dtype=torch.float64), rates, noise=z)
        torch.testing.assert_close(out.kappa["root"], torch.full((5, M), 1.0 / M, dtype=torch.float64))
    # three collinear predictions e_i = base + c_i d: one direction of kappa-space does not move eps_bar
    c = torch.tensor([0.0, 1.0, 0.5])
    eps = base[None] + c[:, None, None] * d[None]
    comp = Composer(compose.AND(*leaves), method="sde")
    log_q = torch.zeros(5, 3, dtype=torch.float64)
    out = comp.weigh(eps, log_q, rates, noise=z)
    kappa = out.kappa["root"]
    assert bool(torch.isfinite(kappa).all()) and bool(torch.isfinite(out.eps).all())
    torch.testing.assert_close(kappa.sum(-1), torch.ones(5, dtype=torch.float64))
    null = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)  # eps_bar unchanged along it (0 + 1 - 2 * 0.5 = 0)
    assert float((kappa @ null).abs().max()) < 1e-6  # the minimum-norm solution has no component along it
    # The solvable direction (kappa_1 - kappa_2) equalises models 1 and 2; no kappa moves model 3 against them (its
    # |eps|^2 term is quadratic in c_i while eps_bar is linear), so that condition is left, as least squares does.
    dlogq = out.log_q - log_q
    torch.testing.assert_close(dlogq[:, 0], dlogq[:, 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_and_closed_form_on_exact_gaussian_mixtures(two_mixtures, method):
    """AND(A, B) with solver="ddim" on the exact 2-D mixtures (no guidance: w = 1, u unused): the closed form at
    every step, exact divergences for the ODE."""
    a, b = two_mixtures()
    sch = a.schedule
    ts = compose.make_grid(sch, 40)
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = [x_T]
    res = compose.sample(compose.AND(a, b), x_T=x_T, timesteps=ts, method=method, solver="ddim", divergence="exact",
                         generator=torch.Generator().manual_seed(5),
                         callback=lambda k, t, x, lq: states.append(x.clone()))  # fmt: skip
    draws = replay(method, x_T, ts, (a, b), 5, probes=0)
    worst = 0.0
    for k in range(ts.numel() - 1):
        x, t = states[k], float(ts[k])
        s = float(sch.sigma(t) / sch.alpha(t))
        s_next = 0.0 if float(ts[k + 1]) == 0 else float(sch.sigma(ts[k + 1]) / sch.alpha(ts[k + 1]))
        ea, eb = a.eps(x, t), b.eps(x, t)
        z, _ = draws[k]
        if method == "sde" and z is not None:
            want = closed_form_sde(ea, eb, eb, 1.0, s, s_next, z)
        else:
            alpha = float(sch.alpha(t))
            dv = [alpha * divergence(lambda y, m=m, t=t: m.eps(y, t), x, kind="exact") if method == "ode"
                  else torch.zeros(x.shape[0], dtype=torch.float64) for m in (a, b)]  # fmt: skip
            want = closed_form_ode(ea, eb, eb, 1.0, s, dv[0], dv[1])
        ok = ((ea - eb).norm(dim=1) >= 1e-3 * eb.norm(dim=1)) & (want.abs() < 1e6)
        err = (res.kappa[k, :, 0] - want).abs() / torch.clamp(want.abs(), min=1.0)
        worst = max(worst, float(err[ok].max()))
    assert worst < 1e-6, worst


# ---------------------------------------------------------------------- 2. the checkpoint's x0 clipping
def test_x0_clip_has_diffusers_semantics():
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    clip = X0Clip.from_config(DDPMScheduler(clip_sample=True, clip_sample_range=1.5).config)
    torch.testing.assert_close(clip(x0), x0.clamp(-1.5, 1.5))
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    thr = X0Clip.from_config(sched.config)
    torch.testing.assert_close(thr(x0), sched._threshold_sample(x0.clone()))
    assert X0Clip.from_config(DDPMScheduler(clip_sample=False).config) is None
    assert X0Clip.from_config(DDPMScheduler(clip_sample=True).config, clip_sample=False) is None
    assert X0Clip.from_config({}, clip_sample=True, clip_sample_range=2.0) == X0Clip(2.0)
    with pytest.raises(ValueError, match="clip_sample_range"):
        X0Clip(0.0)


@pytest.mark.parametrize("solver", ["euler", "ddim"])
@pytest.mark.parametrize("k", [50, 300, 600, 900])
def test_sde_step_uses_the_clipped_x0_as_ddpm_does(k, solver):
    """On DDPMScheduler's own 1000-step grid (t_k = (k + 1) / 1000 -> k / 1000), what clipping adds to an SDE step
    equals what it adds to DDPMScheduler.step (same x, eps and noise: the posterior mean c0 clip(x0) + ct x_t against
    c0 x0 + ct x_t) to 2.5% (measured 0.1-1.8%: the SDE steps are first order in the step, e.g. 2 (1 - s'/s) against
    1 - s'^2/s^2 for "ddim"). Shifting x to alpha clip(x0) + sigma eps (DDIM's use, kept for the ODE step) adds
    25-100 times as much."""
    sch = compose.NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(k)
    x, eps, z = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    x = 1.5 * x  # x0_hat leaves [-1, 1] in most pixels
    added = {}
    for c in (True, False):
        ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=c)
        ddpm.set_timesteps(1000)
        added[c] = ddpm.step(eps, k, x, generator=torch.Generator().manual_seed(1), return_dict=False)[0]
    want = added[True] - added[False]
    tc, tn = (torch.tensor(v / 1000, dtype=torch.float64) for v in (k + 1, k))
    step = lambda clip: solver_step(solver, x, eps, tc, tn, sch, noise=z, clip=clip)  # noqa: E731
    got = step(X0Clip(1.0)) - step(None)
    assert float(want.norm()) > 0.3  # the clip acts
    assert float((got - want).norm() / want.norm()) < 0.025
    x0 = eps_to_x0(eps, x, tc, sch)
    shifted = first_order("ddim", x + sch.alpha(tc) * (x0.clamp(-1, 1) - x0), eps, tc, tn, sch, z)
    assert float((shifted - first_order("ddim", x, eps, tc, tn, sch, z)).norm() / want.norm()) > 20


def test_tracked_density_follows_the_clipped_path(two_mixtures):
    """With clipping active (data at +-2, x0 clipped to [-1, 1]) the samples follow another path than without, and
    each model's tracked log q is still its exact log q at the samples (ODE, exact divergence), as accurately as
    without clipping and with the same first-order convergence: the estimator tracks the path actually taken, not
    the unclipped drift (measured: 0.091 / 0.046 nats at 200 / 400 steps, unclipped runs 0.107 / 0.054)."""
    a, b = two_mixtures()
    sch = a.schedule
    x_T = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = {}
    for n in (200, 400):
        ts = compose.make_grid(sch, n + 1)[:-1]  # to t_min, where q_t is smooth
        kw = dict(x_T=x_T, timesteps=ts, method="ode", solver="euler", divergence="exact")
        runs = {c: compose.sample(compose.OR(a, b), clip=c, **kw) for c in (X0Clip(1.0), None)}
        assert float((runs[None].samples - runs[X0Clip(1.0)].samples).norm(dim=1).mean()) > 1.0  # the clip acts
        for c, r in runs.items():
            exact = torch.stack([m.log_prob(r.samples, ts[-1]) for m in (a, b)], -1)
            errs[n, c is None] = float((r.log_q - exact).abs().mean())
    for n in (200, 400):
        assert errs[n, False] <= 1.2 * errs[n, True], errs
    assert errs[400, False] < 0.6 * errs[200, False], errs


def test_pipeline_reads_clip_sample_from_the_scheduler_config_and_takes_an_override():
    unet = uncond_unet(0)
    pipe = ComposePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, method="ode", solver="ddim", output_type="latent", batch_size=2,
              generator=torch.Generator().manual_seed(0))  # fmt: skip
    clipped = pipe(**kw).images
    assert float(clipped.abs().max()) <= 1.0 + 1e-6
    kw["generator"] = torch.Generator().manual_seed(0)
    free = pipe(**kw, clip_sample=False).images
    assert float(free.abs().max()) > 1.5  # a random UNet's x0_hat leaves [-1, 1]


# ---------------------------------------------------------------------- 3. "ddim" == diffusers' DDIM and Euler
class UNetModel:
    """An unconditional UNet on a diffusers table as a compose model (float64 in float64 out)."""

    def __init__(self, unet, scheduler):
        self.unet, self.schedule, self.name = unet, compose.NoiseSchedule.from_scheduler(scheduler), "unet"

    def eps(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        ts = self.schedule.timestep(t).reshape(-1).expand(x.shape[0]).to(x.dtype)
        return self.unet(x, ts, return_dict=False)[0]


def _diffusers_loop(scheduler, unet, x):
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = unet(x_in, t.to(x.dtype).expand(x.shape[0]), return_dict=False)[0]
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


def _schedulers():
    ddim = {c: DDIMScheduler(num_train_timesteps=1000, clip_sample=c, set_alpha_to_one=True) for c in (False, True)}
    for s in ddim.values():
        s.set_timesteps(10)
    euler = EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    euler.set_timesteps(8)
    return {"ddim": ddim[False], "ddim_clip": ddim[True], "euler": euler}


@pytest.mark.parametrize("name", ["ddim", "ddim_clip", "euler"])
def test_ddim_solver_equals_diffusers_ddim_and_euler_schedulers(name):
    """One model, no operator, solver="ddim" on the scheduler's own timesteps (ending with its step to sigma = 0):
    diffusers' DDIMScheduler (with and without clip_sample) and EulerDiscreteScheduler, in float64, to 1e-5; the
    pipeline (float32) to 1e-4."""
    sched = _schedulers()[name]
    unet = uncond_unet(1).eval()
    model = UNetModel(unet.double(), sched)
    sch = model.schedule
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        ref = _diffusers_loop(sched, unet, x_T * sched.init_noise_sigma)
    # diffusers' latents: DDIM's are the VP state x (x_T unit noise), Euler's y = x / alpha (y_T = sigma_max x_T with
    # "trailing" spacing); the pipeline starts from sigma(t_0) * latents.
    ts = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    x_start = x_T * sched.init_noise_sigma * (float(sch.alpha(ts[0])) if name == "euler" else 1.0)
    clip = X0Clip.from_config(sched.config)
    assert (clip is not None) == (name == "ddim_clip")
    with torch.no_grad():
        out = compose.sample(model, x_T=x_start, timesteps=ts, method="ode", solver="ddim", clip=clip,
                             divergence="hutchinson_fd", generator=torch.Generator().manual_seed(0))  # fmt: skip
    # diffusers computes its step coefficients from the float32 table in float32 (relative 1e-7)
    torch.testing.assert_close(out.samples, ref, atol=1e-5, rtol=1e-6)
    unet32 = unet.float()
    pipe = ComposePipeline(unet=unet32, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    t0 = float(ts[0])
    latents = (x_start / float(sch.sigma(t0))).float()
    got = pipe(timesteps=sched.timesteps.tolist(), method="ode", solver="ddim", output_type="latent",
               latents=latents, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert got.timesteps.shape == ts.shape and float(got.timesteps[-1]) == 0.0  # N evaluations, then the data
    torch.testing.assert_close(got.images.double(), ref, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------- 4. N steps cost N evaluations
def test_n_steps_are_n_network_evaluations(two_mixtures):
    a, _ = two_mixtures()
    calls = []

    class Counted:
        schedule, name, sample_shape = a.schedule, "A", (2,)

        def eps(self, x, t):
            calls.append(float(torch.as_tensor(t)))
            return a.eps(x, t)

    for n, method in ((1, "sde"), (4, "sde"), (7, "ode")):
        calls.clear()
        res = compose.sample(Counted(), num_samples=3, steps=n, method=method, divergence="exact",
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        if method == "sde":
            assert len(calls) == n  # one evaluation per step; the last step lands on x0_hat of the last one
        assert res.timesteps.shape == (n + 1,) and float(res.timesteps[-1]) == 0.0
        assert sorted(set(calls), reverse=True) == [float(v) for v in res.timesteps[:-1]]


# ---------------------------------------------------------------------- 5. product == Composable Diffusion
def _composable_diffusion_loop(scheduler, unet, hidden: list[torch.Tensor], uncond: torch.Tensor, scales, x):
    """The published Composable Stable Diffusion update (Liu et al. 2022; diffusers' community pipeline
    `composable_stable_diffusion.py`), written from its description: one UNet call per prompt and one for the empty
    prompt, eps = eps_u + sum_i scale_i (eps_i - eps_u) (a negative scale negates), then `scheduler.step`."""
    for t in scheduler.timesteps:
        ts = t.expand(x.shape[0])
        eps_u = unet(x, ts, encoder_hidden_states=uncond.expand(x.shape[0], -1, -1), return_dict=False)[0]
        eps = eps_u.clone()
        for h, s in zip(hidden, scales, strict=True):
            eps_i = unet(x, ts, encoder_hidden_states=h.expand(x.shape[0], -1, -1), return_dict=False)[0]
            eps = eps + s * (eps_i - eps_u)
        x = scheduler.step(eps, t, x, eta=0.0, return_dict=False)[0]
    return x


@pytest.mark.parametrize("scales", [(7.5, 7.5), (7.5, -3.0)])
def test_product_reproduces_composable_diffusion(tmp_path, scales):
    """operator="product" with weights = scale_i / guidance_scale and solver="ddim" on DDIMScheduler's own timesteps
    is Composable Diffusion's conjunction (and negation) from the same latents, to 1e-4 (float32: the batched call
    and the published per-prompt calls round differently, 2e-5 seen with guidance 7.5); one batched UNet call per
    step where the published loop makes one per prompt plus one."""
    from test_pipeline import CallCounter

    tok = make_tokenizer(str(tmp_path / "tok"))
    enc = text_encoder()
    unet = cond_unet(seed=5).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, set_alpha_to_one=True, clip_sample=False)  # fmt: skip
    sched.set_timesteps(6)
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        hid = [enc(tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
               for p in [*prompts, ""]]  # fmt: skip
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = _composable_diffusion_loop(sched, unet, hid[:2], hid[2], scales, latents * sched.init_noise_sigma)
    pipe = ComposePipeline(unet=unet, scheduler=sched, text_encoder=enc, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    calls = CallCounter(unet)
    w = 7.5
    sch = compose.NoiseSchedule.from_scheduler(sched)
    t0 = float((sched.timesteps[0].double() + 1) / 1000)
    out = pipe(prompt=prompts, operator="product", weights=[s / w for s in scales], guidance_scale=w,
               timesteps=sched.timesteps.tolist(), method="ode", solver="ddim", output_type="latent",
               latents=latents / float(sch.sigma(t0)), generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)
    assert len(calls.rows) == 6  # one call per step (prompts, empty prompt and probe rows together)
