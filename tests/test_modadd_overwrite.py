"""modadd: no stage replaces its earlier outputs without --force. For every analysis stage on a
tiny run: the first call writes only files of its declared outputs; an identical second call
stops with one line naming --force (exit 2) and leaves every file byte-identical; --force
removes everything the stage wrote before (a figure left by a run with plots, when the rerun
skips them; a figure the data of this run would not give) before writing anew. modadd.train
--force removes every stage's outputs and its own files of the replaced run, and a sweep run
again on the same root skips the stages it finished."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

TINY = ["--steps", "20", "--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--snapshot-every", "4",
        "--eval-size", "32", "--batch-size", "16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from modadd.train import main
    d = tmp_path_factory.mktemp("modadd") / "s0"
    assert main([*TINY, "--out-dir", str(d)]) == 0
    return d


@pytest.fixture
def root(base_run, tmp_path):
    """A sweep-like root holding a copy of the tiny run as s0."""
    shutil.copytree(base_run, tmp_path / "root" / "s0")
    return tmp_path / "root"


def planted_curriculum(folder, drop: float):
    """A curriculum run's config and metrics (what modadd.forgetting reads)."""
    folder.mkdir(parents=True)
    steps = np.arange(0, 401, 50)
    json.dump({"schedule": "curriculum", "steps": 400, "m_min": 1, "m_max": 2}, open(folder / "config.json", "w"))
    a1 = np.where(steps <= 200, 0.9 * steps / 200, 0.9 - drop * (steps - 200) / 200)
    a2 = np.where(steps <= 200, 0.1, 0.1 + 0.8 * (steps - 200) / 200)
    with open(folder / "metrics.csv", "w") as f:
        f.write("step,acc_m1,acc_m2\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(steps, a1, a2)))
    return folder


def files(folder) -> dict:
    """Every file below folder (relative path -> bytes), safeio's record of what each command wrote aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".outputs.json", ".outputs.lock")}


# stage -> (its outputs in the folder it writes to, as the stage's docs name them; argv for a cheap run;
#           the folder it writes to; whether it has --no-plot)
def stage_case(stage, root, tmp_path):
    run = str(root / "s0")
    if stage == "bubbling":
        return ["bubbling.json", "bubbling.png"], [run, "--n", "50"], root / "s0", True
    if stage == "sae":
        return ["sae.json", "sae.png"], [run, "--sae-steps", "20", "--n-train", "32", "--n-eval", "32", "--n-random",
                                         "2", "--n-latents", "32", "--n-select", "4", "--k", "4", "--at", "1",
                                         "--kinds", "topk"], root / "s0", True
    if stage == "trajectory":
        return ["trajectory_pca.json", "trajectory_pca.png"], [run, "--n-null", "2", "--out-dir", str(root)], root, True
    if stage == "alignment":
        return ["alignment.json", "alignment.png"], [run, "--n-null", "1", "--k", "2", "--windows", "2", "--out-dir",
                                                     str(root)], root, True
    if stage == "forgetting":
        cur = planted_curriculum(tmp_path / "cur" / "s0", 0.4)
        return ["forgetting.json", "forgetting.png"], [str(cur), "--out-dir", str(tmp_path / "out")], \
            tmp_path / "out", True
    assert stage == "report"
    names = ["report.json", "report.md"] + [f + ".png" for f in (
        "fig1_intrinsic_dim", "fig2_entropy_bubbling", "fig3_commutator_raw", "fig4_comm_ratio",
        "fig5_comm_decomposition", "fig6_sae_ablation", "forgetting")]
    return names, [str(root), "--out-dir", str(tmp_path / "out")], tmp_path / "out", False


@pytest.mark.parametrize("stage", ["bubbling", "sae", "trajectory", "alignment", "forgetting", "report"])
def test_stage_refuses_to_overwrite_and_force_replaces(stage, root, tmp_path, capsys):
    """Numbers go to the stage's folder, figures to --plots-dir; both count as its outputs."""
    import importlib
    mod = importlib.import_module(f"modadd.{stage}")
    names, argv, folder, has_no_plot = stage_case(stage, root, tmp_path)
    figs = tmp_path / "figs"
    argv = argv + ["--plots-dir", str(figs)]
    folder.mkdir(parents=True, exist_ok=True)
    declared = {os.path.relpath(p, tmp_path) for p in mod.outputs(str(folder), plots_dir=str(figs))}
    where = {n: (figs if n.endswith(".png") else folder) / n for n in names}
    assert declared == {os.path.relpath(p, tmp_path) for p in where.values()}

    before = files(tmp_path)
    assert mod.main(argv) == 0
    first = files(tmp_path)
    written = set(first) - set(before)
    assert written and written <= declared, written - declared           # everything it wrote is declared
    assert all(first[k] == v for k, v in before.items())                 # and nothing else was touched

    capsys.readouterr()
    assert mod.main(argv) == 2                                           # the same call again
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--force" in err and err.startswith("error: "), err
    assert files(tmp_path) == first                                      # byte-identical, nothing written

    if has_no_plot:                      # a rerun without figures must not leave the earlier figure behind
        stale = next(n for n in written if n.endswith(".png"))
        again = argv + ["--no-plot", "--force"]
    else:                                # a figure this run's data do not give (no sae.json here)
        stale = os.path.relpath(where["fig6_sae_ablation.png"], tmp_path)
        assert stale not in written
        (tmp_path / stale).write_bytes(b"stale figure of another run")
        again = argv + ["--force"]
    assert (tmp_path / stale).exists()
    assert mod.main(again) == 0
    after = files(tmp_path)
    assert stale not in after
    assert all(after[k] == v for k, v in before.items())                 # inputs untouched
    assert set(after) - set(before) <= declared and any(n.endswith(".json") for n in set(after) - set(before))


def test_train_force_removes_the_replaced_runs_files_and_stage_outputs(root, plots_below_tmp):
    """Every stage's outputs of the run (numbers in the run folder, figures in its default figures
    folder plots/<run name>) and the old run's commutators.csv (which a run without commutators
    does not write) are gone once the run is replaced."""
    from modadd.train import main, stage_outputs
    run, figs = root / "s0", plots_below_tmp / "root" / "s0"
    stages = ("bubbling", "trajectory_pca", "alignment", "sae", "forgetting")
    names = {f"{n}.json" for n in stages}
    expected = [str(run / f"{n}.json") for n in stages] + [str(figs / f"{n}.png") for n in stages]
    assert sorted(stage_outputs(str(run))) == sorted(expected)
    figs.mkdir(parents=True)
    for p in expected:
        open(p, "w").write("of the old model")
    assert (run / "commutators.csv").exists()
    short = ["--steps", "8", "--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--snapshot-every", "4",
             "--eval-size", "16", "--batch-size", "8", "--commutator-every", "0", "--out-dir", str(run)]
    assert main(short) == 2                                              # a run is there
    assert main(short + ["--force"]) == 0
    left = set(os.listdir(run))
    assert not (left & names) and "commutators.csv" not in left and not os.listdir(figs)
    assert {"config.json", "metrics.csv", "snapshots.npz", "model.pt"} <= left
    assert json.load(open(run / "config.json"))["steps"] == 8


def test_sweep_rerun_skips_finished_stages(tmp_path, capsys):
    from modadd.sweep import main as sweep
    root = tmp_path / "root"
    tiny = TINY + ["--commutator-every", "0"]
    common = ["--root", str(root), "--together", "1", "--stages", "bubbling,trajectory", "--no-plot"]
    assert sweep(["--seeds", "0", *common, "--", *tiny]) == 0
    bub, traj = root / "s0" / "bubbling.json", root / "trajectory_pca.json"
    first = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (bub, traj)}
    capsys.readouterr()

    assert sweep(["--seeds", "0", *common, "--", *tiny]) == 0            # nothing new: every stage skipped
    out = capsys.readouterr().out
    assert "training 0 of 1 seeds" in out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and skipped[0].startswith("bubbling: skipped on 1 run(s)") and \
        skipped[1].startswith("trajectory: skipped"), out
    assert "FAILED" not in out and "0 step(s) failed" in out
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == v for p, v in first.items())

    assert sweep(["--seeds", "0-1", *common, "--", *tiny]) == 0         # a new seed
    out = capsys.readouterr().out
    assert "training 1 of 2 seeds" in out and "bubbling: skipped on 1 run(s)" in out and out.count("skipped") == 1
    assert (bub.read_bytes(), bub.stat().st_mtime_ns) == first[bub]     # s0's stage kept
    assert (root / "s1" / "bubbling.json").exists()
    assert json.load(open(traj))["runs"] == [str(root / "s0"), str(root / "s1")]    # rerun over both seeds

    os.remove(root / "s1" / "bubbling.json")                              # incomplete outputs: rerun
    assert sweep(["--seeds", "0-1", *common, "--", *tiny]) == 0
    out = capsys.readouterr().out
    assert "bubbling: skipped on 1 run(s)" in out and out.rstrip().endswith("0 step(s) failed")
    assert "trajectory: skipped" in out and (root / "s1" / "bubbling.json").exists()

    before = traj.stat().st_mtime_ns                                      # --force-stages reruns a finished one
    assert sweep(["--seeds", "0-1", *common[:4], "--stages", "trajectory", "--no-plot", "--force-stages", "--",
                  *tiny]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and "trajectory over 2 runs" in out and traj.stat().st_mtime_ns > before


def test_sweep_with_figures_skips_on_the_figures_it_drew(tmp_path, plots_below_tmp, capsys):
    """With figures on, a per-seed stage's skip check looks where the stage drew (--plots-dir, one
    folder per seed): a rerun skips; a removed figure makes that seed's stage run again."""
    from modadd.sweep import main as sweep
    root, figs = tmp_path / "root", tmp_path / "figs"
    common = ["--seeds", "0", "--root", str(root), "--plots-dir", str(figs), "--together", "1", "--stages",
              "bubbling", "--", *TINY, "--commutator-every", "0"]
    assert sweep(common) == 0
    assert (root / "s0" / "bubbling.json").exists() and (figs / "s0" / "bubbling.png").exists()
    assert not list(root.rglob("*.png")) and not plots_below_tmp.exists()
    capsys.readouterr()
    assert sweep(common) == 0 and "bubbling: skipped on 1 run(s)" in capsys.readouterr().out
    (figs / "s0" / "bubbling.png").unlink()
    assert sweep(common) == 0 and "skipped" not in capsys.readouterr().out
    assert (figs / "s0" / "bubbling.png").exists()
