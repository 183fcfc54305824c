"""modadd: generator invariants, schedules, parameter counts, the exact commutator on a
quadratic loss and its eta^2 scaling, r90 on planted trajectories, the random-subspace rho,
measurement that leaves training unchanged, and a tiny end-to-end run."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from modadd import geometry as G
from modadd.model import ModAddTransformer, ModelConfig, n_parameters
from modadd.task import TaskConfig, batch_for, label_of, m_schedule, sample
from modadd.runs import load_run, model_at
from modadd.train import PRESETS, main, resolve, build_parser, run


@pytest.mark.parametrize("value_distractors", [True, False])
@pytest.mark.parametrize("readout_token", [False, True])
def test_generator_invariants(value_distractors, readout_token):
    cfg = TaskConfig(T=16, C=8, value_distractors=value_distractors, readout_token=readout_token)
    gen = torch.Generator().manual_seed(0)
    m = torch.randint(1, cfg.max_markers() + 1, (3000,), generator=gen)
    tok, lab, pos, mm = sample(cfg, m, 3000, gen)
    assert torch.equal(lab, label_of(cfg, tok))                     # an independent reading
    assert torch.equal((tok == cfg.marker).sum(1), m)                 # markers only where placed
    valid = pos >= 0
    assert torch.all(pos[valid] + 1 <= cfg.T - 1 - int(readout_token))
    gaps = pos[:, 1:] - pos[:, :-1]
    assert torch.all(gaps[valid[:, 1:]] >= 2)                         # pairs never overlap
    after_marker = torch.zeros_like(tok, dtype=torch.bool)
    after_marker[:, 1:] = tok[:, :-1] == cfg.marker
    unmarked_values = ((tok < cfg.C) & ~after_marker).sum()
    assert (unmarked_values > 0) == value_distractors                 # values as distractors only when asked
    if readout_token:
        assert torch.all(tok[:, -1] == cfg.readout)
    assert len({tuple(r) for r in pos[m == 2].tolist()}) > 20         # positions drawn per example
    assert 0.10 < float((lab == 0).float().mean()) < 0.15              # labels uniform over C = 8
    with pytest.raises(ValueError):
        sample(cfg, cfg.max_markers() + 1, 4, gen)


def test_schedules():
    cur = m_schedule("curriculum", 1, 4, 400)
    assert [cur(s)[1] for s in (0, 99, 100, 250, 399)] == [1, 1, 2, 3, 4]
    gen = torch.Generator().manual_seed(1)
    cfg = TaskConfig()
    _, _, _, m = batch_for(cfg, m_schedule("mixed-batch", 1, 4, 10)(0), 64, gen)
    assert len(set(m.tolist())) == 1
    _, _, _, m = batch_for(cfg, m_schedule("mixed", 1, 4, 10)(0), 256, gen)
    assert set(m.tolist()) == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        m_schedule("random", 1, 4, 10)


def test_parameter_counts():
    for mlp in (False, True):
        cfg = ModelConfig(vocab_size=18, T=16, n_classes=8, mlp=mlp)
        model = ModAddTransformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == n_parameters(cfg)
        assert any("mlp" in n for n, _ in model.named_parameters()) == mlp
    assert TaskConfig().vocab_size == 17 and n_parameters(ModelConfig(17, 16, 8)) == 334_472


def quadratic(P=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.randn(P, P, generator=g, dtype=torch.float64) for _ in range(2))
    HA, HB = A @ A.T, B @ B.T
    ba, bb = (torch.randn(P, generator=g, dtype=torch.float64) for _ in range(2))
    th = torch.randn(P, generator=g, dtype=torch.float64)
    return HA, HB, ba, bb, th


def test_commutator_exact_on_quadratic():
    HA, HB, ba, bb, th = quadratic()

    def loss(ps, batch):
        H, b = batch
        return 0.5 * ps[0] @ H @ ps[0] + b @ ps[0]
    for eta in (1e-1, 1e-3):
        c = G.commutator(loss, [th], (HA, ba), (HB, bb), eta)
        ga, gb = HA @ th + ba, HB @ th + bb
        expect = eta ** 2 * (HB @ ga - HA @ gb)
        torch.testing.assert_close(c["delta"][0], expect, rtol=1e-9, atol=1e-15)
        assert c["D"] == pytest.approx(float(expect.norm() / (eta * ga.norm() * eta * gb.norm())), rel=1e-9)


def test_commutator_scales_as_eta_squared_on_a_network():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=18, T=8, n_classes=8, d_model=16, n_heads=2, n_layers=2)
    model = ModAddTransformer(cfg).double()
    from torch.func import functional_call
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    task = TaskConfig(T=8, C=8)
    gen = torch.Generator().manual_seed(2)
    a, b = sample(task, 2, 32, gen)[:2], sample(task, 2, 32, gen)[:2]

    def loss(ps, batch):
        return torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps)), (batch[0],)), batch[1])
    n1 = G.commutator(loss, params, a, b, 1e-3)["norm"]
    n2 = G.commutator(loss, params, a, b, 5e-4)["norm"]
    assert n1 / n2 == pytest.approx(4.0, rel=0.01)


def test_r90_on_planted_trajectories():
    rng = np.random.default_rng(0)
    P, n = 400, 60
    for k in (1, 2, 3):
        basis = np.linalg.qr(rng.standard_normal((P, k)))[0]
        t = np.linspace(0, 1, n)
        coeff = np.stack([np.cos(np.pi * (j + 1) * t) for j in range(k)], 1)   # equal variance, orthogonal
        traj = coeff @ basis.T + 1e-6 * rng.standard_normal((n, P))
        res = G.trajectory_pca(traj, rng, n_null=10)
        assert res["r90"] == k
        assert res["effective_rank"] == pytest.approx(k, rel=0.02)
    walk = G.random_walk_like(traj, rng)
    np.testing.assert_allclose(np.linalg.norm(np.diff(walk, axis=0), axis=1),
                               np.linalg.norm(np.diff(traj, axis=0), axis=1), rtol=1e-10)


def test_random_subspace_rho():
    rng = np.random.default_rng(0)
    P, K = 2000, 20
    vals = [G.rho(rng.standard_normal(P), G.random_basis(P, K, rng)) for _ in range(200)]
    assert np.mean(vals) == pytest.approx(np.sqrt(K / P), rel=0.1)
    basis = G.random_basis(P, K, rng)
    assert G.rho(basis @ rng.standard_normal(K), basis) == pytest.approx(1.0)


def small_cfg(**kw):
    args = build_parser().parse_args(["--preset", "code", "--steps", "40", "--d-model", "32", "--n-layers", "2",
                                      "--snapshot-every", "10", "--batch-size", "32", "--eval-size", "100"])
    cfg = resolve(args)
    cfg.update(kw)
    return cfg


def test_projection_baselines_on_planted_commutators():
    """Execution directions and commutators live in block 0 of two; block 1 moves at random
    and one of its coordinates never moves. In-span commutators have rho 1; random commutators in
    block 0 have rho^2 about k/P_live against the live-coordinate baseline and k/P_0 against
    the block-matched one (twice as large, as block 0 holds half the live coordinates)."""
    rng = np.random.default_rng(0)
    P0, k, n = 600, 3, 40
    blocks = [slice(0, P0), slice(P0, 2 * P0)]
    dirs = np.linalg.qr(rng.standard_normal((P0, k)))[0]
    traj = np.zeros((n, 2 * P0))
    traj[:, :P0] = np.cumsum(rng.standard_normal((n, k)) * [5, 3, 2], 0) @ dirs.T
    traj[:, P0:] = 1e-4 * np.cumsum(rng.standard_normal((n, P0)), 0)
    traj[:, P0 + 5] = 1.0                                              # a frozen coordinate
    live = G.live_mask(traj)
    assert live.sum() == 2 * P0 - 1 and not live[P0 + 5]
    d_in = np.zeros((5, 2 * P0))
    d_in[:, :P0] = rng.standard_normal((5, k)) @ dirs.T
    d_rand = np.zeros((300, 2 * P0))
    d_rand[:, :P0] = rng.standard_normal((300, P0))
    out_in = G.project_commutators(d_in, traj, blocks, k, rng)
    assert np.allclose(out_in["rho_exec"], 1, atol=1e-6) and np.allclose(out_in["perp_exec"], 0, atol=1e-3)
    out = G.project_commutators(d_rand, traj, blocks, k, rng)
    assert abs(np.mean(out["rho_random"] ** 2) / (k / live.sum()) - 1) < 0.15
    assert abs(np.mean(out["rho_block_matched"] ** 2) / (k / P0) - 1) < 0.15
    assert abs(np.mean(out["rho_exec"] ** 2) / (k / P0) - 1) < 0.2       # no alignment planted
    assert abs(np.mean(out["rho_random_blocks"] ** 2) / (2 * k / (2 * P0)) - 1) < 0.2
    B = G.random_live_basis(live, k, rng)
    assert np.allclose(B.T @ B, np.eye(k)) and np.all(B[P0 + 5] == 0)


def test_measurement_does_not_change_training():
    a = run(small_cfg(commutator_every=10), progress=False)
    b = run(small_cfg(commutator_every=0), progress=False)
    for (n, p), (_, q) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert torch.equal(p, q), n
    assert len(a["commutators"]) == 4 and not b["commutators"]
    assert "rho_exec" in a["commutators"][-1]
    assert 0 <= a["commutators"][-1]["rho_exec"] <= 1


def test_end_to_end(tmp_path):
    assert main(["--preset", "paper", "--steps", "30", "--d-model", "32", "--n-layers", "2", "--snapshot-every", "10",
                 "--eval-size", "64", "--out-dir", str(tmp_path), "--mlp", "--schedule", "curriculum"]) == 0
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["T"] == 32 and cfg["optimizer"] == "sgd" and cfg["batch_size"] == 64 and cfg["mlp"]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30] and "acc_m4" in rows[0] and "entropy_L1" in rows[0]
    snaps = np.load(tmp_path / "snapshots.npz")
    assert snaps["L0_W_Q"].shape == (4, 32, 32) and sum(k.startswith("L") for k in snaps.files) == 8
    assert snaps["steps"].tolist() == [0, 10, 20, 30]
    mid, step, _, _ = model_at(str(tmp_path), 2)                      # the whole network mid-training
    assert step == 20 and torch.equal(mid.blocks[1].attn.W_K.weight, torch.from_numpy(snaps["L1_W_K"][2]))
    final, _, _ = load_run(str(tmp_path))
    last = model_at(str(tmp_path), -1)[0]
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values()))
    assert not torch.equal(mid.tok.weight, final.tok.weight)
    comm = list(csv.DictReader(open(tmp_path / "commutators.csv")))
    assert len(comm) == 3 and 0 < float(comm[-1]["final_rho_exec"]) <= 1
    assert main(["--preset", "code", "--m-max", "9", "--steps", "5", "--out-dir", str(tmp_path / "bad")]) == 2
    before = (tmp_path / "metrics.csv").read_text()
    assert main(["--preset", "paper", "--steps", "10", "--out-dir", str(tmp_path)]) == 2     # an existing run
    assert (tmp_path / "metrics.csv").read_text() == before
    assert PRESETS["code"]["steps"] == 20_000


def test_trajectory_stage_on_planted_snapshots(tmp_path):
    """Two fake runs whose W_Q moves along 2 directions and W_K along a random walk."""
    from modadd.trajectory import main as trajectory
    rng = np.random.default_rng(3)
    for s in range(2):
        d = tmp_path / f"run{s}"
        d.mkdir()
        t = np.linspace(0, 1, 30)
        B = np.linalg.qr(rng.standard_normal((64, 2)))[0]
        q = (np.stack([np.cos(np.pi * t), np.cos(2 * np.pi * t)], 1) @ B.T).reshape(30, 8, 8)
        k = np.cumsum(rng.standard_normal((30, 64)), 0).reshape(30, 8, 8)
        np.savez(d / "snapshots.npz", L0_W_Q=q, L0_W_K=k)
    assert trajectory([str(tmp_path / "run0"), str(tmp_path / "run1"), "--out-dir", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "trajectory_pca.json"))
    assert res["summary"]["L0.W_Q"]["r90"]["mean"] == 2 and res["summary"]["L0.W_Q"]["r90"]["std"] == 0
    k = res["summary"]["L0.W_K"]
    assert abs(k["r90"]["mean"] - k["null_r90_mean"]["mean"]) <= 2          # a random walk looks like its null
    assert trajectory([str(tmp_path / "missing")]) == 2


def test_alignment_on_planted_subspaces(tmp_path):
    """W_Q of layers 0 and 1 moves inside one fixed 2-D subspace in both runs (same subspace
    across windows and seeds, k = 2); W_K of layer 0 lies in the same coordinates' orthogonal
    complement, W_K of layer 1 walks at random. Principal angles come out as planted."""
    from modadd.alignment import analyse, main as alignment, overlap, principal_cosines
    rng = np.random.default_rng(4)
    B = np.linalg.qr(rng.standard_normal((64, 4)))[0]
    n = 60
    for s in range(2):
        d = tmp_path / f"run{s}"
        d.mkdir()
        coef = np.cumsum(rng.standard_normal((n, 2)), 0) + 5 * np.stack([np.sin(np.linspace(0, 7, n)),
                                                                          np.cos(np.linspace(0, 5, n))], 1)
        q = (coef @ B[:, :2].T).reshape(n, 8, 8)
        k0 = (coef[:, ::-1] @ B[:, 2:].T).reshape(n, 8, 8)
        k1 = np.cumsum(rng.standard_normal((n, 64)), 0).reshape(n, 8, 8)
        np.savez(d / "snapshots.npz", L0_W_Q=q, L1_W_Q=q + 0.0, L0_W_K=k0, L1_W_K=k1)
    res = analyse([str(tmp_path / "run0"), str(tmp_path / "run1")], k=2, windows=3, n_null=2)
    for r in res["per_run"]:
        assert np.allclose(r["L0.W_Q"]["adjacent"], 1) and np.allclose(r["L0.W_Q"]["captured"], 1)
        assert np.mean(r["L1.W_K"]["adjacent"]) < 0.6
    assert np.allclose(res["layers"]["W_Q"]["overlap"], 1) and np.allclose(res["layers"]["W_K"]["overlap"], 0,
                                                                              atol=0.15)
    assert np.allclose(res["seeds"]["L0.W_Q"]["overlap"], 1) and np.allclose(res["seeds"]["L0.W_K"]["overlap"], 1)
    assert res["seeds"]["L1.W_K"]["overlap"][0] < 0.5
    assert res["summary"]["W_Q"]["null_adjacent"]["mean"] < 0.7
    U = np.linalg.qr(rng.standard_normal((50, 3)))[0]
    R = np.linalg.qr(U @ np.linalg.qr(rng.standard_normal((3, 3)))[0])[0]
    assert np.isclose(overlap(U, R), 1) and np.allclose(principal_cosines(U, R), 1)
    assert alignment([str(tmp_path / "run0"), str(tmp_path / "run1"), "--k", "2", "--no-plot"]) == 0
    assert alignment([str(tmp_path / "missing")]) == 2


def test_topk_attention():
    from modadd.model import set_topk
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=17, T=16, n_classes=8, d_model=32, n_heads=4, n_layers=2)
    model = ModAddTransformer(cfg).eval()
    x = sample(TaskConfig(), 2, 8, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        full = model(x)
        set_topk(model, 16)
        assert torch.equal(model(x), full)                           # k = T: the model itself
        set_topk(model, 1)
        keep = {}
        model(x, keep)
    from modadd.model import readout_entropy
    assert torch.all(readout_entropy(keep) < 1e-6)                    # one key per row: no entropy
    assert all(torch.all(a.max(-1).values == 1) for a in keep["attn"])


def test_bubbling_stage(tmp_path):
    from modadd.bubbling import main as bubbling
    assert main(["--steps", "20", "--d-model", "32", "--n-layers", "2", "--snapshot-every", "10",
                 "--eval-size", "64", "--commutator-every", "0", "--out-dir", str(tmp_path)]) == 0
    assert bubbling([str(tmp_path), "--n", "100"]) == 0
    res = json.load(open(tmp_path / "bubbling.json"))
    assert set(res["per_m"]) == {"1", "2", "3", "4"}
    r = res["per_m"]["2"]
    assert all(0 <= e <= res["uniform_entropy"] + 1e-6 for e in r["readout_entropy"])
    assert all(a <= b + 1e-9 for a, b in zip(r["top_mass"]["1"], r["top_mass"]["2"]))
    assert len(res["entropy_history"]["step"]) == 3
    assert bubbling([str(tmp_path / "nothing")]) == 2
    # retraining into the folder with --force removes the stage outputs of the replaced model
    assert (tmp_path / "bubbling.json").exists()
    assert main(["--steps", "20", "--d-model", "32", "--n-layers", "2", "--snapshot-every", "10",
                 "--eval-size", "64", "--commutator-every", "0", "--out-dir", str(tmp_path), "--force"]) == 0
    assert not (tmp_path / "bubbling.json").exists() and not (tmp_path / "bubbling.png").exists()


def test_topk_sae_recovers_a_planted_dictionary():
    """Vectors built from 2 of 24 unit atoms with positive weights: the TopK SAE (k = 2)
    keeps exactly k latents and finds the atoms among its decoder rows."""
    from modadd.sae import quality, train_sae
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 16, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(24, generator=g)[:2] for _ in range(6000)])
    X = (torch.rand(6000, 2, 1, generator=g) + 1) * atoms[idx]
    X = X.sum(1)
    sae = train_sae(X, "topk", n_latents=48, k=2, l1=0, steps=2500, batch=512, lr=3e-3)
    q = quality(sae, X)
    with torch.no_grad():
        z = sae.encode(X)
    assert torch.all((z > 0).sum(1) <= 2) and q["fvu"] < 0.1
    cos = (atoms @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert float((cos > 0.9).float().mean()) >= 0.8


def test_sae_substitution_path():
    """An exact SAE (z = [relu(x), relu(-x)], x_hat = z W_dec) leaves the logits unchanged;
    zeroing latents in the residual after layer 1 changes them, with or without the error."""
    from modadd.sae import SAE, substituted_logits
    torch.manual_seed(0)
    model = ModAddTransformer(ModelConfig(17, 16, 8, d_model=16, n_heads=2, n_layers=3)).eval()
    sae = SAE(16, 32, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(16), -torch.eye(16)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(16), -torch.eye(16)], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = sample(TaskConfig(), 2, 64, torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(substituted_logits(model, sae, 1, x, None, False), ref, atol=1e-5)
    assert torch.allclose(substituted_logits(model, sae, 1, x, [], True), ref, atol=1e-5)
    for keep in (False, True):
        ab = substituted_logits(model, sae, 1, x, [0, 1, 2, 16, 17], keep)
        assert (ab - ref).abs().max() > 1e-3
    # with an exact SAE, zeroing latents is the same whether or not the error is kept
    assert torch.allclose(substituted_logits(model, sae, 1, x, [3, 20], False),
                          substituted_logits(model, sae, 1, x, [3, 20], True), atol=1e-5)


def test_sae_correlations_and_variables():
    from modadd.sae import correlations, task_variables
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((500, 6))
    Z[:, 5] = 0
    v = Z[:, 2] + 0.5 * rng.standard_normal(500)
    r = correlations(Z, v)
    assert np.allclose(r[:5], [np.corrcoef(Z[:, i], v)[0, 1] for i in range(5)]) and r[5] == 0
    cfg = TaskConfig()
    tok, _, pos, m = sample(cfg, 3, 20, torch.Generator().manual_seed(2))
    var = task_variables(tok, m, cfg)
    assert torch.equal(var["marker"].sum(1), torch.full((20,), 3.0))
    assert torch.equal(var["marked_value"].nonzero()[:, 1].reshape(20, 3), pos + 1)
    assert torch.all(var["m"] == 3)


def test_sae_stage_end_to_end(tmp_path):
    from modadd.sae import main as sae
    run_dir = str(tmp_path / "run")
    assert main(["--steps", "40", "--d-model", "32", "--n-layers", "3", "--snapshot-every", "10", "--eval-size", "64",
                 "--out-dir", run_dir]) == 0
    args = [run_dir, "--sae-steps", "30", "--n-train", "64", "--n-eval", "64", "--n-random", "3", "--n-latents", "64",
            "--at", "0.5,1", "--no-plot"]
    assert sae(args) == 0
    res = json.load(open(tmp_path / "run" / "sae.json"))
    assert [s["step"] for s in res["snapshots"]] == [20, 40] and res["layer"] == 1
    r = res["snapshots"][1]["kinds"]["topk"]
    assert len(r["chosen"]) == 8 and set(r["per_m"]) == {"1", "2", "3", "4"}
    assert 0 <= r["per_m"]["2"]["reconstruction"] <= 1 and "random_error_kept_std" in r["drop"]
    assert sae([run_dir, "--layer", "3"]) == 2 and sae([run_dir, "--at", "2"]) == 2


def test_curriculum_stage_ends_follow_the_schedule():
    from modadd.forgetting import stage_ends
    for steps, lo, hi in ((400, 1, 4), (10, 1, 3), (1001, 2, 4)):
        rule = m_schedule("curriculum", lo, hi, steps)
        m_at = [rule(s - 1)[1] for s in range(1, steps + 1)]            # the m trained at each 1-based step
        ends = stage_ends({"m_min": lo, "m_max": hi, "steps": steps})
        assert ends == {m: max(s for s in range(1, steps + 1) if m_at[s - 1] == m) for m in range(lo, hi + 1)}


def test_forgetting_on_planted_curves(tmp_path):
    """m = 1 peaks at 0.9 at the end of its stage and decays to 0.5; m = 2 learns late."""
    from modadd.forgetting import main as forgetting
    steps = np.arange(0, 401, 50)
    for s, drop in enumerate((0.4, 0.3)):
        d = tmp_path / f"cur{s}"
        d.mkdir()
        json.dump({"schedule": "curriculum", "steps": 400, "m_min": 1, "m_max": 2}, open(d / "config.json", "w"))
        a1 = np.where(steps <= 200, 0.9 * steps / 200, 0.9 - drop * (steps - 200) / 200)
        a2 = np.where(steps <= 200, 0.1, 0.1 + 0.8 * (steps - 200) / 200)
        with open(d / "metrics.csv", "w") as f:
            f.write("step,acc_m1,acc_m2\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(steps, a1, a2)))
    assert forgetting([str(tmp_path / "cur0"), str(tmp_path / "cur1"), "--out-dir", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "forgetting.json"))
    s1 = res["summary"]["1"]
    assert np.isclose(s1["forgetting"]["mean"], 0.35) and np.isclose(s1["at_stage_end"]["mean"], 0.9)
    assert np.isclose(s1["forgetting"]["std"], np.std([0.4, 0.3], ddof=1))
    assert res["per_run"][0]["per_m"]["1"]["stage_end_step"] == 200
    assert np.isclose(res["summary"]["2"]["forgetting"]["mean"], 0)
    assert forgetting([str(tmp_path / "missing")]) == 2
    json.dump({"schedule": "mixed", "steps": 400, "m_min": 1, "m_max": 2}, open(tmp_path / "cur1" / "config.json", "w"))
    assert forgetting([str(tmp_path / "cur1")]) == 2


def test_seeds_trained_together_follow_their_separate_runs(tmp_path):
    """Two seeds stacked into one vmapped network end where two separate runs end (same
    batches, same initialisations; elementwise AdamW), with the same records."""
    from modadd.ensemble import run_many
    cfgs = [small_cfg(seed=s, commutator_every=20) for s in (0, 3)]
    together = run_many(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    for cfg, t in zip(cfgs, together):
        alone = run(cfg, progress=False)
        for (n, p), (_, q) in zip(alone["model"].state_dict().items(), t["model"].state_dict().items()):
            assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), n
        for ra, rt in zip(alone["metrics"], t["metrics"]):
            assert ra["step"] == rt["step"] and abs(ra["acc_m2"] - rt["acc_m2"]) <= 0.02
            assert np.isclose(ra["train_loss"], rt["train_loss"], rtol=1e-4, equal_nan=True)
        assert np.allclose([c["D"] for c in alone["commutators"]], [c["D"] for c in t["commutators"]], rtol=1e-3)
        assert np.allclose(alone["snapshots"]["L1.W_V"], t["snapshots"]["L1.W_V"], atol=2e-5)
    assert not torch.allclose(together[0]["model"].tok.weight, together[1]["model"].tok.weight)
    assert (tmp_path / "b" / "snapshots.npz").exists()
    with pytest.raises(ValueError):
        run_many([small_cfg(seed=0), small_cfg(seed=1, lr=1e-2)], progress=False)


def test_gram_pca_matches_the_svd():
    """The Gram-matrix route to the trajectory's principal directions and variance shares
    agrees with a thin SVD of the centred snapshots."""
    rng = np.random.default_rng(5)
    traj = np.cumsum(rng.standard_normal((30, 400)) * np.linspace(3, 0.1, 400), 0).astype(np.float32)
    X = traj.astype(np.float64) - traj.astype(np.float64).mean(0)
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    assert np.allclose(G.variance_shares(traj), s ** 2 / (s ** 2).sum(), atol=1e-10)
    U = G.execution_basis(traj, 4)
    assert np.allclose(U.T @ U, np.eye(4), atol=1e-10)
    assert np.allclose(U @ U.T, Vt[:4].T @ Vt[:4], atol=1e-8)


def test_sweep_and_report(tmp_path):
    """Two seeds trained together, the joint stages, a curriculum sweep, and the report:
    its figures, verdicts and commutator statistics recomputed from the CSVs."""
    from modadd.report import main as report
    from modadd.sweep import main as sweep, parse_seeds
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    tiny = ["--steps", "60", "--d-model", "32", "--n-layers", "3", "--snapshot-every", "10", "--eval-size", "64"]
    root, cur = str(tmp_path / "code"), str(tmp_path / "cur")
    assert sweep(["--seeds", "0-1", "--together", "2", "--root", root, "--stages", "bubbling,trajectory,alignment",
                  "--no-plot", "--", *tiny]) == 0
    assert sweep(["--seeds", "0-1", "--root", root, "--stages", "nope"]) == 2
    assert sweep(["--seeds", "0-1", "--root", root, "--", "--seed", "3"]) == 2
    assert sweep(["--seeds", "0", "--together", "1", "--root", cur, "--stages", "none", "--", *tiny,
                  "--schedule", "curriculum"]) == 0
    out, figs = tmp_path / "report", tmp_path / "figures"
    assert report([root, "--curriculum", cur, "--out-dir", str(out), "--plots-dir", str(figs)]) == 0
    rep = json.load(open(out / "report.json"))
    assert sorted(n for n in os.listdir(figs) if not n.startswith(".")) == [f"{f}.png" for f in ("fig1_intrinsic_dim", "fig2_entropy_bubbling",
                                                             "fig3_commutator_raw", "fig4_comm_ratio",
                                                             "fig5_comm_decomposition", "forgetting")]
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["report.json", "report.md"]
    medians = [np.median([float(r["D"]) for r in csv.DictReader(open(tmp_path / "code" / f"s{s}" / "commutators.csv"))])
               for s in (0, 1)]
    assert np.isclose(rep["commutators"]["summary"]["D"]["mean"], np.mean(medians))
    from scipy import stats     # over seeds: the Student-t interval of sweep.py's aggregation
    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(medians), scale=stats.sem(medians))
    assert np.allclose([rep["commutators"]["summary"]["D"]["lo"], rep["commutators"]["summary"]["D"]["hi"]], [lo, hi])
    findings = {v["finding"] for v in rep["verdicts"]}
    assert {"attention trajectories collapse to 2-3 dimensions", "strict curriculum forgets small m",
            "commutators are negligible inside the execution subspace"} <= findings
    assert "| finding" in (out / "report.md").read_text()
    assert report([str(tmp_path / "missing")]) == 2
