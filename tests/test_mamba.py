"""The selective scan and the Mamba next-step model, against independent implementations."""
import json

import numpy as np
import pytest
import torch

from mamba_next import (MambaConfig, MambaNext, Perturbation, generate, generate_recompute, horizons_up_to, main,
                        multi_horizon_loss, nearest_circle)
from selective_scan import MambaBlock, selective_scan


def naive_scan(u, delta, A, B, C, D, z):
    """The recurrence written step by step (autograd through plain tensor ops)."""
    b, d, T = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D[None, :, None]) * torch.nn.functional.silu(z), h


def scan_inputs(dtype, b=2, d=6, n=4, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    u, B, C, D, z = mk(b, d, T), mk(b, n, T), mk(b, n, T), mk(d), mk(b, d, T)
    delta = (torch.rand(b, d, T, generator=g, dtype=dtype) * 0.5).requires_grad_()
    A = (-torch.rand(d, n, generator=g, dtype=dtype) * 3).requires_grad_()
    return u, delta, A, B, C, D, z


def test_scan_equals_naive_recurrence_forward_and_gradients():
    inputs = scan_inputs(torch.float32)
    y, last = selective_scan(*inputs, return_last_state=True)
    y0, last0 = naive_scan(*inputs)
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, last0, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum() + last.sum(), inputs)
    g0 = torch.autograd.grad((y0 * w).sum() + last0.sum(), inputs)
    for a, b in zip(g, g0):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4


def test_scan_gradcheck_float64():
    inputs = scan_inputs(torch.float64, b=1, d=3, n=2, T=12)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, return_last_state=True), inputs)


def hf_mixer(block: MambaBlock):
    from transformers import MambaConfig as HFConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    cfg = HFConfig(hidden_size=block.d_model, state_size=block.d_state, conv_kernel=block.d_conv,
                   expand=block.d_inner // block.d_model, time_step_rank=block.dt_rank, use_conv_bias=True,
                   use_bias=False)
    mixer = MambaMixer(cfg, layer_idx=0).eval()
    mixer.load_state_dict(block.state_dict(), strict=True)  # same names and shapes
    return mixer


def test_block_equals_transformers_mamba_mixer():
    torch.manual_seed(0)
    block = MambaBlock(32, 8, 4, 2)
    ref = hf_mixer(block)
    x = torch.randn(2, 60, 32, requires_grad=True)
    a, b = block(x), ref(x)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    ours, theirs = dict(block.named_parameters()), dict(ref.named_parameters())
    ga = torch.autograd.grad(a.square().sum(), [x] + list(ours.values()))
    gb = torch.autograd.grad(b.square().sum(), [x] + [theirs[k] for k in ours])
    for name, p, q in zip(["input", *ours], ga, gb):
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-4, name


def test_mamba_ssm_parameter_layout_and_init():
    block = MambaBlock(128, 32, 4, 2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {"in_proj.weight": (512, 128), "conv1d.weight": (256, 1, 4), "conv1d.bias": (256,),
                      "x_proj.weight": (8 + 64, 256), "dt_proj.weight": (256, 8), "dt_proj.bias": (256,),
                      "A_log": (256, 32), "D": (256,), "out_proj.weight": (128, 256)}
    # A = 1..N per channel; softplus(dt bias) starts inside [dt_min, dt_max]
    torch.testing.assert_close(torch.exp(block.A_log[0]), torch.arange(1, 33, dtype=torch.float32))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001


def test_parameter_count_of_the_original_model():
    m = MambaNext(MambaConfig(d_model=128, n_layers=7, d_state=32, d_conv=4, expand=2, d_ff=512))
    per_block = 128 * 512 + 256 * 4 + 256 + 256 * 72 + 8 * 256 + 256 + 256 * 32 + 256 + 256 * 128 + 2 * 128
    expected = 7 * per_block + (20 * 128 + 128) + 2 * 128 + (128 * 512 + 512 + 512 * 20 + 20)
    assert sum(p.numel() for p in m.parameters()) == expected == 982_420


def test_recurrent_step_equals_parallel_forward():
    torch.manual_seed(1)
    m = MambaNext(MambaConfig(d_model=32, n_layers=3, d_state=8, dropout=0.0)).eval()
    x = torch.randn(2, 50, 20)
    full = m(x)
    pred, states = m.prefill(x[:, :7])
    outs = [pred]
    for t in range(7, 49):
        outs.append(m.step(x[:, t], states))
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 6:49], rtol=1e-4, atol=1e-5)


def test_generation_matches_recomputation_and_perturbations_persist():
    torch.manual_seed(2)
    m = MambaNext(MambaConfig(d_model=32, n_layers=2, d_state=8, dropout=0.0)).eval()
    seed = torch.randn(16, 20)
    fast = generate(m, seed, 30)
    slow = generate_recompute(m, seed, 30)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)
    # a single burst in the hidden state changes everything after it, not before it
    burst = Perturbation("hidden", (0, 1), interval=1000, duration=1, scale=5.0)
    pert = generate(m, seed, 30, perturb=burst, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(pert[0], fast[0], rtol=1e-5)
    assert np.abs(pert[1:] - fast[1:]).max(axis=1).min() > 1e-4


def test_horizons_and_multi_horizon_loss():
    assert horizons_up_to(1) == [1]
    assert horizons_up_to(16) == [1, 2, 4, 8, 16]
    assert horizons_up_to(10) == [1, 2, 4, 8, 10]
    x = torch.arange(10.0).view(1, 10, 1)
    # a head that predicts x[t] + h is exact for this ramp at every horizon
    preds = [x + h for h in (1, 3)]
    assert multi_horizon_loss(preds, x, [1, 3]).item() == 0.0
    preds = [x + 1, x + 3 + 2]  # second head off by 2 where it is scored
    assert multi_horizon_loss(preds, x, [1, 3]).item() == pytest.approx((0 + 4) / 2)


def test_nearest_circle_decoding():
    rng = np.random.default_rng(0)
    planes = np.stack([np.linalg.qr(rng.standard_normal((20, 2)))[0].T for _ in range(4)])
    radii = np.array([10.0, 15.0, 20.0, 25.0])
    t = rng.uniform(0, 2 * np.pi, 200)
    c = rng.integers(0, 4, 200)
    pts = radii[c, None] * (np.cos(t)[:, None] * planes[c, 0] + np.sin(t)[:, None] * planes[c, 1])
    assert np.mean(nearest_circle(pts + 0.3 * rng.standard_normal(pts.shape), planes, radii) == c) > 0.98


TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "2",
        "--d-state", "4", "--d-ff", "32", "--warmup-epochs", "0.5", "--lr", "3e-3"]


def test_gate_lr_factor_zero_freezes_exactly(small_data_dir, tmp_path, capsys):
    import torch as T
    assert main(["train", "--data-dir", small_data_dir, "--out-dir", str(tmp_path / "g0"), "--epochs", "2",
                 "--gate-lr-factor", "0", "--freeze-A", *TINY]) == 0
    assert "frozen" in capsys.readouterr().out
    ck = T.load(tmp_path / "g0" / "last.pt", weights_only=True)
    from training import seed_everything
    seed_everything(0)
    init = MambaNext(MambaConfig(**ck["model_config"])).state_dict()  # the same seed gives the same init
    for k, v in ck["model"].items():
        frozen = any(s in k for s in ("x_proj", "dt_proj")) or k.endswith(("A_log", ".D"))
        if frozen:
            assert T.equal(v, init[k]), k
        elif k.endswith("in_proj.weight"):
            assert not T.equal(v, init[k])


def test_train_generate_gates_end_to_end(small_data_dir, tmp_path, plots_below_tmp, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", small_data_dir, "--out-dir", str(run), "--epochs", "2",
                 "--max-horizon", "4", *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val_mse_by_horizon"]) == {"1", "2", "4"}
    assert metrics["noise_floor"] == pytest.approx(2.83 ** 2)
    assert metrics["val_oracle_mse"] <= metrics["val_mse"]
    assert metrics["val_oracle_signal_mse"] < metrics["val_signal_mse"] == pytest.approx(
        metrics["val_signal_mse_by_horizon"]["1"])
    assert (plots_below_tmp / tmp_path.name / "run" / "mamba_prediction_0.png").exists()  # plots/<last two names>
    assert not list(run.glob("**/*.png"))
    assert main(["generate", "--checkpoint", str(run / "best.pt"), "--gen-len", "40", "--seed-len", "16",
                 "--perturb-hidden", "--perturb-interval", "10", "--perturb-duration", "2"]) == 0
    gen = np.load(run / "generate" / "gen_hidden.npy")
    assert gen.shape == (40, 20) and np.isfinite(gen).all()
    rep = json.loads((run / "generate" / "gen_hidden.json").read_text())
    assert "mse_first_16" in rep and "decoded_matches_true_circle" in rep
    assert rep["oracle_mse_to_signal_first_16"] < rep["mse_to_signal_first_16"]
    assert set(rep["process"]) == {"generated", "true_continuation", "process_draw", "oracle_rollout"}
    # a draw of the process itself is the reference a generation's statistics are read against, and the exact
    # predictor generating the same way (its mean fed back) shows what the scheme allows
    assert rep["process"]["process_draw"]["n_steps"] == rep["process"]["generated"]["n_steps"] == 40
    assert rep["process"]["oracle_rollout"]["n_steps"] == 40
    capsys.readouterr()
    assert main(["eval", str(run / "best.pt"), "--eval-mask-seed", "3", "--no-plot"]) == 2   # nothing masked to re-mask
    assert "without masks" in capsys.readouterr().err
    assert main(["gates", "--checkpoint", str(run / "best.pt"), "--samples", "3", "--plot-samples", "1"]) == 0
    summary = json.loads((run / "gates" / "gates_summary.json").read_text())
    assert len(summary["mean_delta"]) == 2 and all(d > 0 for d in summary["mean_delta"])
    # the original code's gate flags: one layer of one held-out window
    best = str(run / "best.pt")
    assert main(["gates", "--checkpoint", best, "--layer", "2", "--sample", "1", "--samples", "3",
                 "--out-dir", str(tmp_path / "g2")]) == 0
    drawn = sorted(p.name for p in (plots_below_tmp / tmp_path.name / "g2").glob("gates_sample_*.png"))
    assert drawn == ["gates_sample_1_layer2.png"]
    assert main(["gates", "--checkpoint", best, "--layer", "3", "--out-dir", str(tmp_path / "g3")]) == 2
    assert "layers 1..2" in capsys.readouterr().err
    # continuing the series itself: nothing to compare with, everything generated is kept
    assert main(["generate", "--checkpoint", best, "--gen-len", "30", "--seed-len", "16", "--from-end",
                 "--out-dir", str(tmp_path / "fe")]) == 0
    rep = json.loads((tmp_path / "fe" / "gen.json").read_text())
    assert rep["steps_with_truth"] == 0 and "mse_first_1" not in rep and "true_continuation" not in rep["process"]
    assert np.load(tmp_path / "fe" / "gen.npy").shape == (30, 20)
    # a generation that runs past the end is scored on the steps that exist
    T = 20000
    assert main(["generate", "--checkpoint", best, "--gen-len", "40", "--seed-len", "16", "--start", str(T - 16 - 10),
                 "--out-dir", str(tmp_path / "pe")]) == 0
    rep = json.loads((tmp_path / "pe" / "gen.json").read_text())
    assert rep["steps_with_truth"] == 10 and "mse_first_8" in rep and "mse_first_16" not in rep
    # earlier outputs are replaced only with --force; with it the old sample figures go too
    capsys.readouterr()
    gen_args = ["generate", "--checkpoint", str(run / "best.pt"), "--gen-len", "20", "--seed-len", "16"]
    assert main(gen_args) == 0 and main(gen_args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(gen_args + ["--force"]) == 0
    assert main(["gates", "--checkpoint", str(run / "best.pt"), "--samples", "2", "--plot-samples", "1"]) == 2
    assert json.loads((run / "gates" / "gates_summary.json").read_text()) == summary
    gdir = plots_below_tmp / "run" / "gates"
    assert main(["gates", "--checkpoint", str(run / "best.pt"), "--sample", "3", "--force"]) == 0
    assert (gdir / "gates_sample_3.png").exists()
    (gdir / "gates_sample_7.png").write_bytes(b"the user's own file, same pattern")
    assert main(["gates", "--checkpoint", str(run / "best.pt"), "--samples", "2", "--plot-samples", "1",
                 "--force"]) == 0
    # --force removes the figures the command drew before (and will not draw again), never the user's
    assert not (gdir / "gates_sample_3.png").exists()
    assert (gdir / "gates_sample_7.png").read_bytes() == b"the user's own file, same pattern"
    capsys.readouterr()
    assert main(["train", "--eval", str(run / "best.pt"), "--data-dir", small_data_dir]) == 0
    assert "test MSE" in capsys.readouterr().out
    # the evaluator reads the model type from the checkpoint
    from evaluate_representations import main as evaluate
    assert evaluate(["--checkpoint", str(run / "best.pt"), "--no-umap", "--lb-points", "500",
                     "--metric-points", "1200", "--out-dir", str(tmp_path / "rep"),
                     "--plots-dir", str(tmp_path / "rep")]) == 0
    res = json.loads((tmp_path / "rep" / "representation_metrics.json").read_text())
    assert res["causal"] is True and list(res["layers"]) == ["input", "1", "2", "output"]


def test_bad_input(small_data_dir, tmp_path, capsys):
    for flag, value in (("--gate-lr-factor", "-1"), ("--max-horizon", "0")):  # refused while parsing
        with pytest.raises(SystemExit) as e:
            main(["train", "--data-dir", small_data_dir, "--out-dir", str(tmp_path / "a"), flag, value, *TINY])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    from masked_model_gpu import main as masked
    assert masked(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "m"), "--epochs", "1", "--seq-len", "64",
                   "--stride", "64", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "16",
                   "--mask-patch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "m" / "best.pt")]) == 2
    assert "masked_transformer" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_kernel_matches_the_pure_scan():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from selective_scan import cuda_kernels_available
    if not cuda_kernels_available():
        pytest.skip("mamba_ssm is not installed")
    torch.manual_seed(0)
    block = MambaBlock(64, 16, 4, 2).cuda()
    x = torch.randn(2, 256, 64, device="cuda")
    fast = block(x)
    slow = block(x, trace={})  # a trace forces the pure-PyTorch scan
    assert ((fast - slow).abs().max() / slow.abs().max()).item() < 1e-3


def test_resume_and_eval_score_with_the_runs_own_warmup(small_data_dir, tmp_path, capsys):
    """A run stopped and resumed with only --resume (so the parser's --seq-len default differs
    from the run's) logs the same validation MSEs as the uninterrupted run, and --eval of its
    best checkpoint reproduces them (they were 0.0000 when the warm-up came from the parser)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data-dir", small_data_dir, "--epochs", "3", "--no-train-eval", *TINY]
    assert main(["train", "--out-dir", str(a), *common]) == 0
    assert main(["train", "--out-dir", str(b), "--stop-after", "2", *common]) == 0
    assert main(["train", "--resume", str(b / "last.pt")]) == 0
    col = lambda run: [float(r.split(",")[5]) for r in (run / "training_log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert min(col(b)) > 1.0  # an MSE of 0.0000 scored nothing
    assert col(b) == pytest.approx(col(a), rel=1e-6)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert mb["test_mse"] == pytest.approx(ma["test_mse"], rel=1e-6) and mb["best_epoch"] == ma["best_epoch"]
    capsys.readouterr()
    assert main(["train", "--eval", str(b / "best.pt"), "--out-dir", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert ev["val_mse"] == pytest.approx(mb["val_mse"], rel=1e-5) and ev["val_mse"] > 1.0


def test_each_model_spec_names_its_own_loss_and_training_windows(small_data_dir):
    """training.py assumes no masks: the Mamba spec's loss curve speaks of next-step MSE and its
    training-evaluation windows carry no mask; the masked model's are fixed, drawn from a stream of
    their own (not the training masks of the same windows)."""
    import dataset
    import masked_model_gpu
    from mamba_next import make_spec
    nxt, msk = make_spec(), masked_model_gpu.spec()
    assert not any("mask" in label for label in nxt.loss_labels) and "next-step" in nxt.loss_labels[2]
    assert all("mask" in label for label in msk.loss_labels)
    series = dataset.load_series(small_data_dir)
    common = {"data_dir": small_data_dir, "seq_len": 64, "stride": 32, "val_frac": 0.1, "test_frac": 0.1, "seed": 0}
    w = nxt.train_eval_windows(nxt.datasets(series, {**common, "eval_warmup": 16}))
    assert len(w) > 0 and not any(w.mask(i).any() for i in range(len(w)))
    ds = msk.datasets(series, {**common, "mask_ratio": 0.15, "mask_patch_size": 8, "mask_patch_min": None,
                               "mask_patch_max": None})
    w = msk.train_eval_windows(ds)
    tr = ds["train"]
    first = {int(s): i for i, s in enumerate(tr.starts)}
    same = [(w.mask(i), dataset.WindowDataset(tr.X, tr.states, tr.starts, tr.seq_len, tr.mask_cfg, tr.mask_seed,
                                              fixed=True).mask(first[int(s)])) for i, s in enumerate(w.starts)]
    assert all(a.any() and np.array_equal(a, w.mask(i)) for i, (a, _) in enumerate(same))   # fixed, non-empty
    assert sum(not np.array_equal(a, b) for a, b in same) > len(same) // 2                  # its own stream
