"""The claims ledger: docs/claims.md is what scripts/claims.py writes from results/, and the verdict
rules give holds / does not hold / not measured yet on planted result files."""
import copy
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("claims", os.path.join(ROOT, "scripts", "claims.py"))
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)
from claims_list import CLAIMS, SOURCES  # noqa: E402 - scripts/ is on the path once claims.py is loaded


def by_id(i):
    return copy.deepcopy(next(c for c in CLAIMS if c["id"] == i))


def plant(root, rel, obj):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if isinstance(obj, str):
            f.write(obj)
        else:
            json.dump(obj, f)


def test_the_ledger_is_what_the_script_writes():
    with open(claims.DOC) as f:
        assert f.read() == claims.render(CLAIMS, SOURCES), "docs/claims.md is stale: python scripts/claims.py"
    assert claims.main(["--check"]) == 0


def test_check_fails_on_a_stale_ledger(tmp_path, capsys):
    stale = tmp_path / "claims.md"
    stale.write_text(claims.render(CLAIMS, SOURCES).replace("| holds |", "| does not hold |", 1))
    assert claims.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert claims.main(["--check", "--out", str(tmp_path / "absent.md")]) == 1
    assert claims.main(["--out", str(stale)]) == 0 and claims.main(["--check", "--out", str(stale)]) == 0


def test_the_list_is_well_formed_and_covers_every_line():
    claims.check_list(CLAIMS, SOURCES)
    assert len(CLAIMS) >= 40
    assert {c["line"] for c in CLAIMS} == {line for line, _ in claims.LINES}
    for c in CLAIMS:
        for rel in c.get("evidence", {}).values():
            assert not os.path.isabs(rel) and ".." not in rel.split("/"), (c["id"], rel)
    bad = by_id("M2")
    del bad["measure_with"]
    with pytest.raises(ValueError, match="measure_with"):
        claims.check_list([bad], SOURCES)
    with pytest.raises(ValueError, match="used twice"):
        claims.check_list([by_id("M2"), by_id("M2")], SOURCES)


def test_every_verdict_uses_the_vocabulary():
    with pytest.raises(ValueError):
        claims.kind("roughly true")
    assert claims.kind("holds only at k = 100") == "holds only at / in part"
    assert claims.kind("does not hold: x") == "does not hold"
    kinds = {claims.judge(c)["kind"] for c in CLAIMS}
    assert kinds <= {name for _, name in claims.KINDS}


def published_rope(root, val, floor=8.0089, oracle=7.985):
    for run in (1, 2):
        plant(root, f"results/masked_published_rope/metrics_run{run}.json", {"val_mse": val, "noise_floor": floor})
    plant(root, "results/masked_published_rope/oracle.json", {"masked": {"val": {"oracle_mse": oracle}}})


def test_a_threshold_rule_against_a_reference_key(tmp_path):
    """M2: the best validation MSE against the noise floor recorded in the same file."""
    published_rope(tmp_path, val=8.0)
    assert claims.judge(by_id("M2"), str(tmp_path))["kind"] == "holds"
    published_rope(tmp_path, val=8.45)
    j = claims.judge(by_id("M2"), str(tmp_path))
    assert j["kind"] == "does not hold" and "+5.5% over the floor" in j["verdict"] and "+0.46" in j["verdict"]
    published_rope(tmp_path, val=8.0, floor=7.0)         # the reference moves, the verdict follows it
    assert claims.judge(by_id("M2"), str(tmp_path))["kind"] == "does not hold"


def test_a_missing_file_or_key_is_not_measured_yet(tmp_path):
    j = claims.judge(by_id("M2"), str(tmp_path))
    assert j["kind"] == "not measured yet" and "does not exist" in j["verdict"]
    assert by_id("M2")["measure_with"] in j["verdict"] and j["measured"] == "—"
    published_rope(tmp_path, val=8.0)
    plant(tmp_path, "results/masked_published_rope/oracle.json", {"masked": {}})
    j = claims.judge(by_id("M2"), str(tmp_path))
    assert j["kind"] == "not measured yet" and "o:masked.val.oracle_mse" in j["verdict"]


def test_a_row_for_a_future_run_turns_into_a_verdict_once_its_file_exists(tmp_path):
    """A20 names results/modadd_paper_cpu/report.json; its verdict follows the planted r90, its null and
    whether the model learned the task at all."""
    tmp = tmp_path / "empty"
    assert claims.judge(by_id("A20"), str(tmp))["kind"] == "not measured yet"
    traj = {f"L{i}.W_Q": {"r90": {"mean": r}, "null_r90_mean": {"mean": 5.5}} for i, r in enumerate((2, 3, 2))}
    learned = {f"acc_m{m}": {"mean": 0.9} for m in range(1, 5)}

    def judge(acc):
        plant(tmp_path, "results/modadd_paper_cpu/report.json",
              {"n_seeds": 3, "trajectory": {"summary": traj}, "final_accuracy": acc})
        return claims.judge(by_id("A20"), str(tmp_path))

    assert judge(learned)["verdict"] == "holds"
    traj["L0.W_Q"]["r90"]["mean"] = 9
    assert judge(learned)["kind"] == "holds only at / in part"
    for t in traj.values():
        t["r90"]["mean"] = 6
    assert judge(learned)["kind"] == "does not hold"
    for t in traj.values():
        t["r90"]["mean"] = 1.5                         # a collapse without learning is no evidence for it
    j = judge({f"acc_m{m}": {"mean": 0.13} for m in range(1, 5)})
    assert j["kind"] == "does not hold" and "does not learn the task" in j["verdict"]


def test_an_interval_rule(tmp_path):
    """A12: depleted (holds) only when the whole interval of the ratio to a random subspace is below 1."""
    def report(lo, mean, hi):
        s = {k: {"mean": 0.01} for k in ("final_rho_exec", "final_rho_random")}
        s["ratio_random"] = {"mean": mean, "lo": lo, "hi": hi}
        s["ratio_block_matched"] = {"mean": mean, "lo": lo, "hi": hi}
        plant(tmp_path, "results/modadd_code_gpu10/plots/report.json", {"commutators": {"summary": s}})
        return claims.judge(by_id("A12"), str(tmp_path))["kind"]
    assert report(0.2, 0.4, 0.8) == "holds"
    assert report(0.5, 1.0, 1.5) == "does not hold"
    assert "not depleted" in claims.judge(by_id("A12"), str(tmp_path))["verdict"]
    assert report(3.6, 4.0, 4.5) == "does not hold"
    assert "more commutator" in claims.judge(by_id("A12"), str(tmp_path))["verdict"]


def test_csv_globs_and_wildcards(tmp_path):
    plant(tmp_path, "results/x/log.csv", "epoch,val_mse\n1,20\n2,9.5\n3,8.5\n4,9.0\n")
    for s in (0, 1):
        plant(tmp_path, f"results/x/s{s}/b.json", {"per_m": {"1": {"h": [1.0, 2.0]}, "2": {"h": [3.0 + s]}}})
    row = dict(id="X1", line="modadd", claim="c", source="modadd x", measure_with="cmd",
               evidence={"log": "results/x/log.csv", "b": "results/x/s*/b.json"},
               values={"e": ["first_below", "log:val_mse", 9.0], "best": ["argmin", "log:val_mse"],
                       "h": ["mean", "b:*.per_m.*.h.*"], "dec": ["decreasing", ["slice", "log:val_mse", 0, 3]]},
               measured="{e} {best} {h:.2f} {dec}", rules=[(["and", ["==", "e", 3], "dec"], "holds")],
               otherwise="does not hold")
    j = claims.judge(row, str(tmp_path))
    assert j["measured"] == "3 2 2.17 yes" and j["verdict"] == "holds"
    row["evidence"]["log"] = "results/x/other.csv"
    assert claims.judge(row, str(tmp_path))["kind"] == "not measured yet"


def test_element_wise_operations_over_globbed_files(tmp_path):
    for s, (u, w) in enumerate(((0.2, 0.25), (0.3, 0.31))):
        plant(tmp_path, f"results/y/split{s}/m.json", {"u": u, "rows": [{"w": w}]})
    row = dict(id="X2", line="terrain", claim="c", source="notebook x", measure_with="cmd",
               evidence={"m": "results/y/split*/m.json"},
               values={"g": ["vsub", "m:*.rows.0.w", "m:*.u"], "r": ["vdiv", "g", "m:*.u"],
                       "lo": ["min", "g"], "hi": ["max", "r"]},
               measured="{g:.2f}; {lo:.2f} {hi:.2f}", rules=[([">", "lo", 0.005], "holds")], otherwise="does not hold")
    j = claims.judge(row, str(tmp_path))
    assert j["measured"] == "0.05 / 0.01; 0.01 0.25" and j["verdict"] == "holds"
    plant(tmp_path, "results/y/split1/m.json", {"u": 0.3, "rows": [{"w": 0.3}]})
    assert claims.judge(row, str(tmp_path))["verdict"] == "does not hold"
    with pytest.raises(ValueError, match="two lists of one length"):
        claims.OPS["vsub"]([1.0], [1.0, 2.0])


def test_prose_rows_say_their_run_is_not_recorded():
    prose = [c for c in CLAIMS if "prose" in c]
    assert prose
    text = claims.render(prose[:1], SOURCES)
    assert claims.PROSE in text and "from an unrecorded run; to record it:" in text
    assert "(README prose; run not recorded)" in text.split("## ", 1)[0]   # counted apart in the summary
