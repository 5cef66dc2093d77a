import pytest
import yaml

from cnnlab.cli import main
from cnnlab.config import FIELDS, Config, ConfigError, coerce, make_config
from cnnlab.models import check_config


@pytest.mark.parametrize("org,expected", [
    ("same", [32] * 5), ("double", [32, 64, 128, 256, 512]), ("pyramid", [32, 64, 128, 256, 512]),
    ("half", [32, 16, 8, 4, 2]), ("16,32,64,64,128", [16, 32, 64, 64, 128])])
def test_filter_organisations(org, expected):
    assert make_config({"filters": 32, "filter_org": org}).filter_counts() == expected


def test_half_never_below_one_and_kernel_lists():
    cfg = make_config({"filters": 4, "filter_org": "half", "kernel_size": "3,3,5,5,7"})
    assert cfg.filter_counts() == [4, 2, 1, 1, 1]
    assert cfg.kernel_sizes() == [3, 3, 5, 5, 7]
    assert make_config({"kernel_size": 5}).kernel_sizes() == [5] * 5
    assert make_config({"filter_org": [8, 8, 16, 16, 32]}).filter_counts() == [8, 8, 16, 16, 32]  # YAML list


@pytest.mark.parametrize("value,expected", [("True", True), ("false", False), ("1", True), ("no", False), (True, True)])
def test_booleans_in_every_spelling(value, expected):
    assert coerce("batch_norm", value) is expected


@pytest.mark.parametrize("source,needle", [
    ({"nope": 1}, "unknown key 'nope'"),
    ({"lr": "fast"}, "lr='fast'"),
    ({"lr": 0}, "lr=0"),
    ({"epochs": 2.5}, "epochs=2.5"),
    ({"batch_norm": "maybe"}, "batch_norm='maybe'"),
    ({"activation": "tanh"}, "one of relu"),
    ({"filter_org": "1,2,3"}, "filter_org"),
    ({"finetune": "head"}, "needs a pretrained model"),
    ({"weights": "DEFAULT"}, "smallcnn has no pretrained weights"),
    ({"model": "resnet18", "finetune": "head"}, "add --weights DEFAULT"),
    ({"model": "resnet18", "weights": "DEFAULT"}, "write --finetune full"),
    ({"model": "resnet18", "weights": "DEFAULT", "finetune": "full", "freeze_stages": 2}, "only applies with --finetune partial"),
    ({"model": "resnet18", "weights": "DEFAULT", "finetune": "head", "unfreeze_every": 2}, "only applies with --finetune gradual"),
    ({"model": "resnet18", "weights": "DEFAULT", "finetune": "head", "lr_backbone": 1e-4}, "only applies when pretrained layers train"),
])
def test_bad_values_are_one_clear_error(source, needle):
    with pytest.raises(ConfigError, match=None) as e:
        check_config(make_config(source))  # the config's own rules, then its model family's
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_names_are_refused_by_the_model_registry():
    from cnnlab.models import check_config

    with pytest.raises(ConfigError) as e:
        check_config(make_config({"model": "resnet9000"}))
    assert "model='resnet9000'" in str(e.value) and "\n" not in str(e.value)
    assert main(["info", "--model", "resnet9000"]) == 2


def test_yaml_then_flags_flags_win(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "filters": 16, "activation": "gelu"}))
    assert main(["info", "--config", str(path), "--filters=8", "--filter_org=same", "--image_size", "64"]) == 0
    out = capsys.readouterr().out
    assert "filters [8, 8, 8, 8, 8]" in out and "64x64" in out


def test_every_field_is_a_flag_in_both_forms(capsys):
    from cnnlab.cli import build_parser

    parser = build_parser()
    for name, f in FIELDS.items():
        value = "True" if isinstance(f.default, bool) else str(f.default or "x")
        a = parser.parse_args(["train", f"--{name}={value}"])
        b = parser.parse_args(["train", f"--{name}", value])
        assert getattr(a, name) == getattr(b, name) == value


def test_wandb_agent_command_line_is_accepted():
    """What `wandb agent` runs for a sampled config: ${program} --key=value ..."""
    from cnnlab.cli import build_parser
    from cnnlab.commands import config_from_args

    args = build_parser().parse_args(["train", "--activation=mish", "--augment=False", "--batch_norm=True",
                                      "--batch_size=32", "--dense_units=512", "--dropout=0.3", "--epochs=7",
                                      "--filter_org=double", "--filters=16", "--kernel_size=5",
                                      "--lr=0.00123", "--image_size=128"])
    cfg = config_from_args(args)
    assert (cfg.activation, cfg.augment, cfg.batch_norm, cfg.batch_size, cfg.lr) == ("mish", "false", True, 32, 0.00123)
    assert not cfg.augments()


@pytest.mark.parametrize("argv,needle", [
    (["info", "--filtrs", "3"], "unknown option --filtrs; did you mean --filters?"),
    (["info", "--epochs", "3"], "unknown option --epochs: cnnlab info does not use it (see cnnlab info --help)"),
    (["info", "--dropout=2"], "dropout=2.0: expected float from 0 to 0.95"),
    (["train", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
    (["train", "--compile", "fast"], "compile='fast': expected one of off, default, reduce-overhead"),
    (["train", "--data", "/nonexistent", "--device", "cpu", "--decoder", "nvjpeg", "--out", "/tmp/cnnlab-test-runs"],
     "decoder=nvjpeg needs a CUDA device"),
])
def test_cli_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_info_takes_every_architecture_knob(capsys):
    assert main(["info", "--image_size", "128", "--conv1_stride", "1", "--conv1_init", "kaiming",
                 "--conv_init", "kaiming", "--global_pool", "true"]) == 0
    out = capsys.readouterr().out
    assert "first conv stride 1, first conv init kaiming, other convs' init kaiming" in out
    assert "global average pool" in out


def test_config_defaults_validate():
    assert make_config() == Config()


def test_compile_takes_a_mode_or_a_boolean():
    from cnnlab.cli import build_parser
    from cnnlab.commands import config_from_args

    assert [make_config({"compile": v}).compile for v in (True, "true", False, "off", "max-autotune")] == \
        ["default", "default", "off", "off", "max-autotune"]
    assert config_from_args(build_parser().parse_args(["train", "--compile"])).compile == "default"
    assert config_from_args(build_parser().parse_args(["train", "--compile=reduce-overhead"])).compile == "reduce-overhead"
    old_checkpoint_config = {**Config().to_dict(), "compile": False}  # written before compile took a mode
    del old_checkpoint_config["decoder"]
    assert make_config(old_checkpoint_config).compile == "off"
