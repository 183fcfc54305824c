"""Command-line conventions shared by every script: one-line errors, numeric flags that
declare their valid range, and one meaning for the output flags.

``Parser`` is an argparse.ArgumentParser whose errors are one line on stderr ("error:
argument --d-model: must be an integer >= 1, got 0; see --help") with exit status 2,
instead of a usage block. The type factories below check a flag's range when it is parsed,
so an impossible value never reaches the code; each carries its range (``.bounds``), which
the tests read to check that every numeric flag of every command declares one.

    p = Parser(description=...)
    p.add_argument("--epochs", type=at_least(1), default=100)
    p.add_argument("--mask-ratio", type=between(0, 1, open_lo=True, open_hi=True), default=0.15)

Outputs, the same in every command (``add_output_flags``): ``--out-dir`` holds the numbers
(JSON/CSV, arrays; checkpoints for training), ``--plots-dir`` the figures, by default
``plots/<name>`` (``default_plots_dir``), and ``--no-plot`` draws nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import safeio


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help unless it is None or False: a computed default
    ("default: the preset's") is said in the help text, never as "(default: None)"."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """DefaultsFormatter that keeps the description's own line breaks."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser with one-line errors and visible defaults in --help."""

    def __init__(self, *args, **kwargs):
        fmt = kwargs.get("formatter_class")
        if fmt is None or fmt is argparse.ArgumentDefaultsHelpFormatter:
            kwargs["formatter_class"] = DefaultsFormatter
        elif fmt is argparse.RawDescriptionHelpFormatter:
            kwargs["formatter_class"] = RawDefaultsFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class Bounded:
    """An int or float converter that refuses values outside [lo, hi] (or the open ends)."""

    def __init__(self, kind: type, lo=None, hi=None, open_lo: bool = False, open_hi: bool = False,
                 allow: tuple = ()):
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi, self.allow = kind, lo, hi, open_lo, open_hi, allow
        self.bounds = (lo, hi, open_lo, open_hi)
        self.__name__ = self.describe()  # argparse names the type in "invalid <name> value"

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.open_lo else '>='} {self.lo}")
        if self.hi is not None:
            parts.append(f"{'<' if self.open_hi else '<='} {self.hi}")
        text = f"{noun} {' and '.join(parts)}" if parts else noun
        if self.allow:
            text += " (or " + ", ".join(str(a) for a in self.allow) + ")"
        return text

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if value in self.allow:
            return value
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        bad = ((self.lo is not None and (value < self.lo or (self.open_lo and value == self.lo)))
               or (self.hi is not None and (value > self.hi or (self.open_hi and value == self.hi))))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value

    def __repr__(self) -> str:
        return self.describe()


def at_least(lo: int, allow: tuple = ()) -> Bounded:
    """An integer >= lo (counts, sizes, lengths, indices); `allow` adds sentinel values such as -1."""
    return Bounded(int, lo, allow=allow)


def int_between(lo: int, hi: int) -> Bounded:
    return Bounded(int, lo, hi)


def positive(kind: type = float) -> Bounded:
    """A number > 0 (learning rates, scales, budgets)."""
    return Bounded(kind, 0, open_lo=True)


def non_negative(kind: type = float) -> Bounded:
    """A number >= 0 (weight decay, dropout-free rates, noise)."""
    return Bounded(kind, 0)


def between(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> Bounded:
    """A float in [lo, hi], with either end open (fractions, probabilities)."""
    return Bounded(float, lo, hi, open_lo, open_hi)


def any_number(kind: type = float) -> Bounded:
    """A finite number of any sign (declares that every finite value is meaningful)."""
    return Bounded(kind)


SEED = at_least(0)  # numpy's SeedSequence refuses negative seeds


PLOTS_ROOT = "plots"  # figures go below it by default; the environment variable PLOTS_ROOT moves it
RUNS_ROOT = "runs"
PLOTS_HELP = ("where the figures go (default plots/<name>, <name> being the --out-dir's path below runs/, "
              "else below the current folder, else its last two folder names: runs/a/gates -> plots/a/gates, "
              "data -> plots/data)")
NO_PLOT_HELP = "write the numbers only: no figures"


def _below(path: str, root: str) -> str | None:
    rel = os.path.relpath(path, os.path.abspath(root))
    return None if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def default_plots_dir(out_dir: str) -> str:
    """The one default of --plots-dir: plots/<name>, where <name> is out_dir's path below runs/
    (runs/bert/generate -> plots/bert/generate), else below the current folder (data -> plots/data),
    else its last two folder names (/tmp/x/run1/gates -> plots/run1/gates: two, so that the
    generate/gates/eval folders of different runs do not share one). An out_dir inside plots/ holds
    its figures too.
    The environment variable PLOTS_ROOT, when set, replaces plots/ (the tests point it at a tmp folder)."""
    root = os.environ.get("PLOTS_ROOT") or PLOTS_ROOT
    out = os.path.abspath(out_dir)
    name = (_below(out, root) or _below(out, RUNS_ROOT) or _below(out, os.curdir)
            or os.path.join(os.path.basename(os.path.dirname(out)), os.path.basename(out)))
    return os.path.join(root, name)


def add_output_flags(p: argparse.ArgumentParser, out_default, out_help: str, figures: bool = True) -> None:
    """--out-dir (numbers) and, for a command that draws, --plots-dir and --no-plot, worded alike everywhere."""
    p.add_argument("--out-dir", default=out_default, help=out_help)
    if figures:
        p.add_argument("--plots-dir", default=None, help=PLOTS_HELP)
        p.add_argument("--no-plot", action="store_true", help=NO_PLOT_HELP)


def plots_dir(args, out_dir: str | None = None) -> str:
    """The figures folder of a parsed command: --plots-dir, else the default for its --out-dir
    (or for out_dir, when the command computes its output folder)."""
    return args.plots_dir or default_plots_dir(out_dir or args.out_dir)


OutputsExist = safeio.OutputsExist  # earlier outputs a command would replace, without --force (a ValueError)


def claim_outputs(paths: list[str], force: bool, key: str | None = None) -> list[str]:
    """Nothing overwritten without --force: earlier outputs among paths stop a command
    (OutputsExist naming the first and the fix); with force they are removed first, so none of
    them survives beside the new outputs of a run that does not write it again. With key, what
    the same command recorded in those folders before counts too (safeio.Outputs)."""
    return safeio.Outputs(key, force).claim(paths)


def resolve_device(name: str) -> str:
    """The one reading of --device: 'auto' -> 'cuda' when torch sees a CUDA device, else 'cpu';
    'cuda' (or 'cuda:N') without one is a ValueError naming the fix; anything else as given."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return name


def numeric_actions(parser: argparse.ArgumentParser):
    """(parser, action) for every option of a parser and its subparsers that takes numbers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from numeric_actions(sub)
        elif action.option_strings and (action.type in (int, float) or isinstance(action.type, Bounded)):
            yield parser, action


if __name__ == "__main__":
    sys.exit("cliargs.py is a module; see the scripts' --help")
