"""Field modulator: exact regular template, Cayley-Menger against an independent volume,
a k = 1 expert that carries signal, the validity head in use, the null space untouched,
clamped alphas, the parameter count, the CV monitor against its Gaussian value, training."""
import math

import numpy as np
import pytest
import torch

from terrain import field as FD
from terrain import metrics as M


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_regular_template(k):
    V = FD.regular_simplex(k, 8).double()
    d = torch.cdist(V, V)[np.triu_indices(k + 1, 1)]
    torch.testing.assert_close(d, torch.ones_like(d), rtol=0, atol=1e-6)
    torch.testing.assert_close(V.mean(0), torch.zeros(8, dtype=V.dtype), rtol=0, atol=1e-7)
    _, vol2 = FD.cayley_menger(V)
    assert math.sqrt(float(vol2)) == pytest.approx(FD.regular_simplex_volume(k), rel=1e-5)
    with pytest.raises(ValueError):
        FD.regular_simplex(k, k - 1)


def test_cayley_menger_matches_gram_volume():
    rng = np.random.default_rng(0)
    P = rng.standard_normal((50, 5, 9))
    d2, vol2 = FD.cayley_menger(torch.tensor(P))
    np.testing.assert_allclose(np.sqrt(vol2.numpy()), M.gram_volume(P), rtol=1e-7)
    np.testing.assert_allclose(d2.numpy()[:, 0], np.sum((P[:, 0] - P[:, 1]) ** 2, 1), rtol=1e-10)


def test_edge_expert_is_not_constant():
    torch.manual_seed(0)
    e = FD.SimplexExpert(1, in_dim=16, gate_dim=16)
    f = e.features(torch.randn(200, 16))
    assert f.shape == (200, 1) and float(f.detach().std()) > 0.1
    # for an edge, squared volume and squared length coincide: a LayerNorm over the pair is constant
    V = torch.randn(10, 2, 8)
    d2, vol2 = FD.cayley_menger(V)
    torch.testing.assert_close(d2[:, 0], vol2, rtol=1e-5, atol=1e-6)


def modulator(**kw):
    torch.manual_seed(1)
    return FD.FieldModulator(d_model=32, n_layers=2, **kw)


def test_null_space_untouched_and_gating():
    m = modulator(alpha=0.3, null_fraction=0.25)
    assert int((~m.active).sum()) == 8
    h = torch.randn(3, 5, 32)
    out = m.transform(h, 1)
    assert torch.equal(out[..., ~m.active], h[..., ~m.active])
    assert not torch.allclose(out[..., m.active], h[..., m.active])


def test_validity_head_scales_the_gates():
    m = modulator(alpha=0.3)
    h = torch.randn(2, 4, 32)
    with torch.no_grad():
        for e in m.experts:
            e.validity.weight.zero_()
            e.validity.bias.fill_(-1e4)                    # validity 0: no expert acts
    assert torch.equal(m.transform(h, 0), h)
    with torch.no_grad():
        for e in m.experts:
            e.validity.bias.fill_(1e4)                     # validity 1: gates at full alpha
    total, val = m.gates(h, 0)
    expect = torch.ones_like(total)
    for e, a in zip(m.experts, m.alpha[0]):
        g, _ = e(h[..., m.active])
        expect = expect * ((1 - a) + a * g)
    torch.testing.assert_close(total, expect)
    assert all(torch.all(v == 1) for v in val)


def test_alpha_clamped():
    m = modulator()
    with torch.no_grad():
        m.alpha_logit[0].fill_(50.0)
        m.alpha_logit[1].fill_(-50.0)
    assert torch.all(m.alpha[0] == 0.35) and torch.all(m.alpha[1] == 0.001)


def test_parameter_count_for_the_seed_configuration():
    d, n_layers, edim = 512, 6, 8
    act = d - int(d * 0.25)
    expected = n_layers * 3
    for k in (1, 2, 4):
        nf = k * (k + 1) // 2 + (1 if k >= 2 else 0)
        expected += act * (k + 1) * edim + (k + 1) * edim + nf * act + act + nf + 1
    assert FD.parameter_count(d, n_layers) == expected == 38133     # the original version: 38,552


def test_cv_health_on_gaussian_data():
    X = np.random.default_rng(2).standard_normal((3000, 24))
    h = FD.cv_health(X, n_simplices=4000)
    assert h["ci"][0] <= h["gaussian_cv"] <= h["ci"][1]
    assert h["gaussian_cv"] == pytest.approx(M.gaussian_volume_cv(4, 24))


def test_training_the_field_modulator():
    from terrain import modulate as MD
    res = MD.train(None, layers=[1, 4], epochs=1, n_train=32, batch_size=16, lr=1e-2, alpha=0.1,
                   n_anchors=100, n_eval=40, progress=False, kind="field")
    assert res["modulator"] == "field" and res["model_unchanged"]
    assert np.asarray(res["epochs"][0]["alpha"]).shape == (2, 3)
    assert res["n_parameters"] == FD.parameter_count(384, 2)
    assert res["cv_health"]["gaussian_cv"] == pytest.approx(M.gaussian_volume_cv(4, 384))


def test_grad_scale_groups_move_each_part_at_its_rate():
    """Adam's first step moves every parameter with a nonzero gradient by about its group's lr:
    the deformation and validity heads by S x lr, the alphas by lr / 2, the gates by lr; every
    parameter is in exactly one group."""
    from terrain import modulate as MD
    torch.manual_seed(0)
    mod = FD.FieldModulator(16, 2, alpha=0.2)
    groups = MD.field_param_groups(mod, lr=1e-2, grad_scale=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(mod.parameters()))
    before = {id(p): p.detach().clone() for p in mod.parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    h = torch.randn(4, 5, 16)
    (mod.transform(h, 0).square().sum() + mod.transform(h, 1).sum()).backward()
    opt.step()
    want = {"geometric": 1e-3, "alpha": 5e-3, "gates": 1e-2}
    for g in groups:
        moved = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in g["params"]])
        grads = torch.cat([p.grad.abs().flatten() for p in g["params"]])
        big = moved[grads > 1e-6]
        assert len(big) > 0
        np.testing.assert_allclose(big.numpy(), want[g["name"]], rtol=0.05)


def test_cv_monitor_stops_after_patience_checks_out_of_band():
    """Planted: the monitor set is Gaussian, whose CV is known; a band that excludes it stops
    after exactly `patience` checks, a band around it never stops."""
    from types import SimpleNamespace

    from terrain import modulate as MD
    X = np.random.default_rng(0).standard_normal((300, 24))
    c = SimpleNamespace(items=[{"definition": str(i)} for i in range(300)], anchors=np.arange(300),
                        encode=lambda texts: X[[int(t) for t in texts]])
    g = M.gaussian_volume_cv(4, 24)
    out = {"band": [g + 0.2, g + 0.3], "patience": 3, "n_monitor": 300, "checks": [], "stopped_at_step": None}
    assert [MD.cv_drifted(c, out, s) for s in (10, 20, 30)] == [False, False, True]
    assert out["stopped_at_step"] == 30 and not any(k["in_band"] for k in out["checks"])
    inside = {**out, "band": [g - 0.1, g + 0.1], "checks": [], "stopped_at_step": None}
    assert not any(MD.cv_drifted(c, inside, s) for s in range(1, 8))
    assert all(k["in_band"] for k in inside["checks"])


def test_training_stops_early_and_with_the_safeguards():
    from terrain import modulate as MD
    res = MD.train(None, layers=[1, 4], epochs=2, n_train=64, batch_size=16, lr=1e-2, alpha=0.1,
                   n_anchors=100, n_eval=40, progress=False, kind="field", grad_scale=0.1,
                   early_stop={"band": (0.0, 0.01), "patience": 2, "every": 1, "n_monitor": 50})
    es = res["early_stop"]
    assert es["stopped_at_step"] == 2 and res["steps"] == 2 and len(es["checks"]) == 2
    assert len(res["epochs"]) == 1 and res["epochs"][0]["steps"] == 2     # stopped inside the first epoch
    assert res["grad_scale"] == 0.1 and res["model_unchanged"]
    assert es["unmodulated_cv"] > 0.01                                    # the band excluded it from the start


@pytest.mark.parametrize("argv, message", [
    (["--train", "--grad-scale", "0.1"], "--modulator field"),
    (["--grad-scale", "0.1", "--modulator", "field"], "go with --train"),
    (["--train", "--early-stop-band", "0.3", "0.2"], "LO must be below HI"),
    (["--train", "--early-stop-band", "0.1", "0.2", "--early-stop-drift", "0.05"], "not both"),
    (["--train", "--modulator", "field", "--early-stop-drift", "0.05", "--cv-monitor", "500", "--anchors", "100"],
     "exceeds --anchors"),
    (["--train", "--early-stop-drift", "0.05"], "--modulator field"),
    (["--top-p", "0.5"], "go with --talk"),
])
def test_safeguard_flags_refuse_bad_combinations(argv, message, capsys):
    from terrain.modulate import main
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
