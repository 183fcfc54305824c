"""Helpers for the benchmark scripts: machine description, timing, result files."""
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def best_of(fn, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def report(name: str, rows: list[dict]) -> str:
    """Print rows with their target verdicts and write results/<name>.json."""
    os.makedirs(RESULTS, exist_ok=True)
    for r in rows:
        verdict = ""
        if "target_s" in r:
            r["meets_target"] = bool(r["seconds"] <= r["target_s"])
            verdict = f"  (target <= {r['target_s']} s: {'PASS' if r['meets_target'] else 'FAIL'})"
        print(f"{name}: {r['what']}: {r['seconds']:.2f} s{verdict}")
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "machine": machine(),
                   "date": time.strftime("%Y-%m-%d"), "results": rows}, f, indent=2)
    print(f"wrote {path}")
    return path
