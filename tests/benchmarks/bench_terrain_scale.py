"""terrain.weights at real scale: the full streamed battery (every block, every head, with nulls)
on a checkpoint with a real model's exact shapes and random bfloat16 weights.

    python tests/benchmarks/bench_terrain_scale.py                         # Llama-3.2-1B shapes (~1.2B)
    python tests/benchmarks/bench_terrain_scale.py --shape t5-v1_1-xxl     # T5 v1.1 XXL shapes (11B, 22 GB)

The checkpoint is written as sharded safetensors (<= 5 GB a shard, with an index) into a
temporary folder outside the repository, tensor by tensor (the writer never holds a shard),
and removed afterwards unless --keep. The battery runs in a child process; its wall time and
peak resident memory (getrusage of the child) are recorded. Targets for T5 v1.1 XXL on 2 cores:
<= 60 minutes, <= 4 GB peak resident memory.
"""
import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from common import ROOT, report

SHAPES = {
    # the published config of google/t5-v1_1-xxl
    "t5-v1_1-xxl": ("t5", dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                               num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                               tie_word_embeddings=False)),
    # the published config of meta-llama/Llama-3.2-1B
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, num_hidden_layers=16, vocab_size=128256,
                               tie_word_embeddings=True)),
}
TARGETS = {"t5-v1_1-xxl": (3600.0, 4.0)}  # seconds, GB
SHARD_BYTES = 5 << 30


def parameter_shapes(family: str, kw: dict):
    """(config, [(name, shape)]) of the model built on the meta device (no memory)."""
    import torch
    import transformers as tf
    cfg = tf.T5Config(**kw) if family == "t5" else tf.LlamaConfig(**kw)
    cls = tf.T5ForConditionalGeneration if family == "t5" else tf.LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    # tied copies are stored once: T5's encoder/decoder embed_tokens are `shared`; a tied lm_head
    drop = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} if family == "t5" else set()
    if cfg.tie_word_embeddings:
        drop.add("lm_head.weight")
    shapes = [s for s in shapes if s[0] not in drop]
    return cfg, shapes


def write_checkpoint(folder: str, family: str, kw: dict, seed: int = 0) -> int:
    """Random N(0, 0.02^2) bfloat16 weights (norm scales 1) as safetensors shards + index."""
    import numpy as np
    import torch
    cfg, shapes = parameter_shapes(family, kw)
    cfg.save_pretrained(folder)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * int(np.prod(shape))
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in shard:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape in shard:
                numel = int(np.prod(shape))
                ones = "norm" in name or "layernorm" in name
                for a in range(0, numel, 1 << 26):
                    m = min(1 << 26, numel - a)
                    x = torch.ones(m) if ones else torch.randn(m, generator=gen) * 0.02
                    f.write(x.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                total += numel
        print(f"  wrote {fname} ({off / 2**30:.1f} GB)", flush=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, f)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES), help="whose published shapes to write")
    p.add_argument("--dir", default=None, help="parent of the temporary checkpoint folder (default: the system "
                                               "temporary folder, outside the repository)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the battery")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    p.add_argument("--reuse", default=None, help="a checkpoint folder an earlier --keep run wrote for this "
                                                 "--shape (skips writing; never removed)")
    args = p.parse_args()
    family, kw = SHAPES[args.shape]
    folder = args.reuse or tempfile.mkdtemp(prefix=f"terrain-{args.shape}-", dir=args.dir)
    out = tempfile.mkdtemp(prefix="terrain-scale-out-")
    try:
        t = time.perf_counter()
        if args.reuse:
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                n_params = json.load(f)["metadata"]["total_size"] // 2
        else:
            n_params = write_checkpoint(folder, family, kw)
        t_write = time.perf_counter() - t
        print(f"{args.shape}: {n_params / 1e9:.2f}B parameters, written in {t_write:.0f} s", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "terrain.weights", "--model", folder, "--out-dir", out,
                               "--device", args.device], cwd=ROOT)
        seconds = time.perf_counter() - t
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30
        if proc.returncode != 0:
            sys.exit(f"the battery failed (exit {proc.returncode})")
        res = json.load(open(next(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".json"))))
        n_heads = sum(len(h["positive_share"]) for h in res["heads_by_layer"].values())
        row = {"what": f"terrain.weights, full battery on {args.shape} shapes ({args.device})",
               "seconds": seconds, "peak_rss_gb": round(peak_gb, 2), "n_params": n_params,
               "n_matrices": len(res["matrices"]), "n_heads": n_heads, "write_seconds": round(t_write, 1),
               "null_methods": sorted({m["null"]["method"] for m in res["matrices"].values()}),
               "spectrum_methods": sorted({m["spectrum_method"] for m in res["matrices"].values()})}
        if args.shape in TARGETS:
            row["target_s"], row["target_peak_rss_gb"] = TARGETS[args.shape]
            row["meets_memory_target"] = bool(peak_gb <= row["target_peak_rss_gb"])
        print(f"peak resident memory of the battery: {peak_gb:.2f} GB; {row['n_matrices']} matrices, "
              f"{n_heads} heads")
        report(f"terrain_scale_{args.shape}" + ("_cuda" if args.device == "cuda" else ""), [row])
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
