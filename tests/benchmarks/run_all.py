"""Run every benchmark script in this folder (bench_*.py); results go to results/*.json."""
import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
only = sys.argv[1:]
failed = []
for path in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    name = os.path.basename(path)[len("bench_"):-3]
    if only and name not in only:
        continue
    print(f"== {name}", flush=True)
    if subprocess.run([sys.executable, path], cwd=here).returncode != 0:
        failed.append(name)
if failed:
    print("failed: " + ", ".join(failed))
    sys.exit(1)
