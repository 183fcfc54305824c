"""The weight battery on a real GGUF decoder: SmolLM2-135M-Instruct (Q4_1, 30 layers, 9 query heads and
3 key-value heads; `make models`), streamed tensor by tensor from the GGUF file and dequantised, with the
float and the quantised Gaussian nulls. Wall time and peak resident memory of the process, each stage in a
fresh process (target: the battery within 10 minutes and 2 GB on 2 cores)."""
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import ROOT, report


def run(args: list[str]) -> tuple[float, float]:
    """Seconds and peak resident memory (MB) of one command in a fresh process."""
    code = ("import resource, sys, runpy; sys.argv = sys.argv[1:]; "
            "rc = 0\ntry:\n    runpy.run_module(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
            "    rc = e.code or 0\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    s = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
    peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK_KB")][-1]
    return s, int(peak.split()[1]) / 1024


def main():
    try:
        from terrain.models import smollm2_path
        smollm2_path()
    except Exception as e:  # noqa: BLE001 - the optional model is not installed
        print(f"terrain_smollm2: skipped ({e})")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage, extra in (("terrain.weights", []), ("terrain.embeddings", [])):
            s, mb = run([stage, "--model", "smollm2", "--out-dir", os.path.join(tmp, stage), "--no-plot"] + extra)
            rows.append({"what": f"{stage} on SmolLM2 (GGUF Q4_1), peak {mb:.0f} MB", "seconds": s,
                         "peak_mb": mb, **({"target_s": 600.0} if stage == "terrain.weights" else {})})
    report("terrain_smollm2", rows)


if __name__ == "__main__":
    main()
