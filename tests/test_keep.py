"""Keep values: a token count and a fraction are different settings everywhere (config, CLIs, eval, bench)."""

from __future__ import annotations

import argparse

import pytest

from export.cli import default_out
from pruner_core import Keep, PrunerConfig
from pruner_core.config import KeepError, parse_keep, parse_keeps


def test_count_and_fraction_never_compare_equal():
    assert Keep(1) != Keep(1.0) and hash(Keep(1)) != hash(Keep(1.0))
    assert len({Keep(1), Keep(1.0), Keep(1)}) == 2
    assert PrunerConfig(keep=1) != PrunerConfig(keep=1.0)
    assert len({PrunerConfig(keep=64), PrunerConfig(keep=64)}) == 1
    assert Keep(1) != 1 and Keep(1.0) != 1.0  # never equal to a bare number either
    assert PrunerConfig(keep=1).budget(576) == 1 and PrunerConfig(keep=1.0).budget(576) == 576
    assert Keep(1.0).keeps_all and not Keep(576).keeps_all


def test_labels_and_json_keep_the_kind():
    assert [str(Keep(64)), str(Keep(0.12)), str(Keep(1.0)), str(Keep(1))] == ["64", "0.12", "1.0", "1"]
    assert default_out("m", Keep(1), "onnx") != default_out("m", Keep(1.0), "onnx")
    for keep in (Keep(1), Keep(1.0), Keep(0.12), Keep(64)):
        assert PrunerConfig.from_json(PrunerConfig(keep=keep).to_json()).keep == keep
        assert parse_keep(str(keep)) == keep


@pytest.mark.parametrize("text, keep", [("64", Keep(64)), ("1", Keep(1)), ("1.0", Keep(1.0)), ("1e-3", Keep(0.001)),
                                        (" 0.12 ", Keep(0.12))])
def test_one_parser(text, keep):
    assert parse_keep(text) == keep


@pytest.mark.parametrize("text, message", [("half", "token count"), ("0", "token count must be >= 1"),
                                           ("1.5", "fraction and must be <= 1.0"), ("nan", "fraction"),
                                           ("-0.5", "fraction")])
def test_bad_keep_is_one_clear_error(text, message):
    with pytest.raises(KeepError, match=message) as caught:
        parse_keep(text)
    assert isinstance(caught.value, argparse.ArgumentTypeError) and isinstance(caught.value, ValueError)


def test_lists_keep_order_and_both_kinds():
    assert parse_keeps("1,1.0,0.5,1") == [Keep(1), Keep(1.0), Keep(0.5)]


def test_count_above_n_suggests_valid_values():
    with pytest.raises(ValueError) as caught:
        PrunerConfig(keep=600).budget(576)
    message = str(caught.value)
    assert "from 1 to 576" in message and "(0, 1]" in message and "keep=1.0" in message
    fractions = [float(word.strip("(),;")) for word in message.replace("keep=", " ").split()
                 if word.strip("(),;").replace(".", "", 1).isdigit() and "." in word]
    assert fractions and all(f <= 1.0 for f in fractions), f"suggests an invalid fraction: {message}"


def test_every_cli_takes_keep_through_the_one_parser():
    from export.cli import build_parser as export_parser
    from pruner_core.viz import build_parser as viz_parser
    from runtime.bench import build_parser as bench_parser
    from runtime.cli import build_parser as run_parser

    assert export_parser().parse_args(["--keep", "1e-3"]).keep == Keep(0.001)
    assert viz_parser().parse_args(["--keep", "1"]).keep == Keep(1)
    assert run_parser().parse_args(["m", "--image", "x", "--prompt", "p", "--keep", "1e-3"]).keep == Keep(0.001)
    assert bench_parser().parse_args(["--keeps", "1,1.0"]).keeps == [Keep(1), Keep(1.0)]
    for parser, argv in ((run_parser(), ["m", "--image", "x", "--prompt", "p", "--keep", "abc"]),
                         (export_parser(), ["--keep", "abc"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_run_cli_reports_the_shared_parsers_message(capsys):
    from runtime.cli import build_parser as run_parser

    with pytest.raises(SystemExit):
        run_parser().parse_args(["m", "--image", "x", "--prompt", "p", "--keep", "1e-3x"])
    err = capsys.readouterr().err
    assert "give a token count (64) or a fraction" in err and "invalid literal" not in err


def test_eval_runs_one_token_and_every_token_as_two_settings():
    from runtime.eval_settings import eager_settings, parse_keeps as eval_keeps, reference_of

    settings = eager_settings("tiny-llava", eval_keeps("1,1.0"), ["vlm_pruner"], 2)
    assert [s.label for s in settings] == ["vlm_pruner keep=1", "vlm_pruner keep=1.0"]
    one, every = settings
    assert not one.full and every.full
    assert reference_of(one, settings) == every  # the unpruned baseline is keep 1.0, not the 1-token setting
    assert one.pruner["keep"] == 1 and isinstance(one.pruner["keep"], int) and every.pruner["keep"] == 1.0


def test_bench_baseline_is_keep_1_0_not_one_token(capsys):
    from runtime.bench import Setting, main, summarise

    assert main(["--keeps", "1,0.5"]) == 2
    assert "must include 1.0" in capsys.readouterr().err
    one = Setting(target="onnx", keep=Keep(1), folder="a", ttft_ms=[10.0], prefill_ms=[5.0])
    every = Setting(target="onnx", keep=Keep(1.0), folder="b", ttft_ms=[40.0], prefill_ms=[20.0])
    report = summarise([one, every], argparse.Namespace(model="m", prune_layer=2, repeats=1, warmup=0,
                                                          max_new_tokens=1, prompt="p"))
    rows = {str(row["keep"]) + type(row["keep"]).__name__: row for row in report["rows"]}
    assert rows["1int"]["speedup_vs_keep1"]["ttft"] == pytest.approx(4.0)  # measured against keep 1.0
    assert rows["1.0float"]["speedup_vs_keep1"]["ttft"] == pytest.approx(1.0)
