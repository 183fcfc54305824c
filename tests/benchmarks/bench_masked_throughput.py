"""Training throughput of the masked transformer (forward + backward + AdamW step), in
tokens per second, for each positional scheme.

CPU (default): seq 256, 4 layers, d_model 128, batch 32, fp32.
CUDA (--cuda): the published configuration, seq 1024, 7 layers, batch 128, BF16 autocast and
torch.compile, plus the implied epoch time on 200k steps with stride 64.
"""
import argparse
import time

import torch
from common import report

from masked_model_gpu import MaskedTransformer, ModelConfig, masked_mse
from training import autocast


def throughput(pe, seq, layers, batch, device, amp, compile_, steps, warmup):
    torch.manual_seed(0)
    model = MaskedTransformer(ModelConfig(n_layers=layers, pos_encoding=pe, t5_num_buckets=64,
                                          t5_max_distance=1024)).to(device)
    run = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, seq, 20, device=device)
    mask = torch.rand(batch, seq, device=device) < 0.15

    def step():
        with autocast(device, amp):
            pred = run(x, mask)
        sse, n = masked_mse(pred, x, mask)
        opt.zero_grad(set_to_none=True)
        (sse / n).backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args()
    rows = []
    if args.cuda:
        dev = torch.device("cuda")
        seq, layers, batch = 1024, 7, 128
        windows = (int(200_000 * 0.8) - seq) // 64 + 1
        for pe in ("sinusoidal", "t5", "rope"):
            s = throughput(pe, seq, layers, batch, dev, True, True, steps=20, warmup=5)
            rows.append({"what": f"{pe}: seq {seq}, {layers} layers, batch {batch}, BF16 + compile, "
                                 f"{batch * seq / s:,.0f} tokens/s, epoch of {windows} windows "
                                 f"{s * windows / batch:.1f} s", "seconds": s, "tokens_per_s": batch * seq / s,
                         "epoch_seconds_200k_stride64": s * windows / batch, "device": torch.cuda.get_device_name(0)})
        report("masked_throughput_cuda", rows)
        return
    dev = torch.device("cpu")
    for pe in ("sinusoidal", "t5", "rope"):
        s = throughput(pe, 256, 4, 32, dev, False, False, steps=5, warmup=1)
        rows.append({"what": f"{pe}: seq 256, 4 layers, batch 32, fp32 CPU, {32 * 256 / s:,.0f} tokens/s",
                     "seconds": s, "tokens_per_s": 32 * 256 / s, "threads": torch.get_num_threads()})
    report("masked_throughput_cpu", rows)


if __name__ == "__main__":
    main()
