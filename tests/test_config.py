"""Config system: precedence, validation, errors that name the key and its nearest valid spelling."""
from __future__ import annotations

import pytest
import yaml

from orca.config import ExperimentConfig, load_config, save_config
from datasets.registry import Registry
from orca.schema import ConfigError


def test_defaults_are_orca_darcy_recipe():
    cfg = load_config()
    assert cfg.train.lr == 1e-3 and cfg.train.betas == (0.9, 0.98) and cfg.train.weight_decay == 5e-3
    assert cfg.train.batch_size == 4 and cfg.train.epochs == 100 and cfg.train.warmup_epochs == 5
    assert cfg.model.body == "swin_base_patch4_window7_224"
    assert cfg.task.options.resolution == 421 and cfg.task.options.subsample == 5


def test_precedence_defaults_yaml_base_cli(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lr: 0.01, epochs: 7}\nseed: 3\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\ntrain: {lr: 0.02}\n")
    cfg = load_config(str(tmp_path / "exp.yaml"), ["train.lr=3e-4", "task.options.n_train=12"])
    assert cfg.train.lr == pytest.approx(3e-4)  # CLI beats YAML beats base
    assert cfg.train.epochs == 7 and cfg.seed == 3  # inherited from base
    assert cfg.train.batch_size == 4  # default
    assert cfg.task.options.n_train == 12 and isinstance(cfg.train.lr, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.5", "adapter.method=lora", "adapter.rank=4"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("override, expect", [
    ("train.lrr=1", r"unknown config key 'train.lrr'; did you mean 'lr'\?"),
    ("trian.lr=1", r"unknown config key 'trian'; did you mean 'train'\?"),
    ("task.options.n_trian=5", r"unknown config key 'task.options.n_trian'; did you mean 'n_train'\?"),
    ("train.optimizer=adam", r"train.optimizer='adam' is not allowed.*did you mean 'adamw'\?"),
    ("train.epochs=two", r"train.epochs: expected an integer, got 'two'"),
    ("train.lr=-1", r"-1.0 is out of range, train.lr, give a value > 0"),
    ("task.name=darcyy", r"unknown task 'darcyy'; did you mean 'darcy'"),
])
def test_bad_keys_and_values_name_the_key(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"bodyy": "x"}}))
    with pytest.raises(ConfigError, match=r"'model.bodyy'; did you mean 'body'"):
        load_config(str(path))


def test_missing_config_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found, .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_registry_refuses_duplicates_and_suggests():
    reg = Registry("widget")
    reg.register("alpha", obj=1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", obj=2)
    with pytest.raises(ValueError, match="lowercase"):
        reg.register("Beta", obj=2)
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")
    reg.register("alpine", obj=3)
    assert reg.names("alp*") == ["alpha", "alpine"] and len(reg) == 2


def test_experiment_config_is_plain_dataclass():
    assert ExperimentConfig().train.lr == 1e-3


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    from orca.cli import main

    assert main(["stage3", "--config", "configs/darcy_tiny.yaml", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.lrr'; did you mean 'lr'?") and "Traceback" not in err
    assert main(["stage3", "--resume", str(tmp_path / "missing_run")]) == 2
    assert "--resume needs a run directory holding config.yaml" in capsys.readouterr().err


def test_cli_data_builds_the_task_and_reports_its_sizes(capsys, tmp_path):
    """`python -m orca data` generates and caches the data alone; a second call reads the cache."""
    import json

    from orca.cli import main

    args = ["data", "--config", "configs/darcy_tiny.yaml", f"task.data_root={tmp_path}",
            "task.options={resolution: 41, subsample: 4, n_train: 6, n_val: 2, n_test: 3, workers: 1}"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["task"] == "darcy" and report["sizes"] == {"train": 6, "val": 2, "test": 3}
    cached = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert cached and main(args) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == cached
