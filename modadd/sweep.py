"""Many seeds of one configuration, trained side by side, then analysed together.

    python -m modadd.sweep --seeds 0-19 --jobs 10 --out-dir runs/code -- --preset code
    python -m modadd.sweep --seeds 0-4 --out-dir runs/cur --stages trajectory -- --preset code --schedule curriculum
    python -m modadd.sweep --seeds 0-19 --together 20 --out-dir runs/code -- --preset code --device cuda

Everything after `--` goes to python -m modadd.train (each seed gets --seed and
--out-dir ROOT/s<seed>). Seeds run as --jobs parallel processes with one CPU thread each,
or with --together N as one vmapped network of N seeds in this process (meant for a GPU,
where separate processes time-slice the device). Seeds already trained are skipped. Then
the stages run: per seed bubbling and sae (in parallel), over all seeds trajectory and
alignment (numbers written to ROOT, the --out-dir, also spelled --root; figures to --plots-dir,
each seed's in a folder of its own). A seed that fails is reported and left out of the stages.

Run again on the same ROOT, a sweep picks up where it stopped. A per-seed stage is skipped
(one line names the runs) when the seed was not trained by this sweep and the stage's outputs
are all there and no older than that seed's model.pt; trajectory and alignment are skipped
when no seed was trained by this sweep and their outputs in ROOT are all there, no older than
any seed's model and computed over exactly this sweep's runs. Every other stage runs with
--force, which replaces its earlier outputs. --force-stages reruns them all (e.g. after
changing --sae-args). Flags the sweep sets itself (--seed, --out-dir, --force; --export) are
refused after `--` and in --sae-args; sizes are checked before any seed trains.
"""
from __future__ import annotations

import argparse
import importlib
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import safeio
from cliargs import NO_PLOT_HELP, Parser, at_least, default_plots_dir
from jobs import parse_seeds, slot_env, visible_gpus  # one seed-list parser for both launchers
from modadd import sae, train
from modadd.ensemble import run_many
from modadd.train import outputs, stage_outputs as run_stage_outputs
from training import TrainingError, run_lock

PER_RUN = ("bubbling", "sae")
ALL_RUNS = ("trajectory", "alignment")


def _call(cmd: list[str], log: str, env: dict | None = None) -> tuple[int, float]:
    env = dict(os.environ, **(env or {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return rc, time.perf_counter() - t


def run_parallel(jobs: list[tuple[str, list[str], str]], n: int, gpus: list[str] = ()) -> dict[str, int]:
    """jobs: (name, command, log path) -> {name: return code}, printing as they finish. Each of
    the n slots owns GPU gpus[slot % len(gpus)] (jobs.slot_env), so processes running at once
    are spread over the GPUs instead of all landing on GPU 0."""
    rcs = {}
    slots: queue.Queue = queue.Queue()
    for k in range(max(1, n)):
        slots.put(k)

    def one(cmd, log):
        slot = slots.get()
        try:
            return _call(cmd, log, slot_env(slot, list(gpus), 1))
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=max(1, n)) as ex:
        futs = {ex.submit(one, cmd, log): (name, log) for name, cmd, log in jobs}
        for fut, (name, log) in futs.items():
            rc, sec = fut.result()
            rcs[name] = rc
            print(f"  {name}: {'ok' if rc == 0 else f'FAILED (rc {rc}, see {log})'} in {sec:.0f} s", flush=True)
    return rcs


def stage_outputs(stage: str, out_dir: str, plots: bool, plots_dir: str) -> list[str]:
    """The files a run of the stage writes for out_dir, its figure in plots_dir (its module's
    outputs(); the JSON first)."""
    return importlib.import_module(f"modadd.{stage}").outputs(out_dir, plots, plots_dir)


def is_done(paths: list[str], models: list[str]) -> bool:
    """All the stage's outputs are there and none is older than a model they describe."""
    if not all(os.path.exists(p) for p in paths):
        return False
    newest = max((os.path.getmtime(m) for m in models), default=0.0)
    return min(os.path.getmtime(p) for p in paths) >= newest


def covers(json_path: str, runs: list[str]) -> bool:
    """A joint stage's JSON was computed over exactly these run folders (a file that cannot be read
    does not count: the stage then runs again, with --force, and replaces it)."""
    try:
        done = safeio.read_json(json_path, "stage output", kind=dict).get("runs")
    except safeio.InputError:
        return False
    return isinstance(done, list) and [os.path.normpath(str(r)) for r in done] == [os.path.normpath(r) for r in runs]


def train_together(train_args: list[str], seeds: list[int], dirs: dict, group: int) -> dict[str, int]:
    targs = train.build_parser().parse_args(train_args)
    cfg = train.resolve(targs)
    rcs = {}
    for i in range(0, len(seeds), group):
        chunk = seeds[i:i + group]
        t = time.perf_counter()
        try:
            res = run_many([dict(cfg, seed=s) for s in chunk], [dirs[s] for s in chunk], device=targs.device)
            acc = "; ".join(f"s{s}: " + " ".join(f"{r['final'][f'acc_m{m}']:.2f}"
                                                 for m in range(cfg["m_min"], cfg["m_max"] + 1))
                            for s, r in zip(chunk, res))
            print(f"  seeds {chunk[0]}-{chunk[-1]} together: ok in {time.perf_counter() - t:.0f} s "
                  f"(accuracy per m: {acc})", flush=True)
            rcs.update({f"seed {s}": 0 for s in chunk})
        except (ValueError, RuntimeError, OSError, MemoryError) as e:
            print(f"  seeds {chunk[0]}-{chunk[-1]} together: FAILED ({safeio.first_line(e)})", flush=True)
            rcs.update({f"seed {s}": 1 for s in chunk})
    return rcs


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.sweep", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seeds", default="0-4", help="e.g. 0-19 or 0,2,5")
    p.add_argument("--out-dir", "--root", dest="root", required=True,
                   help="the sweep's folder: the seeds' runs (ROOT/s<seed>) and the joint stages' numbers")
    p.add_argument("--plots-dir", default=None, help="where the stages' figures go: the joint stages' here, each "
                   "seed's in <this>/s<seed> (default plots/<name>, <name> being the --out-dir's path below runs/, "
                   "else below the current folder, else its last two folder names)")
    p.add_argument("--jobs", type=at_least(1), default=2, help="processes at once")
    p.add_argument("--stages", default=",".join(PER_RUN + ALL_RUNS),
                   help=f"comma list of {', '.join(PER_RUN + ALL_RUNS)}, or none")
    p.add_argument("--sae-args", default="", help="extra flags for modadd.sae, e.g. '--at 0.25,1 --sae-steps 1000'")
    p.add_argument("--together", type=at_least(0), default=0,
                   help="train this many seeds at a time in one process as one vmapped network (modadd.ensemble; "
                        "what keeps a GPU busy); 0: one process per seed")
    p.add_argument("--gpus", default="auto",
                   help="GPUs to spread the --jobs processes over, one per running process (auto: those visible; "
                        "0: none; N: the first N). For grids of configurations use python sweep.py")
    p.add_argument("--no-plot", action="store_true", help=NO_PLOT_HELP + " (the stages write JSON only)")
    p.add_argument("--force-stages", action="store_true",
                   help="rerun every chosen stage (with --force) even where its outputs are complete, e.g. after "
                        "changing --sae-args")
    return p


OWN_TRAIN_FLAGS = ("--seed", "--out-dir", "--force", "--export", "--from-run")   # the sweep sets or forbids them
OWN_SAE_FLAGS = ("--out-dir", "--plots-dir", "--force", "--no-plot")


def check_passed_flags(train_args: list[str], sae_args: list[str]) -> None:
    """Parse the flags meant for modadd.train and modadd.sae now, so that a bad value stops the
    sweep at once (one line, exit status 2) instead of failing every seed's process later. The
    flags the sweep sets itself (also as --flag=value or a prefix argparse would accept) are refused."""
    for args, flags, where in ((train_args, OWN_TRAIN_FLAGS, "the flags after --"),
                               (sae_args, OWN_SAE_FLAGS, "--sae-args")):
        for a in args:
            name = a.split("=", 1)[0]
            own = [f for f in flags if name.startswith("--") and len(name) > 2 and f.startswith(name)]
            if own:
                raise safeio.InputError(f"the sweep sets {own[0]} itself for each seed (--seed, --out-dir ROOT/s<seed>, "
                                        f"...); leave {a!r:.40} out of {where}")
    tp = train.build_parser()
    cfg = train.resolve(tp.parse_args(train_args))
    problem = train.check(cfg)
    if problem:
        tp.error(problem)
    train.check_sizes(cfg)
    sp = sae.build_parser()
    sargs = sp.parse_args(["RUN", *sae_args])
    problem = sae.check(sargs)
    if problem:
        sp.error(problem)
    if sae_args:
        sae.check_sizes(cfg, sargs.n_latents, sargs.n_train, sargs.n_eval)


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    seeds = parse_seeds(args.seeds, "--seeds")
    stages = [] if args.stages == "none" else args.stages.split(",")
    bad = [s for s in stages if s not in PER_RUN + ALL_RUNS]
    if bad:
        raise safeio.InputError(f"unknown stage(s) {bad}; choose among {', '.join(PER_RUN + ALL_RUNS)}, or none")
    check_passed_flags(train_args, args.sae_args.split() if "sae" in stages else [])
    gpus = visible_gpus(args.gpus) if args.together == 0 else []
    safeio.output_dir(args.root, "--out-dir", create=False)
    if args.plots_dir and not args.no_plot:
        safeio.output_dir(args.plots_dir, "--plots-dir", create=False)
    os.makedirs(args.root, exist_ok=True)
    run_lock(args.root)             # one sweep per root: two would train the same seeds into the same folders
    py = sys.executable
    dirs = {s: os.path.join(args.root, f"s{s}") for s in seeds}
    todo = [s for s in seeds if not os.path.exists(os.path.join(dirs[s], "model.pt"))]
    print(f"training {len(todo)} of {len(seeds)} seeds ({args.jobs} at once): modadd.train {' '.join(train_args)}")
    if args.together > 0:
        for s in todo:  # what modadd.train --force removes: leftovers of a run that did not finish
            safeio.Outputs(train.KEY, True).claim(outputs(dirs[s]), derived=run_stage_outputs(dirs[s]))
        rcs = train_together(train_args, todo, dirs, args.together)
    else:
        rcs = run_parallel([(f"seed {s}", [py, "-m", "modadd.train", *train_args, "--seed", str(s), "--out-dir",
                                           dirs[s], "--force"], dirs[s] + ".train.log") for s in todo], args.jobs, gpus)
    ok = [dirs[s] for s in seeds if os.path.exists(os.path.join(dirs[s], "model.pt"))]
    trained = {dirs[s] for s in todo} & set(ok)
    models = {d: os.path.join(d, "model.pt") for d in ok}
    plots = not args.no_plot
    figures = args.plots_dir or default_plots_dir(args.root)
    # each seed's figures: its own folder below --plots-dir, else the one rule's default for its run
    # folder (where modadd.train --force looks for them when it replaces the run)
    figures_of = {d: os.path.join(args.plots_dir, os.path.basename(d)) if args.plots_dir else default_plots_dir(d)
                  for d in ok}
    failed = sum(rc != 0 for rc in rcs.values())
    jobs = []
    for stage in (s for s in stages if s in PER_RUN):
        extra = (args.sae_args.split() if stage == "sae" else []) + (["--no-plot"] if args.no_plot else [])
        skip = [d for d in ok if not args.force_stages and d not in trained
                and is_done(stage_outputs(stage, d, plots, figures_of[d]), [models[d]])]
        if skip:
            print(f"{stage}: skipped on {len(skip)} run(s) whose outputs are complete and newer than their model "
                  f"(--force-stages reruns them): {', '.join(os.path.basename(d) for d in skip)}")
        jobs += [(f"{stage} {d}", [py, "-m", f"modadd.{stage}", d, *extra, "--plots-dir", figures_of[d], "--force"],
                  os.path.join(d, f"{stage}.log")) for d in ok if d not in skip]
    if jobs:
        print(f"per-seed stages: {len(jobs)} run(s)")
        failed += sum(rc != 0 for rc in run_parallel(jobs, args.jobs, gpus).values())
    for stage in (s for s in stages if s in ALL_RUNS):
        if ok:
            paths = stage_outputs(stage, args.root, plots, figures)
            if (not args.force_stages and not trained and is_done(paths, list(models.values()))
                    and covers(paths[0], ok)):
                print(f"{stage}: skipped, {paths[0]} is complete for these {len(ok)} runs and newer than their "
                      f"models (--force-stages reruns it)")
                continue
            print(f"{stage} over {len(ok)} runs")
            rc, _ = _call([py, "-m", f"modadd.{stage}", *ok, "--out-dir", args.root, "--plots-dir", figures,
                           *(["--no-plot"] if args.no_plot else []), "--force"],
                          os.path.join(args.root, f"{stage}.log"))
            failed += rc != 0
            print(f"  {'ok' if rc == 0 else 'FAILED'}: see {os.path.join(args.root, stage + '.log')}")
    print(f"done: {len(ok)} of {len(seeds)} seeds trained; {failed} step(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
