"""Does BF16 autocast speed a training step on this CPU (it has AVX512-BF16)?

The demo recipes of both models (masked: seq 256, 4 layers, d_model 64, d_ff 256, batch 32;
Mamba: seq 256, 4 layers, d_model 64, d_state 16, d_ff 256, batch 16), one forward + backward +
AdamW step, fp32 against torch.autocast("cpu", bfloat16). The speed ratio decides; whether it
hurts the result is measured by short trainings of the same recipe (--train: a few minutes each).
"""
import argparse
import time

import torch
from common import machine, report  # noqa: F401

from mamba_next import MambaConfig, MambaNext, multi_horizon_loss
from masked_model_gpu import MaskedTransformer, ModelConfig, masked_mse


def step_time(kind: str, bf16: bool, steps: int = 6, warmup: int = 2) -> float:
    torch.manual_seed(0)
    if kind == "masked":
        model = MaskedTransformer(ModelConfig(d_model=64, n_heads=4, n_layers=4, d_ff=256, dropout=0.1,
                                              attn_dropout=0.0, pos_encoding="rope"))
        x, mask = torch.randn(32, 256, 20), torch.rand(32, 256) < 0.15
    else:
        model = MambaNext(MambaConfig(d_model=64, n_layers=4, d_state=16, d_ff=256))
        x, mask = torch.randn(16, 256, 20), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            if kind == "masked":
                sse, n = masked_mse(model(x, mask), x, mask)
                loss = sse / n
            else:
                loss = multi_horizon_loss(model(x, all_horizons=True), x, model.cfg.horizons)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.parse_args()
    rows = []
    for kind in ("masked", "mamba"):
        fp32, bf16 = step_time(kind, False), step_time(kind, True)
        rows.append({"what": f"{kind} demo recipe, one training step: fp32 {fp32:.3f} s, BF16 autocast {bf16:.3f} s "
                             f"(x{fp32 / bf16:.2f})", "seconds": bf16, "fp32_seconds": fp32,
                     "speedup": fp32 / bf16, "threads": torch.get_num_threads(),
                     "cpu_bf16": torch.backends.mkldnn.is_available()})
    report("cpu_bf16", rows)


if __name__ == "__main__":
    main()
