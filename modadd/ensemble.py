"""Several seeds of one configuration trained in one process, as one batched network.

The seeds' parameters are stacked (torch.func.stack_module_state) and one forward pass runs
all of them through torch.func.vmap, so a GPU that a single small model leaves idle does
S models' work per kernel launch. Each seed keeps its own initialisation, training-batch
stream and measurement streams (modadd.train.Recorder), and AdamW / SGD act elementwise, so
every seed follows the same path as `python -m modadd.train --seed s` up to floating-point
reduction order (tested). Records and writes exactly what modadd.train writes, per seed.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

import torch
import torch.nn.functional as F

from modadd.task import batch_for
from modadd.train import Recorder, check_finite, make_optimizer, pick_device, setup, write


def _prefetch(tasks, gens, rules, batch: int, steps: int, depth: int = 32) -> queue.Queue:
    """A background thread drawing every seed's batch for each step, in order, from the
    seeds' own generators (so the batches are the ones run() would draw)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        for step in range(1, steps + 1):
            xs, ys = zip(*(batch_for(t, r(step - 1), batch, g)[:2] for t, g, r in zip(tasks, gens, rules)))
            q.put((torch.stack(xs), torch.stack(ys)))

    threading.Thread(target=work, daemon=True).start()
    return q


def run_many(cfgs: list[dict], out_dirs: list[str] | None = None, progress: bool = True,
             device: str = "cpu") -> list[dict]:
    from torch.func import functional_call, stack_module_state, vmap
    from tqdm import tqdm
    same = [{k: v for k, v in c.items() if k != "seed"} for c in cfgs]
    if any(s != same[0] for s in same[1:]):
        raise ValueError("run_many trains seeds of one configuration: the configs may differ in 'seed' only")
    cfg = cfgs[0]
    dev = pick_device(device)
    built = [setup(c) for c in cfgs]
    models = [m.to(dev) for _, m, _ in built]
    recs = [Recorder(c, task, m, dev) for c, (task, _, _), m in zip(cfgs, built, models)]
    params, buffers = stack_module_state(models)
    base = type(models[0])(models[0].cfg).to("meta")
    opt = make_optimizer(list(params.values()), cfg)

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    forward = vmap(one)
    S = len(cfgs)

    def sync():
        """Copy the stacked parameters into the per-seed models the recorders look at."""
        with torch.no_grad():
            for i, m in enumerate(models):
                for n, p in m.named_parameters():
                    p.copy_(params[n][i])

    t0 = time.perf_counter()
    for m, r in zip(models, recs):
        r.snapshot(m, 0)
        r.evaluate(m, 0, float("nan"))
    loss_sum, n_loss = torch.zeros(S, device=dev), 0
    q = _prefetch([t for t, _, _ in built], [g for _, _, g in built], [r.rule for r in recs], cfg["batch_size"],
                  cfg["steps"])
    bar = tqdm(range(1, cfg["steps"] + 1), desc=f"training {S} seeds", disable=not (progress and sys.stderr.isatty()),
               mininterval=2)
    for step in bar:
        xs, ys = q.get()
        logits = forward(params, buffers, xs.to(dev, non_blocking=True))          # (S, B, C)
        per_seed = F.cross_entropy(logits.flatten(0, 1), ys.to(dev, non_blocking=True).flatten(),
                                   reduction="none").view(S, -1).mean(1)
        opt.zero_grad(set_to_none=True)
        per_seed.sum().backward()          # seeds' parameters are disjoint: each gets its own gradient
        opt.step()
        loss_sum += per_seed.detach()
        n_loss += 1
        due = (step % cfg["snapshot_every"] == 0 or (cfg["commutator_every"] and step % cfg["commutator_every"] == 0)
               or step % cfg["eval_every"] == 0 or step == cfg["steps"])
        if not due:
            continue
        sync()
        means = (loss_sum / max(n_loss, 1)).tolist()
        rows = []
        for i, (m, r) in enumerate(zip(models, recs)):
            rows.append(r.after_step(m, step, lambda i=i: means[i]))
        if rows[0] is not None:
            for row, c in zip(rows, cfgs):
                check_finite(row, c)
            loss_sum.zero_()
            n_loss = 0
            bar.set_postfix(loss=f"{sum(r['train_loss'] for r in rows) / S:.3f}",
                            acc=" ".join(f"{sum(r[f'acc_m{m}'] for r in rows) / S:.2f}" for m in recs[0].evals))
    seconds = time.perf_counter() - t0
    out = []
    for i, (m, r) in enumerate(zip(models, recs)):
        res = r.result(m.cpu(), seconds, dev)
        res["seeds_together"] = S
        if out_dirs:
            write(res, out_dirs[i])
        out.append(res)
    return out


if __name__ == "__main__":
    print("modadd/ensemble.py is a library: train several seeds as one batched network with\n"
          "  python -m modadd.sweep --seeds 0-19 --together 20 --root runs/code -- --preset code\n"
          "(see python -m modadd.sweep --help)", file=sys.stdout if "-h" in sys.argv or "--help" in sys.argv
          else sys.stderr)
    sys.exit(0 if "-h" in sys.argv or "--help" in sys.argv else 2)
