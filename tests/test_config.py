"""The composed configuration: defaults, dotlist overrides, and rejection of bad keys."""

from pathlib import Path

import pytest

from fcl_flower.cli import main
from fcl_flower.config import (
    ConfigError, config_differences, config_from_yaml, config_to_yaml, load_config, with_overrides,
)


def test_defaults_load_and_are_read_only():
    cfg = load_config()
    assert cfg.method == "fcl" and cfg.data.format == "synthetic" and cfg.data.num_partitions == 4
    with pytest.raises(Exception):
        cfg.sites = 3


def test_dotlist_overrides_reach_nested_keys():
    cfg = load_config(["sites=3", "data.root=/data/acdc", "data.image_size=[64,64]", "strategy.options={proximal_mu: 0.1}"])
    assert cfg.sites == 3 and cfg.data.root == "/data/acdc"
    assert list(cfg.data.image_size) == [64, 64]
    assert cfg.strategy.options.proximal_mu == 0.1


@pytest.mark.parametrize(
    "override, key",
    [
        ("sitez=3", "sitez"),
        ("data.formt=acdc", "data.formt"),
        ("sites=many", "sites"),
        ("pretrain.use_remote_positives=maybe", "pretrain.use_remote_positives"),
        ("data.format=dicom", "data.format"),
        ("method=byol", "method"),
        ("data.split=random", "data.split"),
        ("strategy.name=fedfoo", "strategy.name"),
        ("sites=0", "sites"),
        ("pretrain.temperature=0", "pretrain.temperature"),
        ("stages=[pretrain,deploy]", "stages"),
        ("data.image_size=[64]", "data.image_size"),
        ("finetune.federated_norm=site", "finetune.federated_norm"),
        ("pretrain.precision=float16", "pretrain.precision"),
        ("synthetic.patient_variation=-1", "synthetic.patient_variation"),
        ("synthetic.anatomy_variation=3", "synthetic.anatomy_variation"),
        ("federation.fraction_fit=1.5", "federation.fraction_fit"),
        ("federation.fraction_fit=0", "federation.fraction_fit"),
        ("federation.fraction_evaluate=-0.1", "federation.fraction_evaluate"),
        ("federation.min_evaluate_sites=11", "federation.min_evaluate_sites"),
        ("pretrain.bank_sample_size=0", "pretrain.bank_sample_size"),
        ("pretrain.lr=0", "pretrain.lr"),
        ("pretrain.max_steps_per_round=-1", "pretrain.max_steps_per_round"),
        ("seed=-1", "seed"),
        ("relay.max_rows_per_site=-5", "relay.max_rows_per_site"),
        ("relay.max_rows=512", "pretrain.queue_size"),
        ("data.image_size=[0,0]", "data.image_size"),
        ("data.target_spacing=[0,1.5]", "data.target_spacing"),
        ("data.augment.gamma=[0.7]", "data.augment.gamma"),
        ("data.augment.crop_scale=[0.7,1.2]", "data.augment.crop_scale"),
        ("model.channels=[16,0]", "model.channels"),
        ("model.proj_hidden=0", "model.proj_hidden"),
        ("model.in_channels=2", "model.in_channels"),
        ("method=none", "method"),
        ("finetune.federated_norm=local", "finetune.federated_norm"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert key in str(err.value)


def test_cross_key_rules_accept_the_valid_combinations():
    load_config(["method=none", "stages=[finetune]"])  # random init
    load_config(["model.norm=batch", "finetune.federated_norm=local"])  # FedBN
    load_config(["relay.max_rows=512", "relay.enabled=false"])  # no relay: banks never checked
    with pytest.raises(ConfigError, match="finetune.init"):
        load_config(["method=none", "stages=[finetune]", "finetune.init=local_pretrain"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["sites"])


def test_config_file_layer_and_its_errors(tmp_path: Path):
    good = tmp_path / "exp.yaml"
    good.write_text("sites: 4\npretrain:\n  lr: 0.01\n")
    cfg = load_config(["sites=5"], good)
    assert cfg.sites == 5 and cfg.pretrain.lr == 0.01  # dotlist wins over the file
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match="pretrain.lrr"):
        load_config([], bad)


def test_yaml_round_trip_and_with_overrides():
    cfg = load_config(["sites=3", "method=simclr"])
    again = config_from_yaml(config_to_yaml(cfg))
    assert config_to_yaml(again) == config_to_yaml(cfg)
    changed = with_overrides(cfg, ["rounds=7"])
    assert changed.rounds == 7
    assert changed.method == "simclr"
    with pytest.raises(ConfigError):
        with_overrides(cfg, ["sites=-1"])


def test_a_stored_config_from_before_a_key_existed_takes_its_default():
    text = config_to_yaml(load_config(["sites=3", "model.norm=batch", "finetune.federated_norm=local"]))
    older = "\n".join(line for line in text.splitlines() if "federated_norm" not in line)
    assert older != text
    cfg = config_from_yaml(older)
    assert cfg.sites == 3 and cfg.finetune.federated_norm == load_config().finetune.federated_norm
    with pytest.raises(ConfigError, match="federatd_norm"):
        config_from_yaml(text.replace("federated_norm:", "federatd_norm:"))


def test_config_differences_name_the_changed_keys():
    base = load_config(["sites=3"])
    assert config_differences(base, config_from_yaml(config_to_yaml(base))) == []
    other = load_config(["sites=4", "finetune.lr=0.01", "strategy.options={proximal_mu: 0.1}"])
    assert config_differences(base, other) == ["finetune.lr", "sites", "strategy.options", "strategy.options.proximal_mu"]


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["simulate", "sitez=3"]) == 2
    assert "sitez" in capsys.readouterr().err
