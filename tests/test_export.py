"""--export writes safetensors + config.json; from_pretrained rebuilds a bit-identical model."""
import json

import pytest
import torch
from safetensors import safe_open

import mamba_next
import masked_model_gpu
from training import load_checkpoint

MASKED = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
          "--n-layers", "1", "--d-ff", "32", "--mask-patch-size", "4", "--no-train-eval", "--epochs", "1"]
MAMBA = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "2",
         "--d-state", "4", "--d-ff", "32", "--no-train-eval", "--epochs", "1"]


def test_masked_export_at_the_end_of_training_reloads_bit_identical(small_data_dir, tmp_path, capsys):
    run, exp = tmp_path / "run", tmp_path / "exp"
    assert masked_model_gpu.main(["--data-dir", small_data_dir, "--out-dir", str(run), "--export", str(exp),
                                  *MASKED]) == 0
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["model_type"] == "masked_transformer" and cfg["model_config"]["d_model"] == 16
    ck = load_checkpoint(str(run / "best.pt"))
    with safe_open(str(exp / "model.safetensors"), "pt") as f:  # the stored tensors are the checkpoint's
        assert set(f.keys()) == set(ck["model"])
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), ck["model"][k])
    model = masked_model_gpu.MaskedTransformer.from_pretrained(str(exp)).eval()
    ref = masked_model_gpu.load_model(ck).eval()
    x = torch.randn(2, 64, 20)
    m = torch.zeros(2, 64, dtype=torch.bool)
    m[:, 10:20] = True
    assert torch.equal(model(x, m), ref(x, m))
    # an export folder is not replaced without --force, and the refusal comes before any training
    capsys.readouterr()
    assert masked_model_gpu.main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "run2"),
                                  "--export", str(exp), *MASKED]) == 2
    assert "--force" in capsys.readouterr().err and not (tmp_path / "run2").exists()


def test_mamba_eval_export_keeps_mamba_ssm_names_and_outputs(small_data_dir, tmp_path):
    run, exp = tmp_path / "run", tmp_path / "exp"
    assert mamba_next.main(["train", "--data-dir", small_data_dir, "--out-dir", str(run), *MAMBA]) == 0
    assert mamba_next.main(["train", "--eval", str(run / "best.pt"), "--export", str(exp),
                            "--plots-dir", str(tmp_path / "p")]) == 0
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "A_log", "D", "out_proj.weight"):
        assert f"layers.0.mixer.{name}" in keys, name
    model = mamba_next.MambaNext.from_pretrained(str(exp)).eval()
    ref = mamba_next.load_model(load_checkpoint(str(run / "best.pt"))).eval()
    x = torch.randn(2, 50, 20)
    assert torch.equal(model(x), ref(x))


def test_from_pretrained_refuses_another_model_and_missing_files(small_data_dir, tmp_path):
    from training import TrainingError
    exp = tmp_path / "exp"
    assert masked_model_gpu.main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "run"), "--export",
                                  str(exp), *MASKED]) == 0
    with pytest.raises(TrainingError, match="not a 'mamba_next' model"):
        mamba_next.MambaNext.from_pretrained(str(exp))
    with pytest.raises(TrainingError, match="not found"):
        masked_model_gpu.MaskedTransformer.from_pretrained(str(tmp_path / "nothing"))


def test_modadd_export_at_training_and_from_a_run(tmp_path, capsys):
    from modadd import train
    from modadd.model import ModAddTransformer
    from modadd.runs import load_run
    run, exp = tmp_path / "run", tmp_path / "exp"
    tiny = ["--T", "8", "--C", "3", "--m-max", "2", "--n-layers", "2", "--d-model", "16", "--n-heads", "2",
            "--steps", "20", "--snapshot-every", "10", "--eval-every", "10", "--eval-size", "32", "--mlp"]
    assert train.main([*tiny, "--out-dir", str(run), "--export", str(exp)]) == 0
    model, task, _ = load_run(str(run))
    again = ModAddTransformer.from_pretrained(str(exp))
    tokens = torch.randint(0, task.vocab_size, (16, task.T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), again.eval()(tokens))
    assert json.loads((exp / "config.json").read_text())["data"]["C"] == 3
    # an existing export is refused before any work; --from-run exports a finished run
    assert train.main(["--from-run", str(run), "--export", str(exp)]) == 2
    assert "--force" in capsys.readouterr().err
    assert train.main(["--from-run", str(run), "--export", str(exp), "--force"]) == 0
    assert train.main(["--from-run", str(run)]) == 2
    with pytest.raises(Exception, match="not a"):
        masked_model_gpu.MaskedTransformer.from_pretrained(str(exp))
