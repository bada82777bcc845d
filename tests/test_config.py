"""One config path: nested keys, value types and overrides are checked at load time, before a run writes a file."""

from __future__ import annotations

import re

import pytest
import yaml

from vfm_adapters.cli import main
from vfm_adapters.seg.config import ConfigError, apply_overrides, load_config, parse_overrides


def _run_config(output) -> dict:
    """A tiny trainable config (it would train in seconds if it got that far)."""
    return {
        "model": {"backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                      "dynamic_img_size": True},
                  "methods": ["rein"], "method_options": {"rein": {"token_length": 4, "rank": 2}},
                  "num_classes": 7, "head_channels": 8},
        "data": {"train": [{"type": "synthetic", "num_images": 4, "size": 32, "seed": 1}],
                 "crop_size": [24, 24], "scale": [32, 32], "num_workers": 0},
        "train": {"iterations": 1, "batch_size": 2, "output_dir": str(output)},
        "eval": {"crop": 24, "stride": 16},
    }


@pytest.mark.parametrize("raw, message", [
    ({"model": {"method_options": {"rein": {"token_lenght": 50}}}},
     "model.method_options.rein.token_lenght: unknown key; did you mean token_length?"),
    ({"data": {"train": [{"type": "synthetic", "domian": "fog"}]}},
     "data.train[0].domian: unknown key for a synthetic dataset; did you mean domain?"),
    ({"data": {"val": [{"type": "cityscapes", "root": "x", "splt": "val"}]}},
     "data.val[0].splt: unknown key for a cityscapes dataset; did you mean split?"),
    ({"data": {"train": [{"type": "cityscape", "root": "x"}]}},
     "data.train[0].type: unknown dataset type 'cityscape'; did you mean cityscapes?"),
    ({"data": {"train": [{"root": "x"}]}}, "data.train[0].type: missing"),
    ({"model": {"method_options": {"rien": {}}}}, "model.method_options.rien: unknown method; did you mean rein?"),
    ({"model": {"methods": ["rein", "lroa"]}}, "model.methods[1]: unknown method 'lroa'; did you mean lora?"),
    ({"model": {"method_options": {"freeze": {"rank": 2}}}}, "model.method_options.freeze: 'freeze' injects no adapter"),
    ({"optim": {"lrr": 1e-3}}, "optim.lrr: unknown key; did you mean lr?"),
    ({"trian": {}}, "trian: unknown config section; did you mean train?"),
])
def test_unknown_nested_keys_name_the_path_and_the_closest_key(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(raw)


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
    ({"optim": {"betas": [0.9, "high"]}}, "optim.betas[1]: expected a number, got 'high'"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size: expected an integer, got 2.5"),
    ({"model": {"pretrained": "yes please"}}, "model.pretrained: expected true or false"),
    ({"model": {"backbone": 3}}, "model.backbone: expected a string, got 3"),
    ({"data": {"crop_size": 512}}, "data.crop_size: expected a list, got 512"),
    ({"model": {"backbone_kwargs": [1]}}, "model.backbone_kwargs: expected a mapping"),
    ({"optim": {"grad_clip": "big"}}, "optim.grad_clip: expected a number, got 'big'"),
    ({"model": {"method_options": {"rein": {"token_length": "many"}}}},
     "model.method_options.rein.token_length: expected an integer, got 'many'"),
    ({"data": {"train": [{"type": "synthetic", "weight": "heavy"}]}}, "data.train[0].weight: expected a number"),
    ({"model": "vit"}, "model: expected a mapping"),
])
def test_wrong_types_name_the_path(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(raw)


def test_numbers_written_like_1e_3_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  min_lr: 0\n  betas: [0.9, 1e-1]\ntrain:\n  iterations: 4e1\n"
                    "model:\n  method_options: {lora: {alpha: 1e1}}\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-3"  # what PyYAML gives
    config = load_config(path)
    assert config["optim"]["lr"] == 0.001 and isinstance(config["optim"]["lr"], float)
    assert config["optim"]["min_lr"] == 0.0 and isinstance(config["optim"]["min_lr"], float)
    assert config["optim"]["betas"] == [0.9, 0.1]
    assert config["train"]["iterations"] == 40 and isinstance(config["train"]["iterations"], int)
    assert config["model"]["method_options"] == {"lora": {"alpha": 10.0}}
    assert load_config(config) == config  # loading a loaded config changes nothing


def test_overrides_are_parsed_with_yaml_and_validated_like_the_file():
    assert parse_overrides(["optim.lr=2e-4", "data.num_workers=8", "model.pretrained=true", "model.methods=[rein]",
                            "train.output_dir=runs/a=b"]) == [
        ("optim.lr", 2e-4), ("data.num_workers", 8), ("model.pretrained", True), ("model.methods", ["rein"]),
        ("train.output_dir", "runs/a=b")]
    config = load_config({"data": {"train": [{"type": "synthetic"}]}},
                         ["optim.lr=2e-4", "train.batch_size=8", "model.method_options.rein.token_length=50",
                          "data.train.0.weight=2", "eval.limit=3"])
    assert config["optim"]["lr"] == 2e-4 and config["train"]["batch_size"] == 8
    assert config["model"]["method_options"] == {"rein": {"token_length": 50}}
    assert config["data"]["train"] == [{"type": "synthetic", "weight": 2.0}] and config["eval"]["limit"] == 3
    assert load_config({}, {"train.output_dir": "x: y"})["train"]["output_dir"] == "x: y"  # typed values from flags
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    for bad, message in (("optim.lr", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"), ("optim..lr=1", "KEY=VALUE"),
                         ("data.train.3.root=x", "data.train.3: data.train is a list of 1"),
                         ("optim.lr.x=1", "optim.lr.x: optim.lr is a float"),
                         ("optim.lr=[1", "optim.lr: cannot parse the value"),
                         ("optim.lr=-1", "optim.lr must be a finite number"),
                         ("model.method_options.rein.token_lenght=50", "did you mean token_length?")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config({"data": {"train": [{"type": "synthetic"}]}, "optim": {"lr": 1e-4}}, [bad])


@pytest.mark.parametrize("change, override, message", [
    (lambda c: c["model"]["method_options"]["rein"].update(token_lenght=5), [],
     "model.method_options.rein.token_lenght: unknown key; did you mean token_length?"),
    (lambda c: c["data"]["train"][0].update(domian="fog"), [], "data.train[0].domian: unknown key"),
    (lambda c: c.update(optim={"lr": "1e-3x"}), [], "optim.lr: expected a number, got '1e-3x'"),
    (lambda c: None, ["model.method_options.rein.token_lenght=50"], "did you mean token_length?"),
    (lambda c: None, ["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (lambda c: None, ["data.batch_size=8"], "data.batch_size: unknown key"),
])
def test_train_command_refuses_a_bad_config_before_writing_anything(tmp_path, capsys, change, override, message):
    run = tmp_path / "run"
    config = _run_config(run)
    change(config)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), *override, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_train_command_applies_overrides_and_flags(tmp_path, capsys):
    from vfm_adapters.seg.checkpoints import load_segmentor

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path / "unused")))
    run = tmp_path / "run"
    assert main(["train", str(path), "model.method_options.rein.token_length=3", "optim.lr=2e-4",
                 "--output-dir", str(run), "--iterations", "1", "--no-progress", "--no-eval"]) == 0
    stored = yaml.safe_load((run / "config.json").read_text())
    assert stored["optim"]["lr"] == 2e-4 and stored["train"]["iterations"] == 1
    assert stored["model"]["method_options"] == {"rein": {"token_length": 3, "rank": 2}}
    assert not (tmp_path / "unused").exists()
    model, _ = load_segmentor(run)
    assert model.backbone is not None


def test_adaptation_config_uses_the_same_checks(tmp_path, capsys):
    from vfm_adapters.adaptation import load_adaptation_config

    for raw, overrides, message in (
        ({"dacs": {"treshold": 0.9}}, [], "dacs.treshold: unknown key"),
        ({}, ["self_training.ema_intervall=3"], "self_training.ema_intervall: unknown key; did you mean ema_interval?"),
        ({"data": {"source": [{"type": "gta5", "rot": "x"}]}}, [],
         "data.source[0].rot: unknown key for a gta5 dataset; did you mean root?"),
        ({"data": {"rare_class_sampling": {"temprature": 0.1}}}, [],
         "data.rare_class_sampling.temprature: unknown key; did you mean temperature?"),
        ({}, ["optim.lr=1e-3x"], "optim.lr: expected a number, got '1e-3x'"),
        ({}, ["model.method_options.rein.token_lenght=5"], "did you mean token_length?"),
        ({"recipe": "dcas"}, [], "recipe: unknown recipe 'dcas'; did you mean dacs?"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_adaptation_config(raw, overrides)
    config = load_adaptation_config({"data": {"unlabelled": [{"type": "unlabelled", "root": "g", "recursive": False}]}},
                                    ["optim.lr=1e-3", "dacs.ema_alpha=0.99"])
    assert config["optim"]["lr"] == 1e-3 and config["dacs"]["ema_alpha"] == 0.99

    path = tmp_path / "a.yaml"
    run = tmp_path / "run"
    path.write_text(yaml.safe_dump({"train": {"output_dir": str(run)},
                                    "data": {"source": [{"type": "synthetic", "domian": "fog"}]}}))
    assert main(["adapt", str(path), "--no-progress"]) == 2
    assert "data.source[0].domian: unknown key" in capsys.readouterr().err and not run.exists()
    path.write_text(yaml.safe_dump({"train": {"output_dir": str(run)}}))
    assert main(["adapt", str(path), "dacs.ema_alfa=0.9", "--no-progress"]) == 2
    assert "dacs.ema_alfa: unknown key; did you mean ema_alpha?" in capsys.readouterr().err and not run.exists()


def test_eval_command_checks_its_overrides_with_the_same_loader(tmp_path, capsys):
    from argparse import Namespace

    from vfm_adapters.commands.eval import _eval_config

    def args(*overrides, mode=None, crop=None, stride=None):
        return Namespace(overrides=list(overrides), mode=mode, crop=crop, stride=stride)

    stored = {"mode": "slide", "crop": 24, "stride": 16, "limit": 2}
    assert _eval_config(stored, args()) == {"mode": "slide", "crop": 24, "stride": 16, "limit": None}
    assert _eval_config(stored, args("eval.crop=32", mode="whole")) == {"mode": "whole", "crop": 32, "stride": 16,
                                                                         "limit": None}
    for bad, message in ((args("eval.crpo=32"), "eval.crpo: unknown key; did you mean crop?"),
                         (args(crop=8), "eval.stride (16) must not exceed eval.crop (8)"),
                         (args("optim.lr=1"), "eval section only")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _eval_config(stored, bad)
    assert main(["eval", str(tmp_path), "eval.stride=x"]) == 2  # refused before looking for a model
    assert "eval.stride: expected an integer, got 'x'" in capsys.readouterr().err


def test_python_api_refuses_a_bad_config_before_writing_anything(tmp_path):
    from vfm_adapters.adaptation import train_adaptation
    from vfm_adapters.seg.training import train

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape("model.method_options.rein.token_lenght: unknown key")):
        train(_run_config(run), overrides=["model.method_options.rein.token_lenght=5"], progress=False)
    bad = _run_config(run)
    bad["data"]["train"][0]["domian"] = "fog"
    with pytest.raises(ConfigError, match=re.escape("data.train[0].domian: unknown key")):
        train(bad, progress=False)
    with pytest.raises(ConfigError, match=re.escape("optim.lr: expected a number, got 'fast'")):
        train_adaptation({"train": {"output_dir": str(run)}}, overrides={"optim.lr": "fast"}, progress=False)
    assert not run.exists()
