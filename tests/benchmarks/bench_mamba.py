"""Mamba speed.

1. One layer (d_model 128, d_state 32, expand 2), batch 8 x 1024 steps, forward + backward
   with our pure-PyTorch scan (target 2 s on 2 CPU cores). --cuda: the same step with
   mamba_ssm's kernel and with our scan on the GPU.
2. Generation: 2,048 steps from the original 7-layer model with the recurrent state (target
   10 s on 2 CPU cores), and the ratio against recomputing the whole sequence at every
   step, both measured over the first 256 generated steps.
"""
import argparse
import time

import torch
from common import best_of, report

from mamba_next import MambaConfig, MambaNext, generate, generate_recompute
from selective_scan import MambaBlock, cuda_kernels_available


def layer_step(block, x, trace=None):
    y = block(x, trace)
    y.square().mean().backward()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.cuda:
        dev = torch.device("cuda")
        block = MambaBlock(128, 32, 4, 2).to(dev)
        x = torch.randn(8, 1024, 128, device=dev)

        def timed(trace):
            layer_step(block, x, trace)
            torch.cuda.synchronize()
        timed(None)
        if cuda_kernels_available():
            rows.append({"what": "one layer fwd+bwd, 8 x 1024, mamba_ssm CUDA kernel",
                         "seconds": best_of(lambda: timed(None), 5)})
        rows.append({"what": "one layer fwd+bwd, 8 x 1024, our scan on CUDA",
                     "seconds": best_of(lambda: timed({}), 5)})
        report("mamba_cuda", rows)
        return
    block = MambaBlock(128, 32, 4, 2)
    x = torch.randn(8, 1024, 128)
    layer_step(block, x)
    rows.append({"what": "one layer fwd+bwd, d_model 128, d_state 32, expand 2, 8 x 1024 steps (best of 3)",
                 "seconds": best_of(lambda: layer_step(block, x), 3), "target_s": 2.0})
    model = MambaNext(MambaConfig(d_model=128, n_layers=7, d_state=32)).eval()
    seed = torch.randn(64, 20)
    t = time.perf_counter()
    generate(model, seed, 2048)
    rows.append({"what": "generate 2,048 steps, 7 layers, d_state 32, recurrent state",
                 "seconds": time.perf_counter() - t, "target_s": 10.0})
    fast = best_of(lambda: generate(model, seed, 256), 2)
    t = time.perf_counter()
    generate_recompute(model, seed, 256)
    slow = time.perf_counter() - t
    rows.append({"what": f"256 steps: recurrent {fast:.2f} s vs recomputing the sequence {slow:.1f} s "
                         f"(x{slow / fast:.0f}; the gap grows linearly with length)",
                 "seconds": slow, "recurrent_seconds": fast, "ratio": slow / fast})
    report("mamba", rows)


if __name__ == "__main__":
    main()
