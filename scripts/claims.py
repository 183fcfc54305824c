"""Write docs/claims.md, the ledger of the original work's claims, from the recorded result files.

    python scripts/claims.py            # (re)write docs/claims.md
    python scripts/claims.py --check    # exit 1 when docs/claims.md differs from what this writes

The claims are listed by hand in scripts/claims_list.py (its docstring describes a row); this
script reads each row's evidence files under the repository root, computes the row's named values,
and applies its verdict rules. Nothing is typed into the ledger by hand: a number in it is either
read from a file under results/ (or tests/benchmarks/results/), or the row says it comes from
prose whose run was not recorded.

A row whose evidence file does not exist yet is rendered as "not measured yet" with what would
measure it, so rows can be added before their runs. A row whose file exists but lacks a key that
the row reads says which key is missing, also as "not measured yet".
"""
import csv
import glob
import math
import os
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import cliargs  # noqa: E402 - the repository root is on the path from here on
import safeio  # noqa: E402

DOC = os.path.join(ROOT, "docs", "claims.md")

# the verdict vocabulary: every verdict a rule writes starts with one of these, longest first
KINDS = [("holds only", "holds only at / in part"), ("holds", "holds"), ("does not hold", "does not hold"),
         ("not measured yet", "not measured yet")]
LINES = [("data", "Circles data"), ("masked", "Masked-patch transformer (circles)"),
         ("mamba", "Causal Mamba (circles)"), ("terrain", "Pretrained-transformer terrain"),
         ("modadd", "Modular-addition training geometry")]
PROSE = "README prose; run not recorded"


class Missing(Exception):
    """A value a row needs is not recorded (its file or a key in it is absent)."""


# ---------------------------------------------------------------- reading evidence files

def load_file(path: str):
    """A JSON file as its object, a CSV file as {column: [values]} (numbers where they parse),
    any other file as its text."""
    if path.endswith(".json"):
        return safeio.read_json(path, "result file")
    text = safeio.read_bytes(path, "result file").decode("utf-8", errors="replace")
    if path.endswith(".csv"):
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return {}
        cols = {name: [] for name in rows[0]}
        for row in rows[1:]:
            for name, cell in zip(rows[0], row):
                cols[name].append(number(cell))
        return cols
    return text


def number(cell: str):
    try:
        return float(cell)
    except ValueError:
        return cell


def load_evidence(evidence: dict, root: str) -> dict:
    """{alias: loaded file}; a pattern with * loads every matching file as a list (sorted by name).
    Raises Missing naming the first absent file."""
    files = {}
    for alias, rel in evidence.items():
        full = os.path.join(root, rel)
        if "*" in rel:
            paths = sorted(glob.glob(full))
            if not paths:
                raise Missing(f"no file matches `{rel}`")
            files[alias] = [load_file(p) for p in paths]
        elif not os.path.isfile(full):
            raise Missing(f"`{rel}` does not exist")
        else:
            files[alias] = load_file(full)
    return files


# ---------------------------------------------------------------- values and rules

def lookup(obj, path: str, where: str):
    """Follow a dotted path; `*` maps over every value of a dict or item of a list (flattening),
    an integer indexes a list (negative from the end)."""
    items, many = [obj], False
    for part in path.split(".") if path else []:
        nxt = []
        for o in items:
            if part == "*":
                vals = list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, list) else None
                if vals is None:
                    raise Missing(f"`{where}`: `*` on a {type(o).__name__}")
                nxt += vals
            elif isinstance(o, dict) and part in o:
                nxt.append(o[part])
            elif isinstance(o, list) and part.lstrip("-").isdigit() and -len(o) <= int(part) < len(o):
                nxt.append(o[int(part)])
            else:
                raise Missing(f"`{where}` is not in the file")
        many |= part == "*"
        items = nxt
    if many:
        if not items:
            raise Missing(f"`{where}` matches nothing")
        return items
    return items[0]


def as_list(args):
    return list(args[0]) if len(args) == 1 and isinstance(args[0], list) else list(args)


def finite(x):
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _first_below(xs, thr):
    return next((i + 1 for i, x in enumerate(xs) if finite(x) and x < thr), None)


def _pairwise(a, b, f):
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        raise ValueError(f"an element-wise operation needs two lists of one length, not {a!r} and {b!r}")
    return [f(x, y) for x, y in zip(a, b)]


def _cmp(f):
    return lambda a, b: (a is not None and b is not None) and f(a, b)


OPS = {
    "mean": lambda *a: sum(as_list(a)) / len(as_list(a)),
    "min": lambda *a: min(as_list(a)), "max": lambda *a: max(as_list(a)),
    "sum": lambda *a: sum(as_list(a)), "len": lambda xs: len(xs),
    "first": lambda xs: xs[0], "last": lambda xs: xs[-1], "list": lambda *a: list(a),
    "slice": lambda xs, lo, hi=None: xs[lo:hi], "at": lambda xs, i: xs[int(i)],
    "argmax": lambda xs: max(range(len(xs)), key=xs.__getitem__),
    "argmin": lambda xs: min(range(len(xs)), key=xs.__getitem__),
    "first_below": _first_below,          # 1-based position of the first element under a threshold
    "decreasing": lambda xs: all(a > b for a, b in zip(xs, xs[1:])),
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "abs": abs,
    "vsub": lambda a, b: _pairwise(a, b, lambda x, y: x - y),     # element by element, lists of one length
    "vdiv": lambda a, b: _pairwise(a, b, lambda x, y: x / y),
    "contains": lambda text, needle: isinstance(text, str) and needle in text,
    "<": _cmp(lambda a, b: a < b), "<=": _cmp(lambda a, b: a <= b), ">": _cmp(lambda a, b: a > b),
    ">=": _cmp(lambda a, b: a >= b), "==": _cmp(lambda a, b: a == b), "!=": _cmp(lambda a, b: a != b),
    "not": lambda a: not a,
}


def evaluate(expr, files: dict, named: dict):
    """A number, a name of an earlier value, `alias:dotted.path` (`dotted.path` when the row has one
    file), or [op, arg, ...] with op in OPS, "and" or "or"."""
    if expr is None or isinstance(expr, (bool, int, float)):
        return expr
    if isinstance(expr, str):
        if expr in named:
            return named[expr]
        alias, sep, path = expr.partition(":")
        if not sep:
            if len(files) != 1:
                raise KeyError(f"`{expr}` names no value and the row has {len(files)} files: write alias:path")
            alias, path = next(iter(files)), expr
        if alias not in files:
            raise KeyError(f"`{expr}`: the row has no evidence file `{alias}`")
        return lookup(files[alias], path, expr)
    op, *args = expr
    if op == "and":
        return all(evaluate(a, files, named) for a in args)
    if op == "or":
        return any(evaluate(a, files, named) for a in args)
    if op == "contains":                  # the needle is literal text, never a path
        return OPS[op](evaluate(args[0], files, named), args[1])
    if op not in OPS:
        raise KeyError(f"unknown operation {op!r} in {expr!r}")
    return OPS[op](*(evaluate(a, files, named) for a in args))


class Fmt(string.Formatter):
    """str.format with lists joined by ' / ', None shown as n/a and booleans as yes/no."""

    def format_field(self, value, spec):
        if isinstance(value, list):
            return " / ".join(self.format_field(v, spec) for v in value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return super().format_field(value, spec)


def fmt(template: str, named: dict) -> str:
    return Fmt().vformat(template, (), named)


def kind(verdict: str) -> str:
    for prefix, name in KINDS:
        if verdict.startswith(prefix):
            return name
    raise ValueError(f"a verdict must start with one of {[p for p, _ in KINDS]}: {verdict!r}")


def not_measured(claim: dict, why: str = "") -> str:
    what = claim.get("measure_with", "no command is named yet")
    return f"not measured yet{f' ({why})' if why else ''}: {what}"


def judge(claim: dict, root: str = ROOT) -> dict:
    """The row's rendered cells: measured, reference, verdict, kind, evidence status."""
    if "prose" in claim:
        p = claim["prose"]
        verdict = p["verdict"]
        return {"measured": p["measured"], "reference": p.get("reference", claim.get("null", "")),
                "verdict": f"{verdict} (from an unrecorded run; to record it: {claim['measure_with']})",
                "kind": kind(verdict), "prose": True}
    if not claim.get("evidence"):
        verdict = not_measured(claim)
        return {"measured": "—", "reference": claim.get("null", "—"), "verdict": verdict, "kind": kind(verdict)}
    try:
        files = load_evidence(claim["evidence"], root)
        named = {}
        for name, expr in claim.get("values", {}).items():
            named[name] = evaluate(expr, files, named)
        verdict = next((fmt(v, named) for cond, v in claim["rules"] if evaluate(cond, files, named)),
                       None) or fmt(claim["otherwise"], named)
        return {"measured": fmt(claim["measured"], named),
                "reference": fmt(claim.get("reference", claim.get("null", "—")), named),
                "verdict": verdict, "kind": kind(verdict)}
    except Missing as e:
        verdict = not_measured(claim, str(e))
        return {"measured": "—", "reference": claim.get("null", "—"), "verdict": verdict, "kind": kind(verdict)}


# ---------------------------------------------------------------- the document

def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def evidence_cell(claim: dict, root: str) -> str:
    if "prose" in claim:
        page = claim.get("details")
        return PROSE + (f" ([{page}]({page}))" if page else "")
    out = []
    for rel in claim.get("evidence", {}).values():
        there = glob.glob(os.path.join(root, rel)) if "*" in rel else os.path.isfile(os.path.join(root, rel))
        out.append(f"[`{rel}`](../{rel})" if there and "*" not in rel else f"`{rel}`" if there
                   else f"`{rel}` (not there yet)")
    return "<br>".join(out) or "—"


def render(claims: list, sources: dict, root: str = ROOT) -> str:
    judged = [(c, judge(c, root)) for c in claims]
    counts = {}
    for c, j in judged:
        key = j["kind"] + (" (README prose; run not recorded)" if j.get("prose") else "")
        counts[key] = counts.get(key, 0) + 1
    out = ["# Claims ledger: what the original work claims, and what we measured", "",
           "[Back to the README](../README.md)", "",
           "Every claim that the original code's four documents make, one row each, with what this project "
           "measured, the reference beside it and the verdict. **This page is written by "
           "`python scripts/claims.py`** from the result files named in the evidence column and the hand-written "
           "list in `scripts/claims_list.py` (claim, source, the keys that answer it, the verdict rule); "
           "`python scripts/claims.py --check` fails when this page is out of date (tests/test_claims.py runs it). "
           "Do not edit it by hand.", "",
           "A verdict starts with *holds*, *holds only ...* (at a scale, a neighbourhood size, a checkpoint, or in "
           "part), *does not hold*, or *not measured yet* (followed by what would measure it). Rows marked "
           f"*{PROSE}* quote numbers from the detail pages whose run folders are not in the repository: their "
           "verdicts are not checked by the script, and the command that would record them is named. Sources: "
           + "; ".join(f"**{k}** = {v}" for k, v in sources.items()) + ".", "",
           "| verdict | rows |", "|---|---|"]
    out += [f"| {k} | {n} |" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    out += [f"| all | {len(judged)} |", ""]
    for line, title in LINES:
        rows = [(c, j) for c, j in judged if c["line"] == line]
        if not rows:
            continue
        out += [f"## {title}", "",
                "| id | claim | source | measured | reference | seeds, scale | verdict | evidence |",
                "|---|---|---|---|---|---|---|---|"]
        for c, j in rows:
            out.append("| " + " | ".join(cell(x) for x in (
                c["id"], c["claim"], c["source"], j["measured"], j["reference"],
                c.get("scale", "—"), j["verdict"])) + " | " + evidence_cell(c, root) + " |")
        out.append("")
    out += ["---", "[Back to the README](../README.md)", ""]
    return "\n".join(out)


def check_list(claims: list, sources: dict) -> None:
    """The hand-written list is well formed: unique ids, known lines and sources, the fields each
    kind of row needs."""
    seen = set()
    for c in claims:
        where = f"claim {c.get('id')!r}"
        for field in ("id", "line", "claim", "source"):
            if not c.get(field):
                raise ValueError(f"{where}: field {field!r} is missing")
        if c["id"] in seen:
            raise ValueError(f"{where}: the id is used twice")
        seen.add(c["id"])
        if c["line"] not in dict(LINES):
            raise ValueError(f"{where}: line must be one of {list(dict(LINES))}")
        if c["source"].split(" ", 1)[0] not in sources:
            raise ValueError(f"{where}: the source must start with one of {list(sources)}")
        if "prose" in c:
            kind(c["prose"]["verdict"])
            if not c.get("measure_with"):
                raise ValueError(f"{where}: a prose row names the command that would record it (measure_with)")
        elif c.get("evidence"):
            for field in ("measured", "rules", "otherwise"):
                if field not in c:
                    raise ValueError(f"{where}: a row with evidence needs {field!r}")
            if not c.get("measure_with"):
                raise ValueError(f"{where}: name what writes the evidence (measure_with)")
        elif not c.get("measure_with"):
            raise ValueError(f"{where}: a row without evidence names what would measure it (measure_with)")


def build_parser():
    p = cliargs.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the ledger file differs from what this script writes")
    p.add_argument("--out", default="docs/claims.md",
                   help="the ledger file to write or check (a relative path is below the repository root)")
    return p


@safeio.one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.out = os.path.join(ROOT, args.out)           # an absolute path stays as it is
    from claims_list import CLAIMS, SOURCES
    check_list(CLAIMS, SOURCES)
    text = render(CLAIMS, SOURCES)
    if args.check:
        old = open(args.out).read() if os.path.exists(args.out) else None
        if old != text:
            print(f"{os.path.relpath(args.out)} is out of date: run python scripts/claims.py", file=sys.stderr)
            return 1
        print(f"{os.path.relpath(args.out)} is up to date ({len(CLAIMS)} claims)")
        return 0
    safeio.write_text(args.out, text)
    print(f"wrote {os.path.relpath(args.out)} ({len(CLAIMS)} claims)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
