"""The Bayes-optimal predictor (oracle.py) against brute-force enumeration, the generator, and its CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy.stats import norm

import oracle
from dataset import load_series
from markov_circles_timeseries import CirclesConfig, generate, save, summary


def tiny_parameters(noise_std=1.5, D=3, seed=0):
    rng = np.random.default_rng(seed)
    C = 3
    planes = np.stack([np.linalg.qr(rng.standard_normal((D, 2)))[0].T for _ in range(C)])
    A = np.array([[0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]])
    return dict(planes=planes, radii=np.array([2.0, 2.5, 3.0]), entry_angles=np.array([0.3, 1.0, 2.0]),
                periods=np.array([2, 3, 3]), transition_matrix=A, noise_var=noise_std ** 2,
                dwell_mean=4.0, dwell_std=2.0)


def brute_force_points(p, X, observed, max_visits=12):
    """Posterior over (circle, phase) per step by enumerating every visit sequence that covers the
    window, started as the generator starts (a uniform circle, a fresh visit); independent of the
    chain expansion."""
    C, L = len(p["periods"]), len(X)
    offs = np.concatenate(([0], np.cumsum(p["periods"])))
    means = []
    for c in range(C):
        P = p["periods"][c]
        ang = p["entry_angles"][c] + 2 * np.pi * np.arange(P) / P
        means.append(p["radii"][c] * (np.cos(ang)[:, None] * p["planes"][c][0] + np.sin(ang)[:, None] * p["planes"][c][1]))

    def laps_prob(P, m, at_least=False):
        # P(max(1, rint(d / P)) = m) (or >= m), d ~ N(mean, std)
        cdf = lambda v: norm.cdf(v, p["dwell_mean"], p["dwell_std"])  # noqa: E731
        lo = -np.inf if m == 1 else (m - 0.5) * P
        return 1.0 - cdf(lo) if at_least else cdf((m + 0.5) * P) - cdf(lo)

    post = np.zeros((L, offs[-1]))

    def visit(t, c, weight, path):
        P = p["periods"][c]
        remaining = L - t
        for m in range(1, -(-remaining // P) + 1):
            last = m * P >= remaining  # this visit reaches past the window's end
            w = weight * laps_prob(P, m, at_least=last)
            steps = min(m * P, remaining)
            new = path + [(c, k % P) for k in range(steps)]
            if last:
                ll = sum(norm.logpdf(X[s], means[cc][k], np.sqrt(p["noise_var"])).sum()
                         for s, (cc, k) in enumerate(new) if observed[s])
                for s, (cc, k) in enumerate(new):
                    post[s, offs[cc] + k] += w * np.exp(ll)
                break
            for c2 in range(C):
                if p["transition_matrix"][c, c2] > 0:
                    visit(t + steps, c2, w * p["transition_matrix"][c, c2], new)

    for c in range(C):
        visit(0, c, 1.0 / C, [])
    return post / post.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def tiny():
    p = tiny_parameters()
    chain = oracle.Chain.from_parameters(**p)
    rng = np.random.default_rng(3)
    L = 9
    X = rng.normal(0, 2.0, (L, 3))
    return p, chain, X


def test_laps_law_matches_the_generators_draw():
    rng = np.random.default_rng(0)
    for P, mean, std in ((40, 400.0, 100.0), (400, 400.0, 100.0), (7, 20.0, 15.0)):
        draws = np.maximum(1, np.rint(rng.normal(mean, std, 400_000) / P)).astype(int)
        emp = np.bincount(draws, minlength=200)[1:]
        pmf = oracle.laps_pmf(P, mean, std)
        assert pmf.sum() == pytest.approx(1.0)
        assert np.abs(emp[:len(pmf)] / len(draws) - pmf).max() < 4e-3
        assert emp[len(pmf):].sum() == 0  # nothing the generator draws is cut off


def test_smoothing_equals_brute_force_enumeration(tiny):
    p, chain, X = tiny
    observed = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0], bool)
    want = brute_force_points(p, X, observed)
    # the lap-factorised pass and the expanded chain both equal the enumeration
    np.testing.assert_allclose(chain.smooth(X[None], observed[None], prior="start")[0], want, atol=1e-10)
    np.testing.assert_allclose(chain.smooth_expanded(X[None], observed[None], prior="start")[0], want, atol=1e-10)


@pytest.mark.parametrize("prior", ["stationary", "start"])
def test_lap_factorised_passes_equal_the_expanded_chain(prior):
    """At the generator's own scale (10 circles, periods 40..400, many laps), with masked patches."""
    cfg = CirclesConfig(n_steps=3000, seed=2)
    data = generate(cfg)
    chain = oracle.Chain.from_parameters(**{k: data[k] for k in oracle.GENERATOR_ARRAYS},
                                         noise_var=cfg.noise_std ** 2, dwell_mean=cfg.dwell_mean,
                                         dwell_std=cfg.dwell_std)
    starts = (0, 1200, 2600) if prior == "stationary" else (0, 0, 0)  # "start" is the law at step 0 only
    X = np.stack([data["X"][s0:s0 + 300] for s0 in starts]).astype(float)
    obs = np.ones((3, 300), bool)
    obs[0, 50:120] = obs[1, 250:] = obs[2, :40] = False
    fast = chain.smooth(X, obs, prior)
    assert np.isfinite(fast).all()
    np.testing.assert_allclose(fast, chain.smooth_expanded(X, obs, prior), atol=1e-9)
    fast, slow = {}, {}
    chain.filter(X, obs, prior, lambda t, pr, a: fast.__setitem__(t, (pr, a)))
    chain.filter_expanded(X, obs, prior, lambda t, pr, a: slow.__setitem__(t, (chain.to_points(pr),
                                                                                 chain.to_points(a))))
    for t in (0, 1, 60, 299):
        np.testing.assert_allclose(fast[t][0], slow[t][0], atol=1e-9)
        np.testing.assert_allclose(fast[t][1], slow[t][1], atol=1e-9)


def test_filtering_predictive_equals_brute_force(tiny):
    p, chain, X = tiny
    preds = oracle.next_step_predictions(chain, X[None], prior="start")[0]
    for t in (0, 1, 4, 8):
        seen = np.arange(len(X)) < t  # E[x_t | x_0..x_{t-1}]
        want = brute_force_points(p, X, seen)[t] @ chain.points
        np.testing.assert_allclose(preds[t], want, atol=1e-10)


def test_filtering_equals_smoothing_at_the_last_step(tiny):
    _, chain, X = tiny
    Xb = np.stack([X, X[::-1]])
    obs = np.ones((2, len(X)), bool)
    obs[1, 3] = False
    smooth = chain.smooth(Xb, obs)[:, -1]
    last = {}
    chain.filter(Xb, obs, on_step=lambda t, _p, a: last.__setitem__(t, a))
    np.testing.assert_allclose(last[len(X) - 1], smooth, atol=1e-12)


def test_retreat_is_the_transpose_of_advance(tiny):
    _, chain, _ = tiny
    rng = np.random.default_rng(1)
    a, b = rng.random((4, chain.n_states)), rng.random((4, chain.n_states))
    np.testing.assert_allclose((chain.advance(a) * b).sum(1), (a * chain.retreat(b)).sum(1))
    # advance preserves probability
    np.testing.assert_allclose(chain.advance(a).sum(1), a.sum(1))


def test_stationary_law_matches_a_long_generated_series():
    cfg = CirclesConfig(n_steps=1_000_000, n_circles=4, ambient_dim=4, period_min=5, period_max=30,
                        dwell_mean=60, dwell_std=20, seed=5)
    data = generate(cfg)
    p = {k: data[k] for k in oracle.GENERATOR_ARRAYS}
    chain = oracle.Chain.from_parameters(**p, noise_var=1.0, dwell_mean=60, dwell_std=20)
    share = np.bincount(data["states"], minlength=4) / cfg.n_steps
    pred = np.add.reduceat(chain.stationary, chain.offsets[:-1])
    np.testing.assert_allclose(pred, share, atol=0.015)
    # mean steps into the visit, per circle
    k_true = np.arange(cfg.n_steps) - np.repeat(data["visit_starts"], data["visit_dwells"])
    for c in range(4):
        sl = slice(chain.offsets[c], chain.offsets[c + 1])
        ks = np.arange(sl.stop - sl.start)
        want = k_true[data["states"] == c].mean()
        assert (chain.stationary[sl] * ks).sum() / chain.stationary[sl].sum() == pytest.approx(want, rel=0.06)


def write_data(path, **kw):
    cfg = CirclesConfig(**{"n_steps": 6000, "n_circles": 4, "ambient_dim": 6, "period_min": 8, "period_max": 40,
                           "dwell_mean": 120, "dwell_std": 30, **kw})
    data = generate(cfg)
    save(str(path), data, cfg, summary(data, cfg))
    return load_series(str(path))


def test_noise_free_data_is_decoded_exactly(tmp_path):
    series = write_data(tmp_path, noise_std=0.0)
    chain = oracle.Chain.from_series(series)
    X = series.X[None, 2000:2300].astype(np.float64)
    b = oracle.beliefs(chain, X, causal=False)
    np.testing.assert_array_equal(b["circle"][0].argmax(1), series.states[2000:2300])
    np.testing.assert_allclose(b["cos"][0], np.cos(series.thetas[2000:2300]), atol=1e-6)
    np.testing.assert_allclose(b["mean"][0], series.signal[2000:2300], atol=1e-4)
    f = oracle.beliefs(chain, X, causal=True)
    np.testing.assert_array_equal(f["circle"][0, 1:].argmax(1), series.states[2001:2300])


def test_oracle_scores_the_models_windows(tmp_path):
    from masked_model_gpu import datasets_for
    series = write_data(tmp_path)
    data = dict(seq_len=200, stride=100, val_frac=0.15, test_frac=0.15, seed=0, mask_ratio=0.2,
                mask_patch_size=8, mask_patch_min=None, mask_patch_max=None, data_dir=str(tmp_path))
    ds = datasets_for(series, data)
    ref, note = oracle.reference(series, ds, "masked", progress=False)
    assert note is None
    chain = oracle.Chain.from_series(series)
    X, signal, masks = oracle.window_arrays(ds["val"], series)
    # the same number by hand: posterior mean at the masked steps of each window
    pred = np.stack([chain.smooth(X[i:i + 1].astype(float), ~masks[i:i + 1])[0] @ chain.points
                     for i in range(len(X))])
    want = (((pred - X) ** 2).sum(-1) * masks).sum() / (masks.sum() * X.shape[-1])
    assert ref["val"]["oracle_mse"] == pytest.approx(want, rel=1e-9)
    # the oracle beats the naive predictors: the window's observed mean, and zero
    naive = np.where(masks[..., None], 0.0, X).sum(1, keepdims=True) / (~masks).sum(1)[:, None, None]
    assert ref["val"]["oracle_mse"] < oracle.mse_on(np.broadcast_to(naive, X.shape), X, masks)
    assert ref["val"]["oracle_signal_mse"] < 0.5 * oracle.mse_on(np.zeros_like(X), signal, masks)


def test_a_folder_without_generator_parameters_gives_one_line(tmp_path, capsys):
    d = tmp_path / "own"
    d.mkdir()
    np.savez(d / "data.npz", X=np.zeros((3000, 4), np.float32), states=np.zeros(3000, np.int64))
    series = load_series(str(d))
    with pytest.raises(oracle.OracleError, match="no generator parameters"):
        oracle.Chain.from_series(series)
    ref, note = oracle.reference(series, {}, "masked")
    assert ref is None and "no generator parameters" in note
    assert oracle.main(["--data-dir", str(d), "--seq-len", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no generator parameters" in err[0]


def test_cli_writes_json_and_refuses_to_overwrite(tmp_path, capsys):
    write_data(tmp_path / "d")
    out = tmp_path / "o" / "oracle.json"
    args = ["--data-dir", str(tmp_path / "d"), "--task", "next", "--seq-len", "200", "--eval-warmup", "50",
            "--out-dir", str(tmp_path / "o")]
    assert oracle.main(args) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "next" and res["val"]["oracle_mse"] > 0 and res["test"]["n_windows"] > 0
    assert oracle.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert oracle.main(args + ["--force"]) == 0
    assert os.path.exists(out)


def test_forecast_starts_with_the_one_step_predictive(tiny):
    _, chain, X = tiny
    f = oracle.forecast(chain, X[:6], 3)
    nxt = oracle.next_step_predictions(chain, X[None, :7])[0]
    np.testing.assert_allclose(f[0], nxt[6], atol=1e-12)
    # with no more observations the forecast is the propagated filter: two steps = advance twice
    last = {}
    chain.filter_expanded(X[None, :6], None, on_step=lambda t, _p, a: last.__setitem__("a", a))
    two = chain.to_points(chain.advance(chain.advance(last["a"]))) @ chain.points
    np.testing.assert_allclose(f[1], two[0], atol=1e-12)


def test_mean_rollout_feeds_back_the_predictive_mean(tiny):
    """Closed loop with the predictive mean: every output is the batch filter's one-step prediction of the
    seed followed by the outputs before it (recomputed independently); the first is the forecast's."""
    _, chain, X = tiny
    out = oracle.rollout(chain, X[:6], 5)
    np.testing.assert_allclose(out[0], oracle.forecast(chain, X[:6], 1)[0], atol=1e-12)
    nxt = oracle.next_step_predictions(chain, np.concatenate([X[:6], out])[None])[0]
    np.testing.assert_allclose(out, nxt[6:11], atol=1e-10)
    # with noise: the same, about the noisy outputs actually fed back
    noisy = oracle.rollout(chain, X[:6], 5, temperature=1.0, rng=np.random.default_rng(1))
    nxt = oracle.next_step_predictions(chain, np.concatenate([X[:6], noisy])[None])[0]
    np.testing.assert_allclose(noisy - nxt[6:11], np.random.default_rng(1).standard_normal((5, X.shape[1])),
                               atol=1e-10)
    np.testing.assert_allclose(noisy, oracle.rollout(chain, X[:6], 5, temperature=1.0, rng=np.random.default_rng(1)))


def test_sampling_rollout_continues_the_process(tmp_path):
    """Drawing a point from the predictive law and adding the data's noise is an exact sample of the
    process: its decoded dwell, transition, occupancy and speed statistics are those of the process."""
    series = write_data(tmp_path, n_steps=20_000)
    chain = oracle.Chain.from_series(series)
    cfg = series.config
    roll = oracle.rollout(chain, series.X[:500], 20_000, temperature=float(np.sqrt(chain.noise_var)),
                          sample_state=True, rng=np.random.default_rng(0))
    st = oracle.process_statistics(chain, roll, cfg["dwell_mean"], cfg["dwell_std"])
    assert st["dwell_ks"] < 0.15 and st["transition_tv"] < 0.25 and st["occupancy_tv"] < 0.2
    assert abs(st["angular_speed_ratio_median"] - 1) < 0.03


def test_process_statistics_separate_the_process_from_a_scrambled_copy(tmp_path):
    series = write_data(tmp_path, n_steps=40_000)
    chain = oracle.Chain.from_series(series)
    cfg = series.config
    true = oracle.process_statistics(chain, series.X[5000:35000], cfg["dwell_mean"], cfg["dwell_std"])
    assert true["dwell_ks"] < 0.15 and true["transition_tv"] < 0.2 and true["occupancy_tv"] < 0.15
    assert all(abs(v - 1) < 0.03 for v in true["angular_speed_ratio"].values())
    # the decoded visits are the generator's visits
    lab, length = oracle.runs(series.states[5000:35000])
    assert true["n_visits"] == len(lab)
    # the same points in shuffled time order: no dwell, transition or rotation structure survives
    rng = np.random.default_rng(0)
    fake = series.X[5000:35000][rng.permutation(30000)]
    bad = oracle.process_statistics(chain, fake, cfg["dwell_mean"], cfg["dwell_std"])
    assert bad["dwell_ks"] > 0.8 and bad["transition_tv"] > 2 * true["transition_tv"]
    assert bad["n_visits"] > 10 * true["n_visits"] and bad["angular_speed_ratio_median"] < 0.5


def test_runs_against_a_loop():
    labels = np.array([2, 2, 0, 0, 0, 1, 2, 2])
    lab, length = oracle.runs(labels)
    want = []
    for v in labels:
        if want and want[-1][0] == v:
            want[-1][1] += 1
        else:
            want.append([v, 1])
    assert [list(t) for t in zip(lab, length)] == want


def test_windows_that_do_not_fit_give_one_line(tmp_path, capsys):
    write_data(tmp_path / "d")
    assert oracle.main(["--data-dir", str(tmp_path / "d"), "--seq-len", "50000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-len" in err[0]
    assert oracle.main(["--data-dir", str(tmp_path / "d"), "--task", "next", "--seq-len", "100",
                        "--eval-warmup", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-warmup" in err[0]


def test_ratio_to_an_oracle_of_zero_error_is_not_reported():
    """A validation block inside one dwell lets the oracle pin the signal (error ~1e-17): the
    model's signal MSE over it would be a meaningless 1e17, so neither the log nor metrics.json
    gives a ratio there; a real oracle error gives the plain quotient."""
    from training import reference_metrics, signal_note
    assert signal_note(0.5, 0.1) == "signal MSE 0.5000 = 5.00x the oracle's 0.1000"
    assert "no ratio" in signal_note(24.7, 1.6e-14) and "x the oracle" not in signal_note(24.7, 1.6e-14)
    ref = {"oracle_mse": 8.0, "oracle_signal_mse": 1.6e-14}
    assert reference_metrics("val", {"signal_mse": 24.7}, ref)["val_signal_over_oracle"] is None
    ref["oracle_signal_mse"] = 0.2
    assert reference_metrics("val", {"signal_mse": 0.5}, ref)["val_signal_over_oracle"] == pytest.approx(2.5)
