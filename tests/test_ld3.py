"""LD3 learned schedules on 2-D mixtures (exact models, exact-enough teacher) and the schedule-file checks."""

from __future__ import annotations

import json

import pytest
import torch

import compose
from compose import ld3
from compose.grids import make_grid
from pipelines.learn_schedule import main as learn_schedule_main


def noises(sch, n, seed):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * float(
        sch.sigma(sch.t_max)
    )


def test_grid_parametrisation_is_monotone_and_invertible():
    sch = compose.NoiseSchedule.vp_linear()
    xi = torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ts = ld3.grid_from_params(sch, xi, sch.t_max, sch.t_min)  # 7 gaps: 8 evaluations, then the data
    assert ts.shape == (9,) and bool(torch.all(ts[1:] < ts[:-1]))
    assert float(ts[0]) == sch.t_max and float(ts[-2]) == sch.t_min and float(ts[-1]) == 0.0
    back = ld3.grid_from_params(sch, ld3.params_from_grid(sch, ts), sch.t_max, sch.t_min)
    torch.testing.assert_close(back, ts)


def test_grid_gradient_on_a_discrete_table_matches_finite_differences():
    from compose.schedule import alphas_cumprod_from_config

    sch = compose.NoiseSchedule.from_alphas_cumprod(alphas_cumprod_from_config({"beta_schedule": "linear"}))
    xi = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, 1.0, -2.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    (ld3.grid_from_params(sch, xi, sch.t_max, sch.t_min) * w).sum().backward()
    e = 1e-5
    for j in range(4):
        d = torch.zeros(4, dtype=torch.float64)
        d[j] = e
        with torch.no_grad():
            fp = (ld3.grid_from_params(sch, xi + d, sch.t_max, sch.t_min) * w).sum()
            fm = (ld3.grid_from_params(sch, xi - d, sch.t_max, sch.t_min) * w).sum()
        assert abs(float(xi.grad[j]) - float(fp - fm) / (2 * e)) < 2e-3 * (1 + abs(float(xi.grad[j])))


def test_the_teacher_is_the_exact_flow_of_a_gaussian():
    sch = compose.NoiseSchedule.vp_linear()
    mu, std = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    g = compose.toy.GaussianMixture(mu[None], std, schedule=sch)
    x_T = noises(sch, 16, 0)
    out = ld3.solve(g, x_T, make_grid(sch, 200, "log_snr"), "dpm2m")
    a0, s0, a1, s1 = (
        float(v) for v in (sch.alpha(sch.t_max), sch.sigma(sch.t_max), sch.alpha(sch.t_min), sch.sigma(sch.t_min))
    )
    v0, v1 = (a0**2 * std**2 + s0**2) ** 0.5, (a1**2 * std**2 + s1**2) ** 0.5
    exact = a1 * mu + (v1 / v0) * (x_T - a0 * mu)
    assert float((out - exact).norm(dim=1).max()) < 5e-4  # vs distances ~0.1-1 at NFE 4-10


@pytest.mark.parametrize("solver", ["dpm2m", "euler", "unipc"])
def test_learned_grid_cuts_the_distance_to_the_teacher(solver, two_mixtures):
    a, _ = two_mixtures()
    sch = a.schedule
    x = noises(sch, 96, 1)
    res = ld3.learn_schedule(
        a, 4, x[:64], x[64:], solver=solver, iters=60, progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert bool(torch.all(res.grid[1:] < res.grid[:-1])) and res.grid.shape == (5,)
    assert res.val_loss < 0.5 * res.val_loss_init, (res.val_loss, res.val_loss_init)
    # the reported validation distance is the distance of the plain student on the learned grid
    teacher = ld3.solve(a, x[64:], make_grid(sch, 200, "log_snr"), "dpm2m")
    student = ld3.solve(a, x[64:], res.grid, solver)
    assert abs(float((student - teacher).norm(dim=1).mean()) - res.val_loss) < 1e-6


def test_learned_grid_for_or_with_time_shift(two_mixtures):
    a, b = two_mixtures()
    x = noises(a.schedule, 48, 2)
    expr = compose.OR(a, b)
    res = ld3.learn_schedule(expr, 4, x[:32], x[32:], iters=20, time_shift=True, progress=False, teacher_steps=100)
    assert res.val_loss < res.val_loss_init
    net = res.network_times
    gaps = res.grid[:-1] - res.grid[1:]
    assert net.shape == (4,) and bool(torch.all((net - res.grid[:-1]).abs() <= 0.5 * gaps + 1e-12))
    assert res.info["operator"] == "OR(A, B)" and res.info["model"] == "A,B"


@pytest.mark.parametrize("op,solver", [("OR", "dpm2m"), ("AND", "dpm2m"), ("OR", "unipc")])
def test_weight_grad_is_the_full_gradient_of_the_composed_solve(two_mixtures, op, solver):
    """With weight_grad the gradient in x_T of the student's output matches central finite differences (the weights
    depend on x_T through the tracked densities); holding the weights constant gives a different, partial gradient.
    Both runs give the same values."""
    a, b = two_mixtures()
    expr = getattr(compose, op)(a, b)
    ts = make_grid(a.schedule, 4, "ays_sdxl")
    x = noises(a.schedule, 6, 5).requires_grad_(True)
    w = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(z, grad):
        return (ld3.solve(expr, z, ts, solver, weight_grad=grad) * w).sum()

    (full,) = torch.autograd.grad(loss(x, True), x)
    (part,) = torch.autograd.grad(loss(x, False), x)
    with torch.no_grad():
        assert float(loss(x, True)) == float(loss(x, False))
        h, fd = 1e-6, torch.zeros_like(x)
        for i in range(x.shape[0]):
            for j in range(2):
                e = torch.zeros_like(x)
                e[i, j] = h
                fd[i, j] = (loss(x + e, True) - loss(x - e, True)) / (2 * h)
    torch.testing.assert_close(full, fd, rtol=1e-4, atol=1e-6)
    assert float((part - fd).abs().max()) > 1e-3 * float(fd.abs().max())


def test_command_line_schedule_file_and_its_checks(tmp_path, two_mixtures, capsys):
    path = tmp_path / "sched.json"
    learn_schedule_main(["--model", "toy:A", "--nfe", "4", "--iters", "10", "--train", "32", "--val", "16", "--out",
                         str(path)])  # fmt: skip
    assert "validation distance" in capsys.readouterr().out
    info = json.loads(path.read_text())
    for key in ld3.REQUIRED_KEYS:
        assert key in info
    assert info["nfe"] == 4 and info["solver"] == "dpm2m" and info["model"] == "A" and info["train_size"] == 32
    a, b = two_mixtures()
    out = compose.sample(a, num_samples=4, grid=str(path), method="ode", solver="dpm2m", divergence="exact")
    torch.testing.assert_close(out.timesteps, torch.tensor(info["grid"], dtype=torch.float64))
    with pytest.raises(ValueError, match="solver='dpm2m' \\(this call: 'euler'\\)"):
        compose.sample(a, num_samples=4, grid=str(path), method="ode", solver="euler", divergence="exact")
    with pytest.raises(ValueError, match="model='A' \\(this call: 'B'\\)"):
        compose.sample(b, num_samples=4, grid=str(path), method="ode", solver="dpm2m", divergence="exact")
    with pytest.raises(ValueError, match="operator"):
        compose.sample(compose.OR(a, b), num_samples=4, grid=str(path), method="ode", solver="dpm2m")
    with pytest.raises(ValueError, match="steps=6 does not match"):
        compose.sample(a, num_samples=4, steps=6, grid=str(path), method="ode", solver="dpm2m", divergence="exact")
    # a warm start from that file: OR(A, B) learned from A's grid; a file for another NFE or a non-file is refused
    warm = tmp_path / "or.json"
    argv = ["--model", "toy:A", "toy:B", "--operator", "or", "--iters", "3", "--train", "16", "--val", "8"]
    learn_schedule_main([*argv, "--nfe", "4", "--init", str(path), "--out", str(warm)])
    assert json.loads(warm.read_text())["init"] == str(path)
    with pytest.raises(ValueError, match="nfe=4 \\(this call: 6\\)"):
        learn_schedule_main([*argv, "--nfe", "6", "--init", str(path), "--out", str(warm)])
    with pytest.raises(SystemExit):
        learn_schedule_main([*argv, "--nfe", "4", "--init", "karas", "--out", str(warm)])
    assert "--init karas: not a named grid" in capsys.readouterr().err


def test_bad_schedule_files_are_refused(tmp_path):
    good = {k: "x" for k in ld3.REQUIRED_KEYS} | {"format": ld3.FORMAT, "grid": [1.0, 0.5, 0.0], "nfe": 2,
                                                   "guidance": 1.0, "train_size": 8}  # fmt: skip
    p = tmp_path / "s.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ld3.load_schedule(p)
    p.write_text(json.dumps(good | {"grid": [1.0, 0.001, 0.5]}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        ld3.load_schedule(p)
    p.write_text(json.dumps({"grid": [1.0, 0.5, 0.001]}))
    with pytest.raises(ValueError, match="lacks the keys"):
        ld3.load_schedule(p)
    p.write_text(json.dumps(good | {"nfe": 3}))
    with pytest.raises(ValueError, match="nfe=3 but the grid has 2 steps"):
        ld3.load_schedule(p)
    p.write_text(json.dumps(good | {"grid": [1.0, 0.5, 0.001]}))
    with pytest.raises(ValueError, match="must end at 0"):
        ld3.load_schedule(p)
    for key, bad, match in (("network_times", 5, "network_times must be a list"),
                            ("network_times", [0.9, float("nan")], "network_times must be finite times"),
                            ("network_times", [0.9, 1.5], "network_times must be finite times"),
                            ("guidance", None, "guidance must be a finite number"),
                            ("nfe", "2", "nfe must be a positive integer"),
                            ("format", "compose-schedule/9", "format='compose-schedule/9' is not known")):  # fmt: skip
        p.write_text(json.dumps(good | {key: bad}))
        with pytest.raises(ValueError, match=match):
            ld3.load_schedule(p)
    # format 1 (a grid to t_min, then one more evaluation for the final denoising) reads as its format-2 equivalent
    p.write_text(json.dumps(good | {"format": "compose-schedule/1", "grid": [1.0, 0.5, 0.001], "network_times": [1.0,
                                    0.45], "nfe": 2}))  # fmt: skip
    old = ld3.load_schedule(p)
    assert old["grid"] == [1.0, 0.5, 0.001, 0.0] and old["nfe"] == 3 and old["network_times"] == [1.0, 0.45, 0.001]
    with pytest.raises(ValueError, match="does not exist"):
        ld3.load_schedule(tmp_path / "missing.json")
    p.write_text(json.dumps(good))
    assert ld3.load_schedule(p, expect={"nfe": 2})["nfe"] == 2
    with pytest.raises(ValueError, match="nfe=2 \\(this call: 4\\)"):
        ld3.load_schedule(p, expect={"nfe": 4})


def test_nfe_too_small_for_the_solver_is_refused(two_mixtures):
    a, _ = two_mixtures()
    x = noises(a.schedule, 8, 3)
    with pytest.raises(ValueError, match="too small for solver='dpm2m'"):
        ld3.learn_schedule(a, 1, x, x, solver="dpm2m", progress=False)
    with pytest.raises(ValueError, match="solver="):
        ld3.learn_schedule(a, 4, x, x, solver="rk4", progress=False)


def test_hutchinson_probes_are_seeded_and_every_validation_sees_the_same_ones(two_mixtures):
    """ld3.solve draws its probes from `generator`; learn_schedule validates every grid with the probes of
    `probe_seed` (common random numbers), whatever the global RNG state."""
    a, b = two_mixtures()
    expr = compose.OR(a, b)
    sch = a.schedule
    x = noises(sch, 8, 0)
    grid = make_grid(sch, 6, "log_snr")

    def run(seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return ld3.solve(expr, x, grid, "dpm2m", divergence_kind="hutchinson", generator=gen)

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert float((run(3) - run(4)).abs().max()) > 1e-6  # the probes matter: the test can tell seeds apart
    teacher = ld3.solve(expr, x, make_grid(sch, 100, "log_snr"), "dpm2m")  # exact divergence for the targets

    def learn(global_seed):
        torch.manual_seed(global_seed)
        return ld3.learn_schedule(
            expr, 6, x, x, teacher=lambda z: teacher, divergence_kind="hutchinson", iters=0, probe_seed=5,
            progress=False,
        )  # fmt: skip

    first, second = learn(0), learn(1)
    assert first.info["val_distance_named"] == second.info["val_distance_named"]
    direct = float((run(5) - teacher).norm(dim=1).mean())
    assert first.info["val_distance_named"]["log_snr"] == pytest.approx(direct, rel=1e-12)


def test_warm_start_from_a_schedule_of_one_of_the_models(two_mixtures, tmp_path):
    """A schedule learned for model A starts OR(A, B)'s learning exactly where it was (grid and network times),
    and a grid whose ends are not the schedule's is refused."""
    a, b = two_mixtures()
    x = noises(a.schedule, 48, 4)
    first = ld3.learn_schedule(a, 4, x[:32], x[32:], iters=15, time_shift=True, progress=False, teacher_steps=100)
    ld3.save_schedule(tmp_path / "a4.json", first.info)
    info = dict(ld3.load_schedule(tmp_path / "a4.json"), path="a4.json")
    again = ld3.learn_schedule(a, 4, x[:32], x[32:], init=info, iters=0, time_shift=True, progress=False,
                               teacher_steps=100)  # fmt: skip
    assert again.val_loss_init == pytest.approx(first.val_loss, rel=1e-9)
    torch.testing.assert_close(again.network_times, first.network_times)
    assert again.info["init"] == "a4.json"
    expr = compose.OR(a, b)
    warm = ld3.learn_schedule(expr, 4, x[:32], x[32:], init=info, iters=10, time_shift=True, progress=False,
                              teacher_steps=100)  # fmt: skip
    assert warm.val_loss <= warm.val_loss_init
    bad = dict(info, grid=[0.9, 0.5, 0.2, 0.1, 1e-3])
    with pytest.raises(ValueError, match="init: the start grid must have"):
        ld3.learn_schedule(expr, 4, x[:32], x[32:], init=bad, iters=0, progress=False, teacher_steps=20)
    with pytest.raises(ValueError, match="nfe \\+ 1 = 7"):
        ld3.learn_schedule(expr, 6, x[:32], x[32:], init=info, iters=0, progress=False, teacher_steps=20)


def test_more_hutchinson_probes_bring_the_solve_to_the_exact_divergence(two_mixtures):
    """probes=K averages K Rademacher probes per step: the error against the exact-divergence solve falls like
    1 / sqrt(K) (the estimate's standard deviation), here by well over 2x from 1 to 16 probes."""
    a, b = two_mixtures()
    expr = compose.OR(a, b)
    x = noises(a.schedule, 64, 1)
    grid = make_grid(a.schedule, 8, "log_snr")
    exact = ld3.solve(expr, x, grid, "dpm2m", divergence_kind="exact")

    def err(k):
        runs = [
            ld3.solve(expr, x, grid, "dpm2m", divergence_kind="hutchinson", generator=torch.Generator().manual_seed(s),
                      probes=k)
            for s in range(4)
        ]  # fmt: skip
        return float(torch.stack([(r - exact).norm(dim=1).mean() for r in runs]).mean())

    one, sixteen = err(1), err(16)
    assert one > 1e-3 and sixteen < one / 2.5
    with pytest.raises(ValueError, match="probes=0 is out of range"):
        ld3.solve(expr, x, grid, "dpm2m", divergence_kind="hutchinson", probes=0)
    with pytest.raises(ValueError, match="teacher_probes must be an integer"):
        ld3.learn_schedule(expr, 4, x, x, iters=0, teacher_probes=1.5, progress=False)
    res = ld3.learn_schedule(
        expr, 4, x[:8], x[8:16], teacher_steps=20, divergence_kind="hutchinson", iters=0, probes=2, progress=False
    )
    assert res.info["probes"] == 2 and res.info["teacher_probes"] == 2
    # exact divergences (d <= 16 by default) use no probes: none recorded
    assert "probes" not in ld3.learn_schedule(expr, 4, x[:8], x[8:16], teacher_steps=20, iters=0, progress=False).info


def test_a_schedule_file_used_with_other_probes_warns(tmp_path, two_mixtures):
    """The file records its probes per step; a call with another count runs, with a warning that names both."""
    a, b = two_mixtures()
    expr = compose.OR(a, b)
    x = noises(a.schedule, 16, 8)
    res = ld3.learn_schedule(
        expr, 4, x[:8], x[8:], teacher_steps=20, divergence_kind="hutchinson", iters=0, probes=2, progress=False
    )
    path = tmp_path / "or.json"
    ld3.save_schedule(path, res.info)
    kw = dict(num_samples=2, grid=str(path), method="ode", solver="dpm2m", generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="probes=2 Hutchinson probes per step; this call uses probes=1"):
        compose.sample(expr, divergence="hutchinson", probes=1, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compose.sample(expr, divergence="hutchinson", probes=2, **kw)
        compose.sample(expr, divergence="exact", probes=1, **kw)  # no probes in this call


@pytest.mark.parametrize("op", ["OR", "AND"])
def test_unipc_solve_takes_the_path_of_compose_sample(two_mixtures, op):
    """ld3.solve (differentiable, learned grids) and compose.sample step UniPC the same way on a composed field:
    same states, with exact divergences; and its corrector makes it a different solver from dpm2m."""
    a, b = two_mixtures()
    expr = getattr(compose, op)(a, b)
    x = noises(a.schedule, 16, 6)
    ts = make_grid(a.schedule, 6, "ays_sdxl")
    ref = compose.sample(expr, x_T=x, timesteps=ts, method="ode", solver="unipc", divergence="exact")
    out = ld3.solve(expr, x, ts, "unipc", divergence_kind="exact")
    torch.testing.assert_close(out, ref.samples, rtol=0, atol=1e-10)
    assert float((out - ld3.solve(expr, x, ts, "dpm2m")).abs().max()) > 1e-3


def test_unipc_gradient_in_the_grid_matches_finite_differences():
    """The corrector's coefficients depend on three grid times: the gradient in ts is the true one."""
    sch = compose.NoiseSchedule.vp_linear()
    g = compose.toy.GaussianMixture([[1.0, -0.5], [-1.0, 1.0]], 0.5, schedule=sch)
    x = noises(sch, 8, 7)
    w = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = make_grid(sch, 5, "ays_sdxl").clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((ld3.solve(g, x, ts, "unipc") * w).sum(), ts)
    with torch.no_grad():
        for j in range(1, 5):
            e = torch.zeros_like(ts)
            e[j] = 1e-6
            fd = ((ld3.solve(g, x, ts + e, "unipc") - ld3.solve(g, x, ts - e, "unipc")) * w).sum() / 2e-6
            assert abs(float(grad[j]) - float(fd)) < 1e-4 * (1 + abs(float(fd))), (j, float(grad[j]), float(fd))


def test_a_schedule_transferred_to_a_composition_runs_there_unchanged(tmp_path, two_mixtures, capsys):
    """transfer_schedule: model A's file re-keyed for OR(A, B): compose.sample accepts it for OR and steps exactly the
    file's grid and network times (== ld3.solve with them), refuses it for AND; what was measured for A moves under
    transferred_from; another noise schedule and measurements that overwrite the schedule's keys are refused. The
    command line (--transfer) writes the same keys and names an NFE mismatch."""
    a, b = two_mixtures()
    x = noises(a.schedule, 48, 9)
    res = ld3.learn_schedule(a, 4, x[:32], x[32:], iters=6, time_shift=True, progress=False, teacher_steps=50)
    src = tmp_path / "a4.json"
    ld3.save_schedule(src, res.info)
    expr = compose.OR(a, b)
    info = ld3.transfer_schedule(src, expr, test_distance=0.5)
    assert info["model"] == "A,B" and info["operator"] == repr(expr) and info["test_distance"] == 0.5
    assert info["grid"] == res.info["grid"] and info["network_times"] == res.info["network_times"]
    assert info["transferred_from"]["model"] == "A" and info["transferred_from"]["file"] == "a4.json"
    assert info["transferred_from"]["val_distance"] == res.info["val_distance"] and "val_distance" not in info
    assert info["train_size"] == 32  # how the grid was learned stays
    dst = tmp_path / "or4.json"
    ld3.save_schedule(dst, info)
    xs = noises(a.schedule, 6, 10)
    out = compose.sample(expr, x_T=xs, grid=str(dst), method="ode", solver="dpm2m", divergence="exact")
    grid, net = (torch.tensor(res.info[k], dtype=torch.float64) for k in ("grid", "network_times"))
    torch.testing.assert_close(out.samples, ld3.solve(expr, xs, grid, "dpm2m", net, divergence_kind="exact"))
    with pytest.raises(ValueError, match="operator="):
        compose.sample(compose.AND(a, b), x_T=xs, grid=str(dst), method="ode", solver="dpm2m", divergence="exact")
    a_cos, b_cos = two_mixtures(schedule=compose.NoiseSchedule.cosine())
    with pytest.raises(ValueError, match="noise schedule"):
        ld3.transfer_schedule(src, compose.OR(a_cos, b_cos))
    with pytest.raises(ValueError, match="measured: \\['grid'\\]"):
        ld3.transfer_schedule(src, expr, grid=[1.0, 0.0])
    cli = tmp_path / "cli.json"
    learn_schedule_main(["--model", "toy:A", "toy:B", "--operator", "or", "--transfer", str(src), "--out", str(cli)])
    assert "wrote" in capsys.readouterr().out
    written = json.loads(cli.read_text())
    assert {k: written[k] for k in ld3.CHECKED_KEYS} == {k: info[k] for k in ld3.CHECKED_KEYS}
    assert written["command"].endswith(f"--transfer {src} --out {cli}")
    with pytest.raises(ValueError, match="nfe=4 \\(this call: 6\\)"):
        learn_schedule_main(["--model", "toy:A", "toy:B", "--operator", "or", "--transfer", str(src), "--nfe", "6",
                  "--out", str(cli)])  # fmt: skip
    with pytest.raises(SystemExit):
        learn_schedule_main(["--model", "toy:A", "--out", str(cli)])
    assert "--nfe is required" in capsys.readouterr().err


def test_the_operator_key_of_schedule_files_holds_what_changes_the_target(tmp_path, two_mixtures):
    """OR weights / temperature, AND bias and Product weights enter the key; settings that sample the same target
    (normalised OR weights, a constant AND bias, AND's clamp and rcond) do not. Checked against sampling: where the
    key is equal the samples are equal."""
    a, b = two_mixtures()
    key = lambda e: ld3.expression_keys(e)["operator"]  # noqa: E731
    assert key(compose.OR(a, b)) == "OR(A, B)" and key(compose.AND(a, b)) == "AND(A, B)"
    assert key(compose.OR(a, b, weights=[2, 2])) == "OR(A, B)"
    assert key(compose.OR(a, b, weights=[3, 1])) == "OR(A, B, weights=[0.75, 0.25])"
    assert key(compose.OR(a, b, temperature=2.0)) == "OR(A, B, temperature=2)"
    assert key(compose.AND(a, b, bias=[2.0, 2.0], clamp=(0.0, 1.0), rcond=1e-3)) == "AND(A, B)"
    assert key(compose.AND(a, b, bias=[1.0, 0.0])) == "AND(A, B, bias=[0.5, -0.5])"
    assert key(compose.Product(a, b, weights=[1.0, -0.5])) == "Product(A, B, weights=[1, -0.5])"
    assert key(compose.OR(compose.AND(a, b, bias=[0, 1]), a)) == "OR(AND(A, B, bias=[-0.5, 0.5]), A)"

    def run(e):
        return compose.sample(
            e,
            num_samples=8,
            steps=6,
            method="ode",
            solver="dpm2m",
            divergence="exact",
            generator=torch.Generator().manual_seed(3),
        ).samples

    torch.testing.assert_close(run(compose.AND(a, b, bias=[2.0, 2.0])), run(compose.AND(a, b)))
    torch.testing.assert_close(run(compose.OR(a, b, weights=[2, 2])), run(compose.OR(a, b)))
    assert float((run(compose.AND(a, b, bias=[1.0, 0.0])) - run(compose.AND(a, b))).abs().max()) > 1e-3

    # a file for AND(A, B) is refused for a biased AND, with the key named; the clamped AND takes it
    info = {k: "x" for k in ld3.REQUIRED_KEYS} | {"format": ld3.FORMAT, "grid": [1.0, 0.5, 0.0], "nfe": 2}
    p = tmp_path / "and.json"
    p.write_text(json.dumps(info | ld3.expression_keys(compose.AND(a, b))))
    ld3.load_schedule(p, expect=ld3.expression_keys(compose.AND(a, b, clamp=(0.0, 1.0))))
    with pytest.raises(ValueError, match=r"operator='AND\(A, B\)' \(this call: 'AND\(A, B, bias=\[0.5, -0.5\]\)'\)"):
        ld3.load_schedule(p, expect=ld3.expression_keys(compose.AND(a, b, bias=[1.0, 0.0])))


@pytest.mark.parametrize("solver", ["dpm2m", "unipc"])
def test_solver_offsets_gradient_matches_finite_differences(solver):
    """Learned solver coefficients: zero offsets are the solver itself (same states), the gradient in the offsets is
    the true one, and the entries the solver does not use get no gradient."""
    sch = compose.NoiseSchedule.vp_linear()
    g = compose.toy.GaussianMixture([[1.0, -0.5], [-1.0, 1.0]], 0.5, schedule=sch)
    x = noises(sch, 8, 7)
    ts = make_grid(sch, 4, "ays_sdxl")
    zero = torch.zeros(4, 3, dtype=torch.float64)
    torch.testing.assert_close(ld3.solve(g, x, ts, solver, solver_offsets=zero), ld3.solve(g, x, ts, solver))
    mask = ld3.solver_offset_mask(solver, 4)
    w = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    off = 0.3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * mask
    off.requires_grad_(True)
    (grad,) = torch.autograd.grad((ld3.solve(g, x, ts, solver, solver_offsets=off) * w).sum(), off)
    assert bool((grad[mask == 0] == 0).all()) and bool((grad[mask == 1] != 0).all())
    with torch.no_grad():
        for k, c in mask.nonzero().tolist():
            e = torch.zeros_like(off)
            e[k, c] = 1e-6
            up, down = (ld3.solve(g, x, ts, solver, solver_offsets=off + s * e) for s in (1, -1))
            fd = float(((up - down) * w).sum()) / 2e-6
            assert abs(float(grad[k, c]) - fd) < 1e-5 * (1 + abs(fd)), (k, c, float(grad[k, c]), fd)


def test_learned_solver_offsets_cut_the_distance_beyond_the_grid(two_mixtures):
    """Mixture A, UniPC at NFE 4: learning the solver's coefficients with the grid and network times ends much
    closer to the teacher on held-out noises than learning the times alone (same budget, same start)."""
    a, _ = two_mixtures()
    x = noises(a.schedule, 192, 11)
    kw = dict(solver="unipc", teacher_steps=200, init="best", time_shift=True, iters=60, lr=0.05, batch_size=32,
              progress=False)  # fmt: skip
    teacher = ld3.solve(a, x[128:], make_grid(a.schedule, 200, "log_snr"), "dpm2m")
    dist = {}
    for off in (False, True):
        res = ld3.learn_schedule(a, 4, x[:64], x[64:128], solver_offsets=off, **kw,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        out = ld3.solve(a, x[128:], res.grid, "unipc", res.network_times, solver_offsets=res.solver_offsets)
        dist[off] = float((out - teacher).norm(dim=1).mean())
        assert (res.solver_offsets is not None) == off and ("solver_offsets" in res.info) == off
    assert dist[True] < 0.5 * dist[False], dist


def test_schedule_file_with_solver_offsets_runs_as_learned_and_bad_offsets_are_refused(tmp_path, two_mixtures):
    """--solver-offsets writes them into the file; compose.sample with the file == ld3.solve with its grid, network
    times and offsets; a transfer keeps them; offsets of the wrong shape, in unused entries, not finite or for Euler
    are refused with the key named."""
    a, b = two_mixtures()
    path = tmp_path / "a.json"
    argv = ["--model", "toy:A", "--nfe", "4", "--solver", "unipc", "--iters", "6", "--train", "16", "--val", "8"]
    learn_schedule_main([*argv, "--time-shift", "--solver-offsets", "--out", str(path)])
    info = json.loads(path.read_text())
    off = torch.tensor(info["solver_offsets"], dtype=torch.float64)
    assert off.shape == (4, 3) and bool((off[ld3.solver_offset_mask("unipc", 4) == 1] != 0).any())
    x = noises(a.schedule, 8, 5)
    ref = ld3.solve(a, x, torch.tensor(info["grid"], dtype=torch.float64), "unipc",
                    torch.tensor(info["network_times"], dtype=torch.float64), solver_offsets=off)  # fmt: skip
    out = compose.sample(a, x_T=x, grid=str(path), method="ode", solver="unipc").samples
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    plain = ld3.solve(a, x, torch.tensor(info["grid"], dtype=torch.float64), "unipc",
                      torch.tensor(info["network_times"], dtype=torch.float64))  # fmt: skip
    assert float((out - plain).abs().max()) > 1e-4  # the offsets are used, not dropped
    moved = ld3.transfer_schedule(str(path), compose.OR(a, b))
    assert moved["solver_offsets"] == info["solver_offsets"]

    def refused(value, match, solver="unipc"):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(info | {"solver_offsets": value, "solver": solver}))
        with pytest.raises(ValueError, match=match):
            ld3.load_schedule(p)

    refused(info["solver_offsets"][:3], r"must have shape \(4, 3\)")
    refused([[1.0, 0, 0]] + info["solver_offsets"][1:], "entries the unipc solver does not use must be 0")
    refused([[0, 0, 0], [0.1, 0, 0.2], [0.1, 0.3, 0.2], [0.1, 0.2, 0.0]], "dpm2m columns 1-2", solver="dpm2m")
    refused([[0, 0, 0]] * 3 + [[float("nan"), 0, 0]], "must be finite")
    refused(info["solver_offsets"], "exist for 'dpm2m' and 'unipc', not solver='euler'", solver="euler")
    refused([["a", 0, 0]] * 4, "not a table of numbers")
    with pytest.raises(ValueError, match="solver_offsets=True needs solver 'dpm2m' or 'unipc'"):
        ld3.learn_schedule(a, 4, x, x, solver="euler", solver_offsets=True, progress=False)
