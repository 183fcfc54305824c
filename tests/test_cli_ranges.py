"""Numeric flags declare their range (cliargs), and an impossible value stops at parse time with
one line on stderr naming the flag, before any data or model is touched."""
import argparse

import pytest

import cliargs


def top_level_parsers():
    import estimate_dimension
    import evaluate_representations
    import mamba_next
    import markov_circles_timeseries
    import masked_model_gpu
    import oracle
    import sweep
    return {"sweep": sweep.build_parser(), "markov_circles_timeseries": markov_circles_timeseries.build_parser(),
            "masked_model_gpu": masked_model_gpu.build_parser(), "mamba_next": mamba_next.build_parser(),
            "estimate_dimension": estimate_dimension.build_parser(),
            "evaluate_representations": evaluate_representations.build_parser(), "oracle": oracle.build_parser()}


def test_every_numeric_flag_declares_its_range():
    bare = [f"{name} {a.option_strings[0]}" for name, p in top_level_parsers().items()
            for _, a in cliargs.numeric_actions(p) if not isinstance(a.type, cliargs.Bounded)]
    assert bare == []
    n = sum(1 for p in top_level_parsers().values() for _ in cliargs.numeric_actions(p))
    assert n > 60  # the walk reaches subcommands and argument groups


@pytest.mark.parametrize("conv,good,bad", [
    (cliargs.at_least(1), ["1", "7"], ["0", "-3", "1.5", "x"]),
    (cliargs.at_least(0, allow=(-1,)), ["-1", "0", "4"], ["-2"]),
    (cliargs.positive(), ["1e-4", "3"], ["0", "-1", "nan", "inf"]),
    (cliargs.non_negative(), ["0", "2.5"], ["-0.1", "nan"]),
    (cliargs.between(0, 1, open_lo=True, open_hi=True), ["0.5", "1e-9"], ["0", "1", "1.2", "-0.5"]),
    (cliargs.between(0, 1, open_hi=True), ["0", "0.99"], ["1", "-1e-9"]),
    (cliargs.int_between(2, 4), ["2", "4"], ["1", "5"]),
])
def test_bounded_converters(conv, good, bad):
    for g in good:
        conv(g)
    for b in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            conv(b)
    assert conv.bounds == (conv.lo, conv.hi, conv.open_lo, conv.open_hi)


BAD = [
    ("markov_circles_timeseries", ["--n-steps", "0"], "--n-steps"),
    ("markov_circles_timeseries", ["--dwell-mean", "-5"], "--dwell-mean"),
    ("markov_circles_timeseries", ["--radius-mean", "0"], "--radius-mean"),
    ("markov_circles_timeseries", ["--seed", "-1"], "--seed"),
    ("masked_model_gpu", ["--mask-ratio", "1.5"], "--mask-ratio"),
    ("masked_model_gpu", ["--lr", "0"], "--lr"),
    ("masked_model_gpu", ["--val-frac", "0"], "--val-frac"),
    ("masked_model_gpu", ["--dropout", "1"], "--dropout"),
    ("masked_model_gpu", ["--batch-size", "0"], "--batch-size"),
    ("masked_model_gpu", ["--rope-base", "-10"], "--rope-base"),
    ("masked_model_gpu", ["--num-workers", "-2"], "--num-workers"),
    ("mamba_next", ["train", "--d-state", "0"], "--d-state"),
    ("mamba_next", ["train", "--gate-lr-factor", "-1"], "--gate-lr-factor"),
    ("mamba_next", ["train", "--eval-warmup", "-4"], "--eval-warmup"),
    ("mamba_next", ["generate", "--checkpoint", "x.pt", "--temperature", "-0.5"], "--temperature"),
    ("mamba_next", ["gates", "--checkpoint", "x.pt", "--samples", "0"], "--samples"),
    ("estimate_dimension", ["--k", "10", "1"], "--k"),
    ("estimate_dimension", ["--n-boot", "-1"], "--n-boot"),
    ("evaluate_representations", ["--checkpoint", "x.pt", "--probe-train-frac", "1"], "--probe-train-frac"),
    ("evaluate_representations", ["--checkpoint", "x.pt", "--metric-points", "0"], "--metric-points"),
    ("oracle", ["--seq-len", "1"], "--seq-len"),
    ("oracle", ["--memory-mb", "0"], "--memory-mb"),
]


@pytest.mark.parametrize("module,argv,flag", BAD, ids=[f"{m} {' '.join(a)}" for m, a, _ in BAD])
def test_impossible_values_stop_with_one_line(module, argv, flag, capsys, tmp_path, monkeypatch):
    import importlib
    monkeypatch.chdir(tmp_path)  # nothing may be written, wherever the command would write
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and flag in err[0] and "--help" in err[0], err
    assert list(tmp_path.iterdir()) == []
