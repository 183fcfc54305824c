"""The masked-patch transformer: against independent implementations, and its training CLI."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from masked_model_gpu import (POS_ENCODINGS, EncoderLayer, MaskedTransformer, ModelConfig, apply_rope,
                              count_parameters, main, masked_mse, rope_cos_sin, sinusoidal_table,
                              t5_relative_bucket)
from training import TrainingError


def expected_parameters(n_layers, d, d_ff, in_dim=20):
    attn = 3 * d * d + 3 * d + d * d + d
    ffn = d * d_ff + d_ff + d_ff * d + d
    norms = 4 * d
    return n_layers * (attn + ffn + norms) + in_dim + (in_dim * d + d) + (d * d_ff + d_ff + d_ff * in_dim + in_dim)


def test_parameter_count_of_the_original_model():
    m = MaskedTransformer(ModelConfig(n_layers=7, d_model=128, n_heads=4, d_ff=512))
    assert count_parameters(m) == expected_parameters(7, 128, 512) == 1_466_920
    t5 = MaskedTransformer(ModelConfig(n_layers=7, pos_encoding="t5", t5_num_buckets=64))
    assert count_parameters(t5) == 1_466_920 + 64 * 4  # one bias table shared by all layers


@pytest.mark.parametrize("nb,md", [(32, 128), (64, 1024), (16, 40), (8, 16), (128, 4096)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_transformers(nb, md, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-5000, 5000)[None, :] - torch.arange(0, 3)[:, None]
    ours = t5_relative_bucket(rel, nb, md, bidirectional=bidirectional)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    assert torch.equal(ours, theirs)


def naive_attention(layer, x, bias=None, rope=None):
    """softmax(Q K^T / sqrt(d) + bias) V written out, per head."""
    B, S, D = x.shape
    H = layer.n_heads
    q, k, v = layer.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if bias is not None:
        logits = logits + bias
    a = torch.softmax(logits, -1) @ v
    return layer.out(a.transpose(1, 2).reshape(B, S, D))


def test_attention_with_broadcast_t5_bias_equals_naive():
    torch.manual_seed(0)
    m = MaskedTransformer(ModelConfig(d_model=32, n_heads=4, n_layers=1, d_ff=64, dropout=0.0,
                                      pos_encoding="t5", t5_num_buckets=16, t5_max_distance=32)).eval()
    nn.init.normal_(m.rel_bias.weight, std=2.0)
    bias = m.position_bias(50, "cpu")
    assert bias.shape == (1, 4, 50, 50)  # broadcast over the batch, never expanded
    x = torch.randn(3, 50, 32)
    layer = m.layers[0]
    torch.testing.assert_close(layer.attention(x, bias, None), naive_attention(layer, x, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_equals_torch_encoder_layer(norm_first):
    torch.manual_seed(1)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.0, norm_first=norm_first)
    ours = EncoderLayer(cfg).eval()
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_first).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.out.weight)
        ref.self_attn.out_proj.bias.copy_(ours.out.bias)
        for a, b in ((ref.linear1, ours.ff1), (ref.linear2, ours.ff2), (ref.norm1, ours.norm1), (ref.norm2, ours.norm2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation_and_is_relative():
    torch.manual_seed(2)
    S, Dh, base = 30, 16, 10000.0
    cos, sin = rope_cos_sin(S, Dh, base, "cpu")
    x = torch.randn(S, Dh)
    ours = apply_rope(x, cos, sin)
    # independent: pair (i, i + Dh/2) as a complex number, turned by pos * base^(-2i/Dh)
    z = torch.complex(x[:, :Dh // 2], x[:, Dh // 2:])
    theta = torch.arange(S)[:, None] * base ** (-torch.arange(0, Dh, 2) / Dh)[None, :]
    zr = z * torch.polar(torch.ones_like(theta), theta)
    torch.testing.assert_close(ours, torch.cat([zr.real, zr.imag], -1), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(Dh), torch.randn(Dh)
    qr = apply_rope(q.expand(S, Dh), cos, sin)
    kr = apply_rope(k.expand(S, Dh), cos, sin)
    # <R_i q, R_j k> depends on j - i only
    torch.testing.assert_close(qr[3] @ kr[10], qr[13] @ kr[20], rtol=1e-4, atol=1e-4)


def test_sinusoidal_table_formula():
    pe = sinusoidal_table(100, 16, "cpu")
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5)


@pytest.mark.parametrize("pe", POS_ENCODINGS)
def test_masked_inputs_are_invisible_and_longer_windows_evaluate(pe):
    torch.manual_seed(3)
    m = MaskedTransformer(ModelConfig(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, pos_encoding=pe,
                                      t5_num_buckets=16, t5_max_distance=32)).eval()
    x = torch.randn(2, 64, 20)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 10:30] = True
    y = x.clone()
    y[mask] = 100.0  # whatever sits under the mask must not matter
    torch.testing.assert_close(m(x, mask), m(y, mask))
    assert not torch.allclose(m(x), m(y))
    out, hidden = m(torch.randn(1, 300, 20), return_hidden=True)  # longer than any training window
    assert out.shape == (1, 300, 20) and len(hidden) == len(m.layer_names) == 4
    assert m.layer_names == ["input", "1", "2", "output"]
    torch.testing.assert_close(hidden[-1], out)


def test_masked_mse_counts_masked_steps_only():
    x = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[True, False, True, False]])
    sse, n = masked_mse(pred, x, mask)
    assert (sse / n).item() == pytest.approx((1 + 1 + 9 + 9) / 4)


TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--d-ff", "32", "--warmup-epochs", "0.5", "--lr", "3e-3", "--mask-patch-size", "4"]


def test_training_resume_and_eval(small_data_dir, tmp_path, plots_below_tmp, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(a), "--epochs", "3", "--pos-encoding", "t5",
                 *TINY]) == 0
    log = (a / "training_log.csv").read_text().splitlines()
    assert len(log) == 4 and "noise_floor" in log[0]
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["noise_floor"] == pytest.approx(2.83 ** 2)
    # the Bayes-optimal predictor on the same windows and masks is not beaten by a 3-epoch model,
    # against the data or against the noise-free signal; the ratio is the model's over the oracle's
    for split in ("val", "test"):
        assert metrics[f"{split}_oracle_mse"] <= metrics[f"{split}_mse"]
        assert metrics[f"{split}_oracle_signal_mse"] < metrics[f"{split}_signal_mse"]
        assert metrics[f"{split}_signal_over_oracle"] == pytest.approx(
            metrics[f"{split}_signal_mse"] / metrics[f"{split}_oracle_signal_mse"])
    # a model's signal MSE and data MSE differ by the noise on the scored steps (E = noise var)
    assert abs(metrics["val_mse"] - metrics["val_signal_mse"] - 2.83 ** 2) < 1.5
    assert "oracle on the val windows" in capsys.readouterr().out
    for f in ("best.pt", "last.pt"):
        assert (a / f).exists()
    for f in ("training_loss.png", "bert_prediction_0.png"):  # figures in plots/<run folder name>
        assert (plots_below_tmp / tmp_path.name / a.name / f).exists()
    ckpt = torch.load(a / "last.pt", weights_only=True)
    for key in ("model_config", "data", "data_config", "optimizer", "scheduler", "rng", "epoch"):
        assert key in ckpt
    # stopped after two epochs, then resumed: the same numbers as the uninterrupted run
    assert main(["--data-dir", small_data_dir, "--out-dir", str(b), "--epochs", "3", "--pos-encoding", "t5",
                 "--stop-after", "2", *TINY]) == 0
    assert len((b / "training_log.csv").read_text().splitlines()) == 3
    assert main(["--resume", str(b / "last.pt")]) == 0
    rows_a = (a / "training_log.csv").read_text().splitlines()
    rows_b = (b / "training_log.csv").read_text().splitlines()
    val = lambda r: [float(x.split(",")[5]) for x in r[1:]]  # noqa: E731
    assert val(rows_a) == pytest.approx(val(rows_b), rel=1e-6)
    capsys.readouterr()
    ev, figs = tmp_path / "ev", tmp_path / "ev_figures"
    assert main(["--eval", str(a / "best.pt"), "--data-dir", small_data_dir, "--out-dir", str(ev),
                 "--plots-dir", str(figs)]) == 0
    out = capsys.readouterr().out
    assert "test MSE" in out and "noise floor" in out
    assert json.loads((ev / "eval_metrics.json").read_text())["val_mse"] == pytest.approx(metrics["val_mse"], rel=1e-5)
    assert [f for f in os.listdir(ev) if not f.startswith(".")] == ["eval_metrics.json"]
    assert all(f.endswith(".png") for f in os.listdir(figs) if not f.startswith("."))
    # a second evaluation into the same folder refuses, nothing lost; --force replaces
    assert main(["--eval", str(a / "best.pt"), "--data-dir", small_data_dir, "--out-dir", str(ev), "--no-plot"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--eval", str(a / "best.pt"), "--data-dir", small_data_dir, "--out-dir", str(ev), "--no-plot",
                 "--force"]) == 0
    # scored on another seed's held-out masks: exactly the masks (and so the oracle) of a run of that seed
    s5 = tmp_path / "s5"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(s5), "--epochs", "1", "--pos-encoding", "t5",
                 "--seed", "5", "--no-plot", *TINY]) == 0
    assert main(["--eval", str(a / "best.pt"), "--data-dir", small_data_dir, "--out-dir", str(tmp_path / "ev5"),
                 "--no-plot", "--eval-mask-seed", "5"]) == 0
    e5 = json.loads((tmp_path / "ev5" / "eval_metrics.json").read_text())
    m5 = json.loads((s5 / "metrics.json").read_text())
    assert e5["mask_seed"] == 5 and e5["val_oracle_mse"] == pytest.approx(m5["val_oracle_mse"], rel=1e-9)
    assert e5["val_oracle_mse"] != pytest.approx(metrics["val_oracle_mse"], rel=1e-6)
    capsys.readouterr()
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "x"), "--eval-mask-seed", "5", *TINY]) == 2
    assert "goes with --eval" in capsys.readouterr().err


def test_training_reduces_the_loss(small_data_dir, tmp_path):
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path), "--epochs", "6", *TINY,
                 "--pos-encoding", "rope", "--d-model", "32", "--no-train-eval"]) == 0
    rows = (tmp_path / "training_log.csv").read_text().splitlines()[1:]
    vals = [float(r.split(",")[5]) for r in rows]
    assert vals[-1] < 0.8 * vals[0]


def test_bad_input_gives_one_clear_error(small_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    before = (run / "best.pt").read_bytes()
    # the run folder is not overwritten silently
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), "--epochs", "1", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == before
    # data of another feature dimension
    from markov_circles_timeseries import main as gen
    other = tmp_path / "d12"
    gen(["--n-steps", "6000", "--ambient-dim", "12", "--out-dir", str(other), "--no-plot"])
    assert main(["--eval", str(run / "best.pt"), "--data-dir", str(other)]) == 2
    assert "12-D" in capsys.readouterr().err
    # a checkpoint of another model
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["model_type"] = "mamba_next"
    torch.save(ck, tmp_path / "other.pt")
    assert main(["--eval", str(tmp_path / "other.pt")]) == 2
    assert "mamba_next" in capsys.readouterr().err
    # resuming with another positional scheme
    assert main(["--resume", str(run / "last.pt"), "--pos-encoding", "rope"]) == 2
    assert "pos-encoding" in capsys.readouterr().err
    # impossible shapes and windows
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "x"), "--d-model", "30", "--n-heads", "4"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "y"), "--seq-len", "30000"]) == 2
    assert "longer than the series" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "z" / "last.pt")


def test_nan_loss_stops_with_a_message(tmp_path):
    from training import CSVLog, FitState, fit, warmup_cosine
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Data(list):
        def set_epoch(self, e):
            pass

    data = Data([torch.zeros(1)])
    with pytest.raises(TrainingError, match="became nan"):
        fit(model=model, train_model=model, optimizer=opt, scheduler=warmup_cosine(opt, 0, 1), train_set=data,
            train_loader=data, batch_loss=lambda m, b: torch.tensor(float("nan")), evaluate=lambda m: 0.0,
            epochs=1, out_dir=str(tmp_path), checkpoint_payload=lambda s: {}, state=FitState(), noise_floor=8.0,
            log=CSVLog(str(tmp_path / "log.csv"), ["epoch"]))
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.gpu
def test_gpu_bf16_and_compile_paths(small_data_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path), "--epochs", "2", *TINY,
                 "--device", "cuda", "--pos-encoding", "t5"]) == 0


def test_resume_uses_or_refuses_every_flag_it_is_given(small_data_dir, tmp_path, capsys):
    """A flag written on the command line of a resumed run is either applied (--epochs, ...) or,
    when it differs from the checkpoint's, refused with one line, even when it equals the
    parser's default (which the run did not use)."""
    run = tmp_path / "run"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), "--epochs", "3", "--stop-after", "1",
                 *TINY]) == 0
    capsys.readouterr()
    for flags in (["--lr", "0.5"], ["--data-dir", str(tmp_path / "other")], ["--d-model", "128"],
                  ["--pos-encoding", "sinusoidal", "--d-model", "128"], ["--out-dir", str(tmp_path / "x")]):
        assert main(["--resume", str(run / "last.pt"), *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "differs from the checkpoint's" in err[0], (flags, err)
    assert len((run / "training_log.csv").read_text().splitlines()) == 2  # nothing was run
    lr = json.loads((run / "args.json").read_text())["lr"]
    # the same value, the run's own folder and --force are fine
    assert main(["--resume", str(run / "last.pt"), "--lr", str(lr), "--epochs", "2", "--out-dir", str(run),
                 "--force"]) == 0
    assert len((run / "training_log.csv").read_text().splitlines()) == 3  # --epochs applied: one more epoch


def test_a_run_stopped_early_resumes_to_its_last_epoch(small_data_dir, tmp_path):
    """A run stopped inside an epoch by its time budget and resumed with a larger budget trains to
    --epochs: the earlier stop is not carried over into the resumed process."""
    run = tmp_path / "run"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), "--epochs", "3", "--time-budget", "1e-5",
                 *TINY]) == 0                                   # stops inside epoch 1
    assert len((run / "training_log.csv").read_text().splitlines()) == 2
    assert main(["--resume", str(run / "last.pt"), "--time-budget", "60"]) == 0   # the old stop is not carried over
    assert len((run / "training_log.csv").read_text().splitlines()) == 4
    assert json.loads((run / "metrics.json").read_text())["stopped_early"] == ""
