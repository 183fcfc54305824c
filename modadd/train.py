"""Train a transformer on marker-based modular addition and record its geometry as it learns.

    python -m modadd.train --preset code                       # T 16, C 8, m 1-4, 5 layers, AdamW, 20k steps
    python -m modadd.train --preset paper --seed 3             # T 32, SGD lr 1e-3, batch 64, snapshots every 100
    python -m modadd.train --preset code --steps 2000 --mlp --schedule curriculum

Presets (any flag overrides a field):
  code   T 16, C 8, m 1-4, 5 layers, d 128, 4 heads, AdamW lr 3e-4, batch 128, 20,000 steps,
         snapshots every 500 (what the original code ran)
  paper  T 32, SGD lr 1e-3, batch 64, snapshots every 100 (what its text states; 20 seeds)
Writes to --out-dir: config.json; metrics.csv (per evaluation: step, train loss, accuracy
and loss on fixed held-out sets per m, read-out attention entropy per layer on fixed
probes); snapshots.npz (every parameter at every snapshot: the attention matrices as
L<i>_W_Q ... L<i>_W_O, the rest as rest.<name>, and the steps); commutators.csv (SGD
commutator D, D_rel, and rho onto the execution subspace of the snapshots so far beside a
random subspace of the same size; final_*: rho onto the execution subspace of the whole
trajectory beside random live-coordinate and block-matched baselines, and per-block).
Training, evaluation and measurement draw from separate random streams, so measuring
never changes training (tested: the same final weights with and without commutators).

Every file is written atomically, model.pt last: a folder without model.pt holds an unfinished
run (a kill while training or writing), which a rerun refuses without --force. A folder holding
any file the run writes, or an analysis stage's output, needs --force, which replaces exactly
those files once the new run is ready to be written. Sizes are checked against the memory
there is before anything is allocated, and a loss that turns NaN stops the run with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import safeio
from cliargs import SEED, Parser, at_least, positive, resolve_device
from modadd.figures import remove_temporaries
from modadd.geometry import commutator, execution_basis, project_commutators, random_basis, rho
from modadd.model import MODEL_TYPE, accuracy, ModAddTransformer, ModelConfig, n_parameters, readout_entropy
from modadd.task import TaskConfig, batch_for, m_schedule, sample
from modadd.runs import load_run
from training import check_export_target, export_model, run_lock, TrainingError

KEY = "python -m modadd.train"     # what a run records it wrote in its folder (safeio.Outputs)

PRESETS = {
    "code": dict(T=16, C=8, m_min=1, m_max=4, n_layers=5, d_model=128, n_heads=4, optimizer="adamw", lr=3e-4,
                 batch_size=128, steps=20_000, snapshot_every=500),
    "paper": dict(T=32, C=8, m_min=1, m_max=4, n_layers=5, d_model=128, n_heads=4, optimizer="sgd", lr=1e-3,
                  batch_size=64, steps=20_000, snapshot_every=100),
}


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.train", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="code",
                   help="a named configuration (the flags below override its values)")
    for name, typ, text in (
            ("T", at_least(2), "sequence length"), ("C", at_least(2), "modulus (value tokens 0..C-1)"),
            ("m_min", at_least(1), "fewest markers per sequence"), ("m_max", at_least(1), "most markers per sequence"),
            ("n_layers", at_least(1), None), ("d_model", at_least(1), "a multiple of --n-heads"),
            ("n_heads", at_least(1), None), ("lr", positive(), None), ("batch_size", at_least(1), None),
            ("steps", at_least(1), None), ("snapshot_every", at_least(1), None)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=(text + "; " if text else "") + "default: the preset's")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=None, help="default: the preset's")
    p.add_argument("--mlp", action="store_true", help="standard blocks (attention + MLP) instead of attention-only")
    p.add_argument("--d-ff", type=at_least(1), default=512, help="MLP width (with --mlp)")
    p.add_argument("--schedule", choices=("mixed", "mixed-batch", "curriculum"), default="mixed",
                   help="marker counts: mixed per example, mixed per batch, or a curriculum from few to many")
    p.add_argument("--no-value-distractors", action="store_true",
                   help="distractors from noise tokens only (values then never appear unmarked)")
    p.add_argument("--readout-token", action="store_true", help="a dedicated read-out token at the last position")
    p.add_argument("--n-noise", type=at_least(0), default=8,
                   help="noise tokens (0 only with value distractors: distractors need tokens to come from)")
    p.add_argument("--eval-every", type=at_least(1), default=None, help="default: the snapshot interval")
    p.add_argument("--eval-size", type=at_least(1), default=2000, help="fixed held-out examples per m")
    p.add_argument("--commutator-every", type=at_least(0), default=None,
                   help="default: the snapshot interval; 0: never")
    p.add_argument("--exec-k", type=at_least(1), default=3, help="dimension of the execution subspace for rho")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation and the data stream")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when torch sees one)")
    p.add_argument("--out-dir", default=None, help="default runs/modadd_<preset>_s<seed>")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the final model as DIR/model.safetensors + DIR/config.json (loads without "
                        "running code: ModAddTransformer.from_pretrained(DIR)); with --from-run, export that run "
                        "instead of training")
    p.add_argument("--from-run", default=None, metavar="RUN",
                   help="with --export: export the model.pt of this finished run folder; nothing is trained")
    p.add_argument("--force", action="store_true",
                   help="train into an --out-dir that already holds a run, or an unfinished one (its files and "
                        "the stages' outputs there are removed once the new run is ready to be written)")
    return p


def resolve(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    for k in list(cfg) + ["optimizer"]:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg.update(mlp=args.mlp, d_ff=args.d_ff, schedule=args.schedule, value_distractors=not args.no_value_distractors,
               readout_token=args.readout_token, n_noise=args.n_noise, seed=args.seed, preset=args.preset,
               eval_every=args.eval_every or cfg["snapshot_every"], eval_size=args.eval_size, exec_k=args.exec_k,
               commutator_every=cfg["snapshot_every"] if args.commutator_every is None else args.commutator_every)
    return cfg


def check(cfg: dict) -> str | None:
    """What the flags' types cannot say about a resolved configuration (flags and preset
    together): the problem in one line, or None."""
    if cfg["d_model"] % cfg["n_heads"]:
        return f"--d-model {cfg['d_model']} is not divisible by --n-heads {cfg['n_heads']}"
    if cfg["m_min"] > cfg["m_max"]:
        return f"--m-min {cfg['m_min']} exceeds --m-max {cfg['m_max']}"
    task = TaskConfig.from_dict(cfg)
    if cfg["m_max"] > task.max_markers():
        return (f"--m-max {cfg['m_max']} is more markers than a sequence of --T {cfg['T']} holds "
                f"({task.max_markers()}); lower --m-max or raise --T")
    if not cfg["value_distractors"] and cfg["n_noise"] < 1:
        return "--no-value-distractors needs --n-noise of at least 1 (distractors are then noise tokens only)"
    return None


def memory_needed(cfg: dict) -> int:
    """Bytes a run of cfg keeps at its peak, roughly: the model with its gradients and Adam state,
    every snapshot of every parameter (kept until the run is written), activations of a training
    batch and of the evaluation sets (attention is batch x heads x T x T per layer), and, with
    commutators, a float64 copy of the model, its gradients and the attention trajectory.
    Computed in Python integers from the sizes alone: nothing is allocated."""
    P = n_parameters(ModelConfig.from_dict(cfg, TaskConfig.from_dict(cfg)))
    d, T, L, h, B = cfg["d_model"], cfg["T"], cfg["n_layers"], cfg["n_heads"], cfg["batch_size"]
    A = L * 4 * d * d
    n_snap = cfg["steps"] // cfg["snapshot_every"] + 1
    n_comm = cfg["steps"] // cfg["commutator_every"] if cfg["commutator_every"] else 0
    E = max(cfg["eval_size"], 256, B)
    act = T * (d * L * 10 + (cfg["d_ff"] * L * 3 if cfg["mlp"] else 0)) + h * T * T * L * 3
    need = 4 * P * 4 + 4 * P * n_snap * 2 + 4 * B * act + 4 * E * h * T * T * 3 + 4 * 256 * h * T * T * L
    need += 8 * cfg["eval_size"] * T * (cfg["m_max"] - cfg["m_min"] + 1)
    if n_comm:
        need += 8 * P * 8 + 8 * A * n_snap * 2 + 4 * A * n_comm * 3 + 8 * B * act * 2
    return need


def check_sizes(cfg: dict) -> None:
    """One line (InputError) before anything is allocated when the run cannot fit in memory."""
    safeio.check_fits(memory_needed(cfg), "this run (model, snapshots, activations)",
                      "use smaller --d-model / --n-layers / --T / --C / --n-noise / --d-ff / --batch-size / "
                      "--eval-size, or fewer snapshots (a larger --snapshot-every or fewer --steps)")


def pick_device(name: str) -> torch.device:
    """cliargs.resolve_device as a torch.device (a ValueError without the CUDA device asked for, or for a
    name torch does not know)."""
    dev = resolve_device(name)
    try:
        return torch.device(dev)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r:.40}: use auto, cpu, cuda or cuda:N") from None


class Recorder:
    """Everything one seed's run records, fed with its model at the right steps: snapshots
    of every parameter, evaluations on the fixed held-out sets and probes, commutators.
    Holds this seed's measurement streams, so recording never touches the training ones."""

    def __init__(self, cfg: dict, task: TaskConfig, model: ModAddTransformer, dev: torch.device):
        self.cfg, self.task, self.seed = cfg, task, cfg["seed"]
        eval_gen = torch.Generator().manual_seed(999)               # fixed held-out sets, same for every seed
        self.evals = {m: tuple(t.to(dev) for t in sample(task, m, cfg["eval_size"], eval_gen)[:2])
                      for m in range(cfg["m_min"], cfg["m_max"] + 1)}
        self.probe = sample(task, torch.randint(cfg["m_min"], cfg["m_max"] + 1, (256,), generator=eval_gen), 256,
                            eval_gen)[0].to(dev)
        self.meas_gen = torch.Generator().manual_seed(20_000 + self.seed)     # commutator minibatches
        self.rng_np = np.random.default_rng(30_000 + self.seed)
        self.rule = m_schedule(cfg["schedule"], cfg["m_min"], cfg["m_max"], cfg["steps"])
        mats = model.attention_matrices()
        att_ids = {id(w) for w in mats.values()}
        self.names = [n for n, p in model.named_parameters() if id(p) not in att_ids]
        self.snaps: dict[str, list] = {k: [] for k in mats}
        self.rest_snaps: dict[str, list] = {n: [] for n in self.names}
        self.snap_steps: list[int] = []
        self.rows, self.comm_rows, self.deltas = [], [], []
        self.t_meas = 0.0

    def snapshot(self, model, step: int) -> None:
        self.snap_steps.append(step)
        for k, w in model.attention_matrices().items():
            self.snaps[k].append(w.detach().float().cpu().numpy().copy())
        params = dict(model.named_parameters())
        for n in self.names:
            self.rest_snaps[n].append(params[n].detach().float().cpu().numpy().copy())

    def evaluate(self, model, step: int, train_loss: float) -> dict:
        row = {"step": step, "train_loss": train_loss}
        was = model.training
        model.eval()
        for m, (x, y) in self.evals.items():
            row[f"acc_m{m}"], row[f"loss_m{m}"] = accuracy(model, x, y)
        keep = {}
        with torch.no_grad():
            model(self.probe, keep)
        for i, e in enumerate(readout_entropy(keep).mean(1).tolist()):
            row[f"entropy_L{i}"] = e
        model.train(was)
        self.rows.append(row)
        return row

    def commutator(self, model, step: int) -> None:
        t = time.perf_counter()
        row, delta = measure_commutator(model, self.task, self.rule(step - 1), self.cfg, self.meas_gen, self.snaps,
                                        self.rng_np)
        self.comm_rows.append({"step": step, **row})
        self.deltas.append(delta)
        self.t_meas += time.perf_counter() - t

    def after_step(self, model, step: int, loss_fn) -> dict | None:
        """Record what is due after training step `step`; loss_fn() gives the mean training
        loss since the last evaluation (and resets it). Returns the evaluation row if one ran."""
        cfg = self.cfg
        if step % cfg["snapshot_every"] == 0:
            self.snapshot(model, step)
        if cfg["commutator_every"] and step % cfg["commutator_every"] == 0:
            self.commutator(model, step)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            return self.evaluate(model, step, loss_fn())
        return None

    def result(self, model, seconds: float, dev) -> dict:
        if self.deltas:
            t = time.perf_counter()
            final_projections(self.comm_rows, self.deltas, self.snaps, self.cfg["exec_k"],
                              np.random.default_rng(40_000 + self.seed))
            self.t_meas += time.perf_counter() - t
        return {"config": self.cfg, "n_parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds,
                "measurement_seconds": self.t_meas, "device": str(dev), "final": self.rows[-1], "metrics": self.rows,
                "commutators": self.comm_rows, "model": model,
                "snapshots": {k: np.stack(v) for k, v in self.snaps.items()},
                "rest_snapshots": {k: np.stack(v) for k, v in self.rest_snaps.items()},
                "snapshot_steps": np.array(self.snap_steps)}


def setup(cfg: dict) -> tuple[TaskConfig, ModAddTransformer, torch.Generator]:
    """The task, this seed's initial model (on the CPU) and its training-batch stream."""
    task = TaskConfig.from_dict(cfg)
    if not 1 <= cfg["m_min"] <= cfg["m_max"] <= task.max_markers():
        raise ValueError(f"m range {cfg['m_min']}..{cfg['m_max']} impossible for T = {cfg['T']} "
                         f"(at most {task.max_markers()} markers)")
    mcfg = ModelConfig.from_dict(cfg, task)
    torch.manual_seed(cfg["seed"])                                     # initialisation stream
    model = ModAddTransformer(mcfg)
    return task, model, torch.Generator().manual_seed(10_000 + cfg["seed"])  # training batches (drawn on the CPU)


def make_optimizer(params, cfg: dict):
    return (torch.optim.AdamW(params, lr=cfg["lr"]) if cfg["optimizer"] == "adamw"
            else torch.optim.SGD(params, lr=cfg["lr"]))


def run(cfg: dict, out_dir: str | None = None, progress: bool = True, device: str = "cpu") -> dict:
    from tqdm import tqdm
    dev = pick_device(device)
    task, model, data_gen = setup(cfg)
    model.to(dev)
    rec = Recorder(cfg, task, model, dev)
    opt = make_optimizer(model.parameters(), cfg)
    t0 = time.perf_counter()
    rec.snapshot(model, 0)
    rec.evaluate(model, 0, float("nan"))
    acc = {"sum": torch.zeros((), device=dev), "n": 0}

    def mean_loss():
        v = float(acc["sum"]) / max(acc["n"], 1)
        acc["sum"].zero_()
        acc["n"] = 0
        return v

    # a progress bar on a terminal only: in a log or a pipe, stderr holds the one line of an error
    bar = tqdm(range(1, cfg["steps"] + 1), desc="training", disable=not (progress and sys.stderr.isatty()),
               mininterval=2)
    for step in bar:
        x, y, _, _ = batch_for(task, rec.rule(step - 1), cfg["batch_size"], data_gen)
        loss = F.cross_entropy(model(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc["sum"] += loss.detach()
        acc["n"] += 1
        row = rec.after_step(model, step, mean_loss)
        if row:
            check_finite(row, cfg)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=" ".join(f"{row[f'acc_m{m}']:.2f}" for m in rec.evals))
    res = rec.result(model.cpu(), time.perf_counter() - t0, dev)
    if out_dir:
        write(res, out_dir)
    return res


def check_finite(row: dict, cfg: dict) -> None:
    """A NaN or infinite training loss stops the run with one line (its outputs would be NaN throughout)."""
    if not np.isfinite(row["train_loss"]):
        raise safeio.InputError(f"training diverged: the training loss is {row['train_loss']} at step {row['step']} "
                                f"(seed {cfg['seed']}, lr {cfg['lr']}); lower --lr")


def flat_attention(snaps: dict[str, list]) -> np.ndarray:
    return np.concatenate([np.stack(v).reshape(len(v), -1) for v in snaps.values()], axis=1)


def attention_blocks(snaps: dict[str, list]) -> list[slice]:
    out, start = [], 0
    for v in snaps.values():
        n = v[0].size
        out.append(slice(start, start + n))
        start += n
    return out


def final_projections(comm_rows, deltas, snaps, k, rng) -> None:
    """Once training is over: project every commutator onto the execution subspace of the
    whole trajectory and onto its random, live-coordinate and block-matched baselines."""
    proj = project_commutators(np.stack(deltas), flat_attention(snaps), attention_blocks(snaps), k, rng)
    for i, row in enumerate(comm_rows):
        row.update({f"final_{name}": float(v[i]) for name, v in proj.items()})


def measure_commutator(model, task, rule, cfg, gen, snaps, rng_np) -> tuple[dict, np.ndarray]:
    """SGD commutator at the current weights in float64, with its projection onto the
    execution subspace of the snapshots so far (top exec_k directions of the attention
    trajectory) and onto a random subspace of the same size. Also returns the attention
    part of the commutator (float32) for the projections onto the final subspace."""
    from torch.func import functional_call
    dev = next(model.parameters()).device
    model64 = ModAddTransformer(model.cfg).double().to(dev)
    model64.load_state_dict(model.state_dict())
    names = [n for n, _ in model64.named_parameters()]
    params = [p.detach() for _, p in model64.named_parameters()]
    (xa, ya, _, _), (xb, yb, _, _) = (batch_for(task, rule, cfg["batch_size"], gen) for _ in range(2))

    def loss_fn(ps, batch):
        x, y = batch
        return F.cross_entropy(functional_call(model64, dict(zip(names, ps)), (x.to(dev),)), y.to(dev))

    c = commutator(loss_fn, params, (xa, ya), (xb, yb), cfg["lr"])
    att = [n for n in names if ".attn.W_" in n]
    delta = np.concatenate([c["delta"][names.index(n)].cpu().numpy().ravel() for n in att])
    out = {"norm": c["norm"], "D": c["D"], "D_rel": c["D_rel"], "step_a": c["step_a"], "step_b": c["step_b"],
           "attention_share": float(np.linalg.norm(delta) / c["norm"]) if c["norm"] > 0 else float("nan")}
    n_snap = len(next(iter(snaps.values())))
    if n_snap > cfg["exec_k"] and np.linalg.norm(delta) > 0:
        basis = execution_basis(flat_attention(snaps), cfg["exec_k"])
        r = rho(delta, basis)
        r0 = rho(delta, random_basis(len(delta), cfg["exec_k"], rng_np))
        out.update(rho_exec=r, rho_random=r0, perp_exec=float(np.sqrt(max(0.0, 1 - r * r))))
    return out, delta.astype(np.float32)


def write(res: dict, out_dir: str, outputs: safeio.Outputs | None = None) -> None:
    """Every file of a run, each atomically (safeio), recorded under the command's key; model.pt last,
    so a folder with a model.pt holds a whole run and one without it an unfinished one (a kill while
    writing), which modadd.sweep trains again and modadd.train refuses to touch without --force."""
    target = (outputs or safeio.Outputs(KEY, True)).target
    os.makedirs(out_dir, exist_ok=True)
    safeio.write_json(target(os.path.join(out_dir, "config.json")),
                      {**res["config"], "n_parameters": res["n_parameters"], "seconds": res["seconds"],
                       "measurement_seconds": res["measurement_seconds"], "device": res.get("device", "cpu")})
    for name, rows in (("metrics.csv", res["metrics"]), ("commutators.csv", res["commutators"])):
        if rows:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
            safeio.write_csv(target(os.path.join(out_dir, name)), keys, rows)
    safeio.save_npz(target(os.path.join(out_dir, "snapshots.npz")), steps=res["snapshot_steps"],
                    **{k.replace(".", "_"): v for k, v in res["snapshots"].items()},
                    **{"rest." + k: v for k, v in res["rest_snapshots"].items()})
    with safeio.atomic_path(target(os.path.join(out_dir, "model.pt"))) as tmp:
        torch.save({"config": res["config"], "model": res["model"].state_dict()}, tmp)


OUTPUTS = ("config.json", "metrics.csv", "commutators.csv", "snapshots.npz", "model.pt")   # what write() writes
STAGES = ("bubbling", "trajectory", "alignment", "sae", "forgetting")   # stages that write into a run folder


def outputs(out_dir: str) -> list[str]:
    """Every file a run writes in out_dir (commutators.csv only when commutators are measured)."""
    return [os.path.join(out_dir, f) for f in OUTPUTS]


def stage_outputs(out_dir: str) -> list[str]:
    """Every file the analysis stages can write in a run folder (each stage's outputs(), the one
    list it claims itself, and what each recorded there): a model trained again makes them describe
    another model. Imported here, not at the top, as the stages import this module."""
    import importlib
    declared = [p for s in STAGES for p in importlib.import_module(f"modadd.{s}").outputs(out_dir)]
    recorded = [p for s in STAGES for p in safeio.recorded(f"python -m modadd.{s}", out_dir)]
    return list(dict.fromkeys(declared + recorded))


def export(model, config: dict, out_dir: str, force: bool) -> list[str]:
    """The model as safetensors + config.json; the task's configuration goes with it."""
    from dataclasses import asdict

    return export_model(model, MODEL_TYPE, asdict(model.cfg), out_dir, force, data=config)


def claim_run(out: str, force: bool) -> tuple[safeio.Outputs, list[str]]:
    """Before any work: --out-dir can be written, and it holds nothing this run would replace (a run,
    an unfinished one, the stages' outputs of one) unless force. Returns the claim and the files it
    found, removed only once the new run is ready to be written (a failed run leaves the old one whole)."""
    safeio.output_dir(out, "--out-dir", create=False)
    mine = [os.path.join(out, f) for f in OUTPUTS]
    if not force and os.path.isfile(mine[-1]):
        raise safeio.OutputsExist(f"{out} already holds a run; pass --force to overwrite it or choose another "
                                  f"--out-dir")
    if not force and any(os.path.exists(p) for p in mine):
        raise safeio.OutputsExist(f"{out} holds an unfinished run (no model.pt: it was stopped while training or "
                                  f"writing); pass --force to train it again, or choose another --out-dir")
    outputs = safeio.Outputs(KEY, force)
    return outputs, outputs.claim(mine, remove=False, derived=stage_outputs(out))


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_run and not args.export:
        raise safeio.InputError("--from-run exports a run: give --export DIR too")
    if args.export:
        safeio.output_dir(args.export, "--export", create=False)
        check_export_target(args.export, args.force)
    if args.from_run:
        if os.path.realpath(args.export) == os.path.realpath(args.from_run):
            raise safeio.InputError("--export names the run folder (--from-run): the export's config.json would "
                                    "replace the run's; give the export a folder of its own")
        model, _, config = load_run(args.from_run)
        print("wrote " + ", ".join(export(model, config, args.export, args.force)))
        return 0
    cfg = resolve(args)
    problem = check(cfg)
    if problem:
        raise safeio.InputError(problem)
    check_sizes(cfg)
    pick_device(args.device)
    out = f"runs/modadd_{args.preset}_s{args.seed}" if args.out_dir is None else args.out_dir
    if args.export and os.path.realpath(args.export) == os.path.realpath(out):
        raise safeio.InputError("--export names the run folder (--out-dir): the export's config.json would replace "
                                "the run's; give the export a folder of its own")
    outputs, earlier = claim_run(out, args.force)
    if os.path.isdir(out):
        run_lock(out)                  # another run writing this folder stops this one before it trains
    res = run(cfg, None, device=args.device)
    os.makedirs(out, exist_ok=True)
    run_lock(out)                      # one writer per folder; then what appeared while this run trained
    now = outputs.earlier(outputs.paths)
    if not args.force and now:
        raise safeio.OutputsExist(f"{now[0]} appeared while this run trained (another run writes {out}?); nothing "
                                  f"was written; choose another --out-dir or pass --force")
    # only now: the old run's files (also one this run does not write, e.g. commutators.csv) and its
    # stages' outputs would describe another model
    outputs.remove_earlier(list(dict.fromkeys(earlier + now)))
    remove_temporaries(outputs.paths + [os.path.join(out, safeio.MANIFEST)])   # a killed writer's, of these names
    write(res, out, outputs)
    f = res["final"]
    print(f"{res['n_parameters']:,} parameters ({'standard' if cfg['mlp'] else 'attention-only'}); "
          f"{cfg['steps']} steps in {res['seconds']:.0f} s ({res['measurement_seconds']:.0f} s measuring)")
    print("held-out accuracy by m: " + ", ".join(f"m={m}: {f[f'acc_m{m}']:.3f}"
                                                 for m in range(cfg["m_min"], cfg["m_max"] + 1)))
    print(f"wrote {out}/config.json, metrics.csv, commutators.csv, snapshots.npz, model.pt")
    if args.export:
        print("wrote " + ", ".join(export(res["model"], res["config"], args.export, True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
