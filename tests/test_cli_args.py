"""The shared command-line pieces (cmim.core.cli_args): overrides after options for the commands that ask for it,
through argparse's own intermixed parsing, and one rule for telling a key=value override from a path."""

from __future__ import annotations

import pytest

from cmim.core.cli_args import CliParser, is_override


def _cli(intermixed: bool) -> CliParser:
    top = CliParser(prog="t")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", intermixed=intermixed)
    p.add_argument("words", nargs="*")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--out")
    return top


def test_sub_command_asking_for_it_takes_words_after_options():
    args = _cli(True).parse_args(["run", "ckpt.pt", "--flag", "a=1", "--out", "o.json", "b=2"])
    assert args.words == ["ckpt.pt", "a=1", "b=2"] and args.flag and args.out == "o.json"


def test_plain_sub_command_keeps_argparse_rules(capsys):
    assert _cli(False).parse_args(["run", "ckpt.pt", "a=1", "--flag"]).words == ["ckpt.pt", "a=1"]
    with pytest.raises(SystemExit):
        _cli(False).parse_args(["run", "ckpt.pt", "--flag", "a=1"])
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_cmim_commands_with_overrides_parse_them_after_options():
    from cmim.cli import build_parser

    args = build_parser("eval").parse_args(["eval", "knn", "ckpt.pt", "--random-init", "k=1", "--feature", "cls",
                                            "test_subset=8"])
    assert (args.checkpoint, args.overrides, args.random_init, args.feature) == ("ckpt.pt", ["k=1", "test_subset=8"],
                                                                                 True, "cls")
    args = build_parser("report").parse_args(["report", "run", "--refresh", "a=1"])
    assert args.overrides == ["a=1"] and args.refresh


def test_override_or_path(tmp_path):
    assert is_override("test_subset=200") and is_override("data.root=/x/y") and is_override("knn.ks=[5]")
    assert not is_override("runs/lr=0.1/checkpoint.pt") and not is_override("checkpoint.pt")
    odd = tmp_path / "lr=0.1"
    odd.write_text("")
    assert not is_override(str(odd))  # an existing file is a path whatever its name
