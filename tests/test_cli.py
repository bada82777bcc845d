"""The command line as a user meets it: fast help, one-line errors, configs by name, threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vfm_adapters import cli
from vfm_adapters.commands import _common
from vfm_adapters.configs import resolve_config, shipped_configs


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_building_the_parser_imports_neither_torch_nor_the_library_internals() -> None:
    result = _python(
        "import sys\n"
        "from vfm_adapters.cli import build_parser\n"
        "parser = build_parser()\n"
        "for name in ('train', 'eval', 'adapt', 'demo', 'plot', 'configs'):\n"
        "    assert name in parser._subparsers._group_actions[0].choices, name\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'transformers', 'accelerate', 'numpy') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"building the parser imported {result.stdout.strip()}"


def test_python_dash_m_vfm_adapters_prints_help() -> None:
    result = subprocess.run([sys.executable, "-m", "vfm_adapters", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: vfm-adapters" in result.stdout and "train" in result.stdout


def test_library_errors_print_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "no_such_config_anywhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("vfm-adapters train: error: FileNotFoundError:") and "no_such_config_anywhere" in err


def test_traceback_flag_shows_the_exception() -> None:
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        cli.main(["--traceback", "train", "no_such_config_anywhere"])


def test_a_bug_is_not_hidden_as_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfm_adapters.commands import configs

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(configs, "run", broken)
    with pytest.raises(KeyError):
        cli.main(["configs"])


def test_every_shipped_config_resolves_by_name_and_by_its_old_path() -> None:
    configs = shipped_configs()
    assert {"synthetic_cpu", "paper/gtav_dinov2_l_rein", "adaptation/dacs_gta5_cityscapes_dinov2_l_rein"} <= set(configs)
    for name, path in configs.items():
        assert resolve_config(name) == path
        assert resolve_config(f"examples/configs/{name}.yaml").resolve() == path.resolve()


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("synthetic_cpu").write_text("model: {}\n")
    assert resolve_config("synthetic_cpu") == Path("synthetic_cpu")


def test_a_near_miss_suggests_the_shipped_name() -> None:
    with pytest.raises(FileNotFoundError, match="did you mean synthetic_cpu"):
        resolve_config("synthetic_cpy")


def test_configs_command_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["configs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(shipped_configs())


def test_train_by_name_with_threads_sets_and_restores_torch_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vfm_adapters.seg import training

    seen = {}

    def fake_train(config, **options):
        seen["threads"] = torch.get_num_threads()
        seen["config"] = config
        return {"finished": True, "output_dir": config["train"]["output_dir"], "step": 1}

    monkeypatch.setattr(training, "train", fake_train)
    before = torch.get_num_threads()
    assert cli.main(["train", "synthetic_cpu", "--threads", "1", "--iterations", "3",
                     "--output-dir", str(tmp_path / "run")]) == 0
    assert seen["threads"] == 1 and torch.get_num_threads() == before
    assert seen["config"]["train"]["iterations"] == 3


def test_negative_threads_are_refused() -> None:
    with pytest.raises(ValueError, match="--threads"):
        _common.choose_threads(-1)


def test_plain_torchrun_without_accelerate_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=true torchrun"):
        _common.refuse_plain_torchrun()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    _common.refuse_plain_torchrun()


def test_plot_draws_curves_and_per_class_iou(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3 * (1 - s / 10)}) + "\n"
                                           for s in range(1, 6)))
    (run / "results.json").write_text(json.dumps({
        "source": {"mIoU": 60.0, "IoU": {"road": 80.0, "sky": 40.0}},
        "fog": {"mIoU": 30.0, "IoU": {"road": 50.0, "sky": 10.0}},
    }))
    assert cli.main(["plot", str(run)]) == 0
    for name in ("curves.png", "per_class_iou.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_of_a_directory_that_is_no_run_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "neither log.jsonl nor results.json" in capsys.readouterr().err


def test_find_unused_parameters_reaches_ddp() -> None:
    from vfm_adapters.seg.training import make_accelerator

    accelerator = make_accelerator({"mixed_precision": "no", "output_dir": "unused", "log_with": None,
                                    "find_unused_parameters": True})
    assert accelerator.ddp_handler is not None and accelerator.ddp_handler.find_unused_parameters is True


def test_a_tracker_that_cannot_start_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.tracking

    from vfm_adapters.seg.config import ConfigError
    from vfm_adapters.seg.training import make_accelerator

    monkeypatch.setattr(accelerate.tracking, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr("accelerate.accelerator.filter_trackers",
                        lambda log_with, logging_dir=None: [], raising=False)
    with pytest.raises(ConfigError, match="train.log_with"):
        make_accelerator({"mixed_precision": "no", "output_dir": str(tmp_path), "log_with": "tensorboard"})


def test_a_full_disk_or_a_diverged_run_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from vfm_adapters._io import DiskWriteError
    from vfm_adapters.commands import configs
    from vfm_adapters.seg.loop import TrainingDivergedError

    for error in (DiskWriteError(28, "No space left on device writing run/checkpoint.pt; the previous checkpoint is intact",
                                 "run/checkpoint.pt"),
                  TrainingDivergedError("the loss is nan at step 3; the last good checkpoint is kept")):
        def broken(args, error=error):
            raise error

        monkeypatch.setattr(configs, "run", broken)
        assert cli.main(["configs"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and type(error).__name__ in err, err
