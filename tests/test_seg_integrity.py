"""No silently wrong results: sliding windows, label ranges, divergence, run directories, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vfm_adapters as va
from vfm_adapters.seg.heads import Segmentor
from vfm_adapters.seg.inference import evaluate, slide_inference, whole_inference, window_starts
from vfm_adapters.seg.config import ConfigError, load_config


# ------------------------------------------------------------------ sliding windows (item 11)
@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), crop=st.integers(1, 120), stride=st.integers(1, 120))
def test_windows_cover_every_pixel_and_end_flush(length, crop, stride):
    if stride > crop:
        with pytest.raises(ValueError, match="larger than the crop"):
            window_starts(length, crop, stride)
        return
    starts = window_starts(length, crop, stride)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        assert 0 <= start and (start + crop <= length or start == 0)
        covered[start : start + crop] = True
    assert covered.all()
    assert min(starts[-1] + crop, length) == length  # the last window is flush with the border


@pytest.mark.parametrize("crop, stride", [(0, 5), (8, 0), (-4, 2), (8, -3), (4, 9)])
def test_non_positive_or_gapped_windows_are_refused(crop, stride):
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match="positive|larger than the crop"):
        slide_inference(model, torch.randn(1, 3, 20, 20), 2, crop=crop, stride=stride)
    with pytest.raises(ValueError, match="positive|larger than the crop"):
        evaluate(model, [], 2, mode="slide", crop=crop, stride=stride)
    with pytest.raises(ConfigError, match="eval"):
        load_config({"eval": {"crop": crop, "stride": stride}})


def test_a_crop_larger_than_the_image_is_one_unpadded_window():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=32,
                            patch_size=8, dynamic_img_size=True)
    model = Segmentor(va.inject_rein(vit, token_length=4, rank=2, link_queries=False), 4, head_channels=8).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    small = torch.randn(1, 3, 24, 32)
    slid = slide_inference(model, small, 4, crop=48, stride=21)
    assert seen == [(1, 3, 24, 32)]  # one window, the image itself: no zero padding seen by the model
    assert torch.equal(slid, whole_inference(model, small))
    # larger along one axis only: windows are crop x image-height, none padded
    seen.clear()
    wide = slide_inference(model, torch.randn(1, 3, 32, 64), 4, crop=48, stride=16)
    assert seen == [(2, 3, 32, 48)] and torch.isfinite(wide).all()


# ------------------------------------------------------------------ labels (item 12)
def _folder(root, labels, size=(6, 8)):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i, value in enumerate(labels):
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / f"{i}.png")
        label = np.zeros(size, np.uint8)
        label[0, 0] = value
        Image.fromarray(label).save(root / "labels" / f"{i}.png")
    return root


class _Constant(torch.nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.classes = classes

    def forward(self, x):
        return torch.zeros(x.shape[0], self.classes, *x.shape[-2:]) + self.anchor


def test_label_ids_beyond_the_classes_are_an_error_naming_the_file(tmp_path):
    from vfm_adapters.seg.datasets import FolderDataset
    from vfm_adapters.seg.label_checks import LabelRangeError, check_label_range

    data = FolderDataset(_folder(tmp_path / "d", [1, 2, 7]))
    with pytest.raises(LabelRangeError, match=r"2\.png.*\[7\]"):
        evaluate(_Constant(), data, 3, mode="whole")
    # a training batch names the file of the offending sample
    batch = torch.zeros(3, 4, 4, dtype=torch.long)
    batch[1, 0, 0] = 9
    with pytest.raises(LabelRangeError, match="b.png"):
        check_label_range(batch, 3, ["a.png", "b.png", "c.png"])
    batch[1, 0, 0] = 255
    check_label_range(batch, 3, ["a.png", "b.png", "c.png"])


def test_training_refuses_labels_beyond_num_classes_when_the_data_is_opened(tmp_path, one_thread):
    from test_seg_training import _config
    from vfm_adapters.seg.label_checks import LabelRangeError
    from vfm_adapters.seg.training import train

    config = _config(tmp_path / "run", iterations=1)
    config["model"]["num_classes"] = 3  # the synthetic scenes have 7 classes
    with pytest.raises(LabelRangeError, match="synthetic://"):
        train(config, progress=False, log=lambda s: None)


@pytest.mark.parametrize("limit", [0, -1])
def test_an_empty_evaluation_is_an_error_not_nan(tmp_path, limit, capsys):
    from vfm_adapters.cli import main
    from vfm_adapters.seg.datasets import FolderDataset

    data = FolderDataset(_folder(tmp_path / "d", [1, 2]))
    with pytest.raises(ValueError, match="limit"):
        evaluate(_Constant(), data, 3, mode="whole", limit=limit)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path), "--limit", str(limit)])
    assert exit_info.value.code != 0 and "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--stride", "0"])


def test_an_evaluation_without_a_valid_pixel_is_an_error(tmp_path):
    from PIL import Image

    from vfm_adapters.seg.datasets import FolderDataset

    root = _folder(tmp_path / "d", [1])
    Image.fromarray(np.full((6, 8), 255, np.uint8)).save(root / "labels" / "0.png")
    with pytest.raises(ValueError, match="no valid pixel"):
        evaluate(_Constant(), FolderDataset(root), 3, mode="whole")


# ------------------------------------------------------------------ divergence and optimiser values (item 10)
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, one_thread, monkeypatch):
    from test_seg_training import _config
    from vfm_adapters.seg import training

    from vfm_adapters.seg.heads import Segmentor

    calls = {"n": 0}
    real_loss = Segmentor.loss

    def loss_going_nan(self, images, labels, pixel_weights=None):
        calls["n"] += 1
        loss = real_loss(self, images, labels, pixel_weights)
        return loss * float("nan") if calls["n"] > 4 else loss  # grad_accum 2: step 3 is the first bad one

    monkeypatch.setattr(Segmentor, "loss", loss_going_nan)
    with pytest.raises(training.TrainingDivergedError, match=r"nan at step 3.*checkpoint .* \(step 2\) is intact"):
        training.train(_config(tmp_path / "run", iterations=6), progress=False, log=lambda s: None)
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 2 and all(torch.isfinite(t).all() for t in payload["model"].values())
    assert not (tmp_path / "run" / "head.safetensors").exists()  # nothing was saved as "finished"


@pytest.mark.parametrize("optim", [{"grad_clip": -1.0}, {"grad_clip": 0}, {"lr": float("nan")}, {"lr": -1e-4},
                                   {"betas": [1.5, 0.9]}, {"weight_decay": -0.1}, {"warmup_ratio": 2.0},
                                   {"lr": "fast"}, {"min_lr": 1.0}])
def test_invalid_optimiser_values_are_refused(optim):
    with pytest.raises(ConfigError, match="optim"):
        load_config({"optim": optim})


# ------------------------------------------------------------------ run manifest (items 6, 7)
def _quick_run(output, **model_options):
    from test_seg_training import _config
    from vfm_adapters.seg.training import train

    config = _config(output, iterations=1)
    config["model"].update(model_options)
    config["data"]["val"] = []
    return train(config, progress=False, log=lambda s: None, evaluate_at_end=False)


def test_a_run_with_missing_or_foreign_files_is_refused_naming_the_file(tmp_path, one_thread):
    import shutil

    from vfm_adapters.seg.manifest import RunManifestError
    from vfm_adapters.seg.checkpoints import load_segmentor

    _quick_run(tmp_path / "a")
    _quick_run(tmp_path / "b", method_options={"rein": {"token_length": 4, "rank": 2}}, dropout=0.2)
    load_segmentor(tmp_path / "a")  # intact: loads
    shutil.rmtree(tmp_path / "a" / "adapters")
    with pytest.raises(RunManifestError, match=r"adapters.* missing"):
        load_segmentor(tmp_path / "a")
    with pytest.raises(RunManifestError, match="adapters"):  # even unchecked, Rein is not silently dropped
        load_segmentor(tmp_path / "a", verify=False)
    shutil.copytree(tmp_path / "b" / "adapters", tmp_path / "a" / "adapters")  # another run's adapters
    with pytest.raises(RunManifestError, match=r"adapters.*(does not match|not part of)"):
        load_segmentor(tmp_path / "a")
    (tmp_path / "b" / "head.safetensors").write_bytes((tmp_path / "b" / "head.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(RunManifestError, match=r"head\.safetensors does not match"):
        load_segmentor(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(RunManifestError, match="manifest.json not found"):
        load_segmentor(tmp_path / "b")


def test_backbone_checkpoint_is_found_from_any_directory_and_its_hash_checked(tmp_path, one_thread, monkeypatch):
    from safetensors.torch import save_file

    from vfm_adapters.seg.manifest import RunManifestError
    from vfm_adapters.seg.build import build_backbone
    from vfm_adapters.seg.checkpoints import load_segmentor

    from test_seg_training import _config

    model_config = {**_config(tmp_path)["model"], "pretrained": False, "backbone_checkpoint": None}
    torch.manual_seed(3)
    host = build_backbone(model_config)
    (tmp_path / "out" / "pre").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in host.state_dict().items()}, str(tmp_path / "out" / "pre" / "backbone.safetensors"))
    monkeypatch.chdir(tmp_path)
    outcome = _quick_run(Path("out") / "rein", backbone_checkpoint="out/pre/backbone.safetensors")
    info = json.loads((tmp_path / "out" / "rein" / "segmentor.json").read_text())
    assert info["model"]["backbone_checkpoint"] == "../pre/backbone.safetensors"  # relative to the run directory
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "out" / "pre").mkdir(parents=True)  # a different backbone where the old cwd-relative path points
    torch.manual_seed(4)
    save_file({k: v.contiguous() for k, v in build_backbone(model_config).state_dict().items()},
              str(elsewhere / "out" / "pre" / "backbone.safetensors"))
    monkeypatch.chdir(elsewhere)
    model, _ = load_segmentor(tmp_path / "out" / "rein")
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model(x), outcome["model"].eval()(x), atol=1e-6)
    with torch.no_grad():  # the backbone file changes: refused
        host.pos_embed.add_(1.0)
    save_file({k: v.contiguous() for k, v in host.state_dict().items()}, str(tmp_path / "out" / "pre" / "backbone.safetensors"))
    with pytest.raises(RunManifestError, match=r"backbone checkpoint .*backbone\.safetensors changed"):
        load_segmentor(tmp_path / "out" / "rein")


# ------------------------------------------------------------------ resume, overwrite, guard, log (items 8, 9, 15)
def _split_run(tmp_path, **train_options):
    from test_seg_training import _config
    from vfm_adapters.seg.training import train

    config = _config(tmp_path / "run", iterations=6, **train_options)
    config["data"]["val"] = []
    train(config, stop_after=3, progress=False, log=lambda s: None)
    return config


@pytest.mark.parametrize("change, named", [
    (lambda c: c["train"].update(seed=1), "train.seed: 0 -> 1"),
    (lambda c: c["optim"].update(lr=5e-4), "optim.lr"),
    (lambda c: c["train"].update(batch_size=4), "train.batch_size"),
    (lambda c: c["model"]["method_options"]["rein"].update(token_length=8), "model.method_options.rein.token_length"),
])
def test_resume_refuses_a_changed_config_and_leaves_the_run_alone(tmp_path, one_thread, change, named):
    import copy

    from vfm_adapters.seg.training import train

    config = _split_run(tmp_path)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.json", "checkpoint.pt", "log.jsonl")}
    changed = copy.deepcopy(config)
    change(changed)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        train(changed, resume=True, progress=False, log=lambda s: None)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_resume_accepts_safe_changes_and_keeps_the_log_consistent(tmp_path, one_thread):
    import copy
    import time

    from vfm_adapters.seg.training import train

    config = _split_run(tmp_path)
    log = tmp_path / "run" / "log.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3]
    # a killed run had logged steps past its last checkpoint
    with open(log, "a") as stream:
        for step in (4, 5):
            stream.write(json.dumps({"step": step, "loss": 1.0, "lr": 0.0, "seconds": 999.0}) + "\n")
    time.sleep(0.05)
    safe = copy.deepcopy(config)
    safe["train"].update(iterations=7, log_interval=1, eval_interval=0)
    safe["eval"].update(stride=12)
    outcome = train(safe, resume=True, progress=False, log=lambda s: None, evaluate_at_end=False)
    assert outcome["finished"] and outcome["step"] == 7
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6, 7]  # each step once
    seconds = [e["seconds"] for e in entries]
    assert seconds == sorted(seconds) and seconds[3] >= seconds[2] and max(seconds) < 999  # cumulative, no restart
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["iterations"] == 7


def test_a_killed_overwrite_leaves_the_old_run_whole_aside_not_mixed(tmp_path, one_thread, monkeypatch):
    from test_seg_training import _config
    from vfm_adapters.seg import training

    config = _config(tmp_path / "run", iterations=1)
    config["data"]["val"] = []
    training.train(config, progress=False, log=lambda s: None)
    old = {p.relative_to(tmp_path / "run").as_posix(): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    (tmp_path / "run" / "my_notes.txt").write_text("not the run's")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    from vfm_adapters.seg.heads import Segmentor

    monkeypatch.setattr(Segmentor, "loss", killed)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, overwrite=True, progress=False, log=lambda s: None)
    run = tmp_path / "run"
    asides = list(run.glob(".replaced-*"))
    assert len(asides) == 1
    assert {p.relative_to(asides[0]).as_posix(): p.read_bytes() for p in asides[0].rglob("*") if p.is_file()} == old
    assert not any((run / name).exists() for name in ("head.safetensors", "adapters", "segmentor.json", "manifest.json"))
    assert (run / "my_notes.txt").read_text() == "not the run's"
    monkeypatch.undo()
    training.train(config, overwrite=True, progress=False, log=lambda s: None)
    assert len(list(run.glob(".replaced-*"))) == 1  # the interrupted one is kept (the user may want it back)
    assert (run / "my_notes.txt").exists()


def test_one_guard_for_train_demo_and_adapt(tmp_path, one_thread):
    from vfm_adapters.cli import main
    from vfm_adapters.seg.run_dir import RunDirectoryError
    from vfm_adapters.seg.training import train

    from test_seg_training import _config

    # a finished demo: per-method runs and the summary; a plain second demo must not replace them
    demo = tmp_path / "demo"
    (demo / "rein").mkdir(parents=True)
    (demo / "rein" / "head.safetensors").write_bytes(b"trained")
    (demo / "results.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(results.json, rein\)"):
        main(["--traceback", "demo", "--tiny", "--output", str(demo), "--no-progress", "--threads", "1", "--methods", "rein"])
    # without --traceback the CLI says the same in one line and exits 2
    assert main(["demo", "--tiny", "--output", str(demo), "--no-progress", "--threads", "1", "--methods", "rein"]) == 2
    assert (demo / "rein" / "head.safetensors").read_bytes() == b"trained"
    # train sees every run file, not only three names
    for name in ("segmentor.json", "manifest.json", "log.jsonl", "results.json"):
        run = tmp_path / f"only_{name}"
        run.mkdir()
        (run / name).write_text("{}")
        with pytest.raises(ConfigError, match="already holds a run"):
            train(_config(run, iterations=1), progress=False, log=lambda s: None)
    finished = tmp_path / "finished"  # a finished run whose checkpoint was removed (as the demo does)
    finished.mkdir()
    (finished / "head.safetensors").write_bytes(b"trained")
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt but holds a run \(head\.safetensors\)"):
        train(_config(finished, iterations=1), resume=True, progress=False, log=lambda s: None)
    assert (finished / "head.safetensors").read_bytes() == b"trained"
    with pytest.raises(ConfigError, match="exclude each other"):
        train(_config(tmp_path / "x", iterations=1), resume=True, overwrite=True, progress=False, log=lambda s: None)


# ------------------------------------------------------------------ disk full (item 13)
def test_disk_full_while_checkpointing_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, one_thread,
                                                                                         monkeypatch):
    import builtins
    import errno

    import vfm_adapters._io as io_module
    from vfm_adapters._io import DiskWriteError
    from vfm_adapters.seg.training import train

    config = _split_run(tmp_path)  # checkpoint at step 3
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()

    class FullDisk:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:  # part of the file is on disk, then the device is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    def full_open(path, mode="r", *args, **kwargs):
        stream = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(stream) if "w" in mode else stream

    monkeypatch.setattr(io_module, "open", full_open, raising=False)
    with pytest.raises(DiskWriteError, match=r"No space left on device writing .*checkpoint\.pt; the previous "
                                             r"checkpoint is intact") as info:
        train(config, resume=True, progress=False, log=lambda s: None)
    assert info.value.errno == errno.ENOSPC
    assert checkpoint.read_bytes() == before
    assert not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.undo()
    assert train(config, resume=True, progress=False, log=lambda s: None, evaluate_at_end=False)["finished"]


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS"])
def test_every_atomic_write_reports_a_full_or_read_only_disk(tmp_path, code):
    import errno

    from safetensors.torch import save_file

    from vfm_adapters._io import DiskWriteError, write_atomically

    target = tmp_path / "head.safetensors"
    target.write_bytes(b"old")

    def failing(path):
        save_file({"w": torch.zeros(2)}, path)
        raise OSError(getattr(errno, code), "simulated")

    with pytest.raises(DiskWriteError, match=r"writing .*head\.safetensors; the previous head\.safetensors is intact"):
        write_atomically(target, failing)
    assert target.read_bytes() == b"old"
    with pytest.raises(DiskWriteError, match="nothing was written"):
        write_atomically(tmp_path / "new.json", failing)
    assert not (tmp_path / "new.json").exists()


# ------------------------------------------------------------------ dataset files (item 14)
def test_a_fifo_named_like_an_image_is_skipped_or_refused_never_read(tmp_path):
    import os

    from vfm_adapters.seg import datasets as D
    from vfm_adapters.seg._png import ImageReadError

    root = _folder(tmp_path / "d", [1, 2])
    os.mkfifo(root / "images" / "9.png")  # opening it for reading would block forever
    data = D.FolderDataset(root)
    assert len(data) == 2 and all("9.png" not in str(image) for image, _ in data.samples)
    os.mkfifo(root / "labels" / "fifo.png")
    with pytest.raises(ImageReadError, match="fifo.png is not a regular file"):
        D.read_label(root / "labels" / "fifo.png")
    with pytest.raises(ImageReadError, match="9.png is not a regular file"):
        D.read_image(root / "images" / "9.png")


def test_the_16bit_png_path_applies_the_decompression_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image

    from vfm_adapters.seg._png import read_png, write_png16
    from vfm_adapters.seg.datasets import read_label

    path = tmp_path / "label.png"
    write_png16(path, np.zeros((40, 50, 3), np.uint16))  # 2000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 999)
    for reader in (read_png, read_label):
        with pytest.raises(Image.DecompressionBombError, match="label.png"):
            reader(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.warns(Image.DecompressionBombWarning):
        read_png(path)


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 3), (4, 5, 4)])
def test_16bit_images_are_scaled_not_saturated(tmp_path, shape):
    from vfm_adapters.seg._png import write_png16
    from vfm_adapters.seg.datasets import read_image

    values = np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)
    path = tmp_path / "image.png"
    write_png16(path, values)
    image = read_image(path).permute(1, 2, 0).numpy()
    grey = values if values.ndim == 2 else values[..., :3]
    expected = np.round(grey.astype(np.float64) / 257).astype(np.uint8)
    expected = np.repeat(expected[..., None], 3, axis=2) if expected.ndim == 2 else expected
    assert np.array_equal(image, expected)


def test_a_truncated_image_error_names_its_path(tmp_path):
    from PIL import Image

    from vfm_adapters.seg._png import ImageReadError, write_png16
    from vfm_adapters.seg.datasets import read_image, read_label

    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(path)
    with pytest.raises(ImageReadError, match="broken.png"):
        read_label(path)
    sixteen = tmp_path / "broken16.png"
    write_png16(sixteen, np.random.default_rng(0).integers(0, 65536, (32, 32, 3)).astype(np.uint16))
    sixteen.write_bytes(sixteen.read_bytes()[:1500])
    with pytest.raises(ImageReadError, match="broken16.png"):
        read_label(sixteen, channel=0)
    jpeg = tmp_path / "broken.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:800])
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image(jpeg)


def test_config_differences_name_changed_keys_and_skip_safe_or_new_default_ones():
    import copy

    from vfm_adapters.seg.checkpoints import config_differences

    stored = load_config({})
    current = copy.deepcopy(stored)
    current["train"]["iterations"] += 10
    current["eval"]["stride"] = 100
    current["data"]["val"] = [{"type": "synthetic"}]
    del stored["optim"]["grad_clip"]  # a checkpoint from a version without this key, now at its default
    assert config_differences(stored, current) == []
    current["model"]["method_options"] = {"rein": {"token_length": 50}}
    current["optim"]["grad_clip"] = 1.0
    assert config_differences(stored, current) == ["model.method_options.rein.token_length: '<absent>' -> 50",
                                                   "optim.grad_clip: '<absent>' -> 1.0"]
