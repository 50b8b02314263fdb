"""`epserve train` is registered and refuses bad settings before fetching or training anything."""

from __future__ import annotations

from services.cli import build_parser, main


def test_train_is_a_subcommand_with_resumable_defaults():
    args = build_parser().parse_args(["train"])
    assert args.out == "checkpoints/bard-moe" and args.work_dir == "models/bard-moe-train"
    assert not args.resume and args.budget_min is None and args.threads >= 1


def test_bad_settings_are_a_one_line_error(capsys):
    assert main(["train", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["train", "--seq-len", "4096"]) == 2
    assert "--seq-len" in capsys.readouterr().err
