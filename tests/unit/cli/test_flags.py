"""The command line's parser: a flag for every config field, --config files under the flags,
and each subcommand routed to its own function."""

from __future__ import annotations

from darkroom.cli import main
from darkroom.cli.commands import COMMANDS
from darkroom.cli.flags import config_from_args
from darkroom.config import RetrainConfig, ScoreConfig, TrainConfig


def test_every_subcommand_runs_its_own_function():
    parser = main.build_parser()
    for name in COMMANDS:
        args = {"promote": ["v1"], "import-labels": ["answers.json"]}.get(name, [])
        func = parser.parse_args([name, *args]).func
        assert func.__name__ == "cmd_" + name.replace("-", "_"), name


def test_every_config_field_is_a_flag_with_its_default():
    help_text = " ".join(
        main.build_parser()._subparsers._group_actions[0].choices["retrain"].format_help().split()
    )
    fields = [f for f in RetrainConfig.model_fields if f != "train"] + list(
        TrainConfig.model_fields
    )
    for name in fields:
        assert f"--{name.replace('_', '-')}" in help_text, name
    assert "--no-pretrained" in help_text and "(default: True)" in help_text
    assert "(default: resnet18)" in help_text and "{adam,adamw,sgd}" in help_text


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "nightly.yaml"
    path.write_text("min_delta: 0.01\ntrain:\n  epochs: 3\n  backbone: resnet50\n")
    parser = main.build_parser()
    config = config_from_args(
        RetrainConfig, parser.parse_args(["retrain", "--config", str(path), "--epochs", "4"])
    )
    assert config.train.epochs == 4 and config.train.backbone == "resnet50"
    assert config.min_delta == 0.01 and config.train.lr == TrainConfig().lr
    toml = tmp_path / "score.toml"
    toml.write_text("chunk_size = 7\ntopk = 2\n")
    score = config_from_args(
        ScoreConfig, parser.parse_args(["score", "--config", str(toml), "--topk", "3"])
    )
    assert (score.chunk_size, score.topk) == (7, 3)
    a = parser.parse_args(["retrain", "--pretrained-file", "w.safetensors"])
    assert config_from_args(RetrainConfig, a).train.pretrained  # a file asks for it
