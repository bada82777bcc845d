"""Sharing adapters: Hub ids from an offline cache, push_to_hub, transformers and timm round trips.

Nothing here reaches the network: a Hub cache is written in the test in the layout
``huggingface_hub`` uses (``models--org--name/{blobs, refs, snapshots}``) and the Hub is
put in offline mode; ``push_adapters_to_hub`` runs against a stand-in ``HfApi``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import types
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from torch import nn

import vfm_adapters as va
from model_zoo import make_model, token_output
from vfm_adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME

MAIN_COMMIT = "1" * 40
TAG_COMMIT = "2" * 40


def tiny_timm_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, embed_dim=64,
                             num_heads=2, img_size=56).eval()


def randomise_adapters(model: nn.Module, seed: int) -> nn.Module:
    """Adapters start at (or near) the identity; random values make a lost adapter visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in va.adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def adapted_timm_vit(seed: int) -> nn.Module:
    return randomise_adapters(va.inject_rein(tiny_timm_vit(), token_length=4, rank=2), seed)


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str | None = "main") -> Path:
    """Writes one snapshot the way huggingface_hub does: content-addressed blobs, relative symlinks, a ref file."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def directory_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache in tmp_path, offline. huggingface_hub reads both settings at import
    time into its ``constants`` module, so those are patched as well as the environment."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    workdir = tmp_path / "cwd"  # so that no relative "org/name" directory exists by accident
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return cache


# ---- loading from a Hub id -----------------------------------------------------------------


def test_a_hub_id_loads_the_adapters_from_the_offline_cache(offline_hub, tmp_path):
    trained = adapted_timm_vit(seed=1)
    saved = va.save_adapters(trained, tmp_path / "saved")
    snapshot = write_hub_cache(offline_hub, "someuser/rein-tiny", directory_files(saved), MAIN_COMMIT)

    assert va.resolve_adapter_source("someuser/rein-tiny") == snapshot
    fresh = va.load_adapters(tiny_timm_vit(), "someuser/rein-tiny")
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert va.injected_methods(fresh) == ["rein"]
        assert torch.equal(fresh.forward_features(images), trained.forward_features(images))
        assert not torch.equal(fresh.forward_features(images), tiny_timm_vit().forward_features(images))


def test_revision_selects_a_tag_or_a_commit(offline_hub, tmp_path):
    on_main, on_tag = adapted_timm_vit(seed=1), adapted_timm_vit(seed=2)
    write_hub_cache(offline_hub, "org/rein", directory_files(va.save_adapters(on_main, tmp_path / "a")), MAIN_COMMIT)
    write_hub_cache(offline_hub, "org/rein", directory_files(va.save_adapters(on_tag, tmp_path / "b")), TAG_COMMIT, ref="v1")
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = {None: on_main.forward_features(images), "v1": on_tag.forward_features(images),
                    TAG_COMMIT: on_tag.forward_features(images)}
        for revision, output in expected.items():
            loaded = va.load_adapters(tiny_timm_vit(), "org/rein", revision=revision)
            assert torch.equal(loaded.forward_features(images), output), revision


def test_a_local_directory_wins_over_a_hub_id_of_the_same_spelling(offline_hub, tmp_path):
    on_hub, local = adapted_timm_vit(seed=1), adapted_timm_vit(seed=2)
    write_hub_cache(offline_hub, "org/rein", directory_files(va.save_adapters(on_hub, tmp_path / "a")), MAIN_COMMIT)
    va.save_adapters(local, Path("org/rein"))  # relative to the working directory

    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        loaded = va.load_adapters(tiny_timm_vit(), "org/rein")
        assert torch.equal(loaded.forward_features(images), local.forward_features(images))
    with pytest.raises(ValueError, match="local directory always wins.*revision='v1' applies to Hub ids only"):
        va.load_adapters(tiny_timm_vit(), "org/rein", revision="v1")


def test_errors_say_it_is_not_a_directory_here_and_why_the_hub_failed(offline_hub, tmp_path):
    model = tiny_timm_vit()
    with pytest.raises(FileNotFoundError) as error:
        va.load_adapters(model, "org/absent")
    message = str(error.value)
    assert "'org/absent' is not a directory here" in message
    assert "offline (HF_HUB_OFFLINE is set)" in message and "not in the local cache" in message

    with pytest.raises(FileNotFoundError, match="not a directory here, and it is not a Hugging Face Hub id"):
        va.load_adapters(model, "./runs/no/such/dir")
    with pytest.raises(FileNotFoundError, match="not a directory here"):
        va.load_adapters(model, tmp_path / "missing")

    # A repository whose cache lacks the weights: named, and nothing is injected.
    config_only = directory_files(va.save_adapters(adapted_timm_vit(seed=1), tmp_path / "a"))
    del config_only[WEIGHTS_NAME]
    write_hub_cache(offline_hub, "org/half", config_only, MAIN_COMMIT)
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} of 'org/half' is not in the local cache"):
        va.load_adapters(model, "org/half")
    assert va.injected_methods(model) == []


def test_hub_failures_online_are_named(monkeypatch):
    """Not found, missing file, missing revision: the Hub's errors, mapped to one sentence each."""
    from huggingface_hub import errors
    from vfm_adapters import hub

    response = type("Response", (), {"status_code": 404, "headers": {}, "request": None})()
    cases = [
        (errors.RepositoryNotFoundError("404", response=response), "was not found on the Hub"),
        (errors.RevisionNotFoundError("404", response=response), "has no revision 'v9'"),
        (errors.RemoteEntryNotFoundError("404", response=response), f"holds no {CONFIG_NAME}"),
    ]
    for raised, expected in cases:
        def fail(*args, error=raised, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
        with pytest.raises(FileNotFoundError, match=expected) as caught:
            hub.resolve_adapter_source("org/remote", revision="v9")
        assert "'org/remote' is not a directory here" in str(caught.value)
        assert caught.value.__cause__ is raised


# ---- pushing -------------------------------------------------------------------------------


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, **options):
        RecordingHfApi.calls.append(("init", options))

    def create_repo(self, repo_id, **options):
        RecordingHfApi.calls.append(("create_repo", dict(repo_id=repo_id, **options)))
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **options):
        files = directory_files(Path(folder_path))
        RecordingHfApi.calls.append(("upload_folder", dict(repo_id=repo_id, files=files, **options)))

    def create_commit(self, repo_id, operations, **options):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        RecordingHfApi.calls.append(("create_commit", dict(repo_id=repo_id, files=files, **options)))
        return "commit-info"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


def test_push_uploads_both_files_and_a_model_card_in_one_commit(recording_api, offline_hub, tmp_path):
    trained = randomise_adapters(va.inject_rein(tiny_timm_vit(), token_length=5, rank=3), seed=3)
    result = va.push_adapters_to_hub(trained, "someuser/rein-tiny", private=True, token="hf_x",
                                     commit_message="first adapters", base_model="timm/vit_small_patch14_dinov2.lvd142m")
    assert result == "commit-info"
    kinds = [kind for kind, _ in recording_api.calls]
    assert kinds == ["init", "create_repo", "create_commit"]
    assert recording_api.calls[0][1]["token"] == "hf_x"
    assert recording_api.calls[1][1] == dict(repo_id="someuser/rein-tiny", private=True, exist_ok=True, repo_type="model")
    commit = recording_api.calls[2][1]
    assert commit["commit_message"] == "first adapters"
    assert sorted(commit["files"]) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]

    tensors = load_file_bytes(commit["files"][WEIGHTS_NAME], tmp_path)
    assert set(tensors) == set(va.adapter_state_dict(trained))
    card = commit["files"]["README.md"].decode()
    count = sum(t.numel() for t in va.adapter_state_dict(trained).values())
    for expected in [
        "library_name: vfm_adapters", "base_model: timm/vit_small_patch14_dinov2.lvd142m", "- rein",
        "`timm.VisionTransformer`, width 64, 2 blocks", "`token_length=5`", "`rank=3`",
        f"Adapter parameters: {count:,}", f"`vfm_adapters` {va.__version__}",
        'va.load_adapters(model, "someuser/rein-tiny")',
        'timm.create_model("hf-hub:timm/vit_small_patch14_dinov2.lvd142m", pretrained=True)',
    ]:
        assert expected in card, expected

    # What was uploaded is what a download serves: the round trip through the Hub layout.
    uploaded = {k: v for k, v in commit["files"].items()}
    write_hub_cache(offline_hub, "someuser/rein-tiny", uploaded, MAIN_COMMIT)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        loaded = va.load_adapters(tiny_timm_vit(), "someuser/rein-tiny")
        assert torch.equal(loaded.forward_features(images), trained.forward_features(images))


def load_file_bytes(data: bytes, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "uploaded.safetensors"
    path.write_bytes(data)
    return load_file(path)


def test_push_from_a_directory_and_refusals_before_any_upload(recording_api, tmp_path):
    saved = va.save_adapters(adapted_timm_vit(seed=1), tmp_path / "saved")
    va.push_adapters_to_hub(saved, "org/from-dir")
    commit = recording_api.calls[-1][1]
    assert commit["files"][CONFIG_NAME] == (saved / CONFIG_NAME).read_bytes()
    assert commit["files"][WEIGHTS_NAME] == (saved / WEIGHTS_NAME).read_bytes()
    assert commit["commit_message"] == "Upload rein adapters with vfm_adapters"
    assert "model = ...  # your timm.VisionTransformer host: width 64, 2 blocks" in commit["files"]["README.md"].decode()

    recording_api.calls = []
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="config but no weights"):
        va.push_adapters_to_hub(saved, "org/from-dir")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        va.push_adapters_to_hub(tmp_path / "nothing", "org/from-dir")
    with pytest.raises(ValueError, match="repo_id must be a Hugging Face Hub id"):
        va.push_adapters_to_hub(adapted_timm_vit(seed=1), "not//valid")
    with pytest.raises(va.AdapterError, match="no adapters to save"):
        va.push_adapters_to_hub(tiny_timm_vit(), "org/empty")
    assert recording_api.calls == []


# ---- transformers hosts --------------------------------------------------------------------


def adapted_hf_dinov2(methods: tuple[str, ...], seed: int = 5) -> tuple[nn.Module, torch.Tensor]:
    model, size = make_model("hf_dinov2")
    if "rein" in methods:
        va.inject_rein(model, token_length=4, rank=2)
    if "lora" in methods:
        va.inject_lora(model, rank=2)
    randomise_adapters(model, seed)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("methods", [("rein",), ("lora",), ("rein", "lora")], ids="+".join)
def test_transformers_save_pretrained_and_from_pretrained_keep_the_adapters(methods, tmp_path):
    model, images = adapted_hf_dinov2(methods)
    plain, _ = make_model("hf_dinov2")
    with torch.no_grad():
        expected = token_output(model, images)
        assert not torch.allclose(expected, token_output(plain, images))  # the adapters matter

    saved = va.save_pretrained(model, tmp_path / "model")
    plain.save_pretrained(tmp_path / "plain")
    host_keys = set(load_file(saved / "model.safetensors"))
    assert host_keys == set(load_file(tmp_path / "plain" / "model.safetensors"))  # no adapter or base_layer keys

    loaded = va.from_pretrained(transformers.Dinov2Model, saved)
    assert va.injected_methods(loaded) == list(methods)
    assert loaded.config._name_or_path == str(saved)
    with torch.no_grad():
        assert torch.equal(token_output(loaded, images), expected)
    # The host weights came back too, not re-initialised: removing the adapters gives the plain model.
    with torch.no_grad():
        assert torch.equal(token_output(va.remove_adapters(loaded), images), token_output(plain, images))


def test_plain_save_pretrained_keeps_the_adapters_and_says_how_to_load(tmp_path):
    model, images = adapted_hf_dinov2(("lora",))
    with pytest.warns(UserWarning, match=r"vfm_adapters.from_pretrained\(Dinov2Model"):
        model.save_pretrained(tmp_path / "plain")
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "plain"))
    with torch.no_grad():
        loaded = va.from_pretrained(transformers.Dinov2Model, tmp_path / "plain")
        assert torch.equal(token_output(loaded, images), token_output(model, images))
    # The class's own from_pretrained does not silently drop them: PEFT's loader refuses the directory.
    with pytest.raises(TypeError, match="peft_type"):
        transformers.Dinov2Model.from_pretrained(tmp_path / "plain")

    # A full state dict passed in (as transformers' Trainer does) is written under the host's names too.
    with pytest.warns(UserWarning):
        model.save_pretrained(tmp_path / "trainer", state_dict=model.state_dict())
    assert set(load_file(tmp_path / "trainer" / "model.safetensors")) == set(load_file(tmp_path / "plain" / "model.safetensors"))
    with torch.no_grad():
        loaded = va.from_pretrained(transformers.Dinov2Model, tmp_path / "trainer")
        assert torch.equal(token_output(loaded, images), token_output(model, images))

    # A deep copy saves its own adapters; without adapters save_pretrained is the class's again.
    duplicate = copy.deepcopy(model)
    assert duplicate.save_pretrained.model is duplicate
    va.remove_adapters(model)
    model.save_pretrained(tmp_path / "host")
    assert CONFIG_NAME not in os.listdir(tmp_path / "host")


def test_merged_lora_is_refused_before_anything_is_written(tmp_path):
    model, _ = adapted_hf_dinov2(("lora",))
    va.merge_lora(model)
    with pytest.raises(va.AdapterError, match="unmerge_lora"):
        va.save_pretrained(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        va.save_pretrained(adapted_timm_vit(seed=1), tmp_path / "timm")


def test_from_pretrained_reads_a_hub_id_and_refuses_a_plain_model(offline_hub, tmp_path):
    model, images = adapted_hf_dinov2(("rein",))
    saved = va.save_pretrained(model, tmp_path / "model")
    write_hub_cache(offline_hub, "org/dinov2-rein", directory_files(saved), MAIN_COMMIT)
    loaded = va.from_pretrained(transformers.Dinov2Model, "org/dinov2-rein")
    with torch.no_grad():
        assert torch.equal(token_output(loaded, images), token_output(model, images))

    plain, _ = make_model("hf_dinov2")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not a model saved with vfm_adapters.save_pretrained"):
        va.from_pretrained(transformers.Dinov2Model, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not a directory here, and the Hub is offline"):
        va.from_pretrained(transformers.Dinov2Model, "org/absent")


# ---- timm hosts: host weights from a local file, adapters from a directory or the Hub ------


@pytest.mark.parametrize("where", ["directory", "hub"])
def test_timm_host_weights_from_a_local_file_with_adapters(where, offline_hub, tmp_path):
    pretrained = tiny_timm_vit(seed=7)
    with torch.no_grad():
        for param in pretrained.parameters():
            param.add_(0.05)  # differs from a fresh random init
    host_file = tmp_path / "host.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(host_file))
    trained = randomise_adapters(va.inject_rein(pretrained, token_length=4, rank=2), seed=8)
    saved = va.save_adapters(trained, tmp_path / "adapters")
    source: str | Path = saved
    if where == "hub":
        write_hub_cache(offline_hub, "org/rein-timm", directory_files(saved), MAIN_COMMIT)
        source = "org/rein-timm"

    host = timm.create_model("vit_small_patch14_dinov2", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(host_file)),
                             depth=2, embed_dim=64, num_heads=2, img_size=56).eval()
    model = va.load_adapters(host, source)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), trained.forward_features(images))


def test_transformers_push_to_hub_uploads_the_adapters_too(offline_hub, monkeypatch, tmp_path):
    """model.push_to_hub saves through model.save_pretrained, so the guarded one carries the adapters."""
    import transformers.utils.hub as transformers_hub

    model, images = adapted_hf_dinov2(("rein",))
    fake_api = types.SimpleNamespace(create_repo=lambda repo_id, **options: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(transformers_hub, "_hf_api", fake_api)
    uploaded: dict[str, bytes] = {}

    def capture(folder, repo_id, **options):
        uploaded.update(directory_files(Path(folder)))

    monkeypatch.setattr(model, "_upload_modified_files", capture, raising=False)
    with pytest.warns(UserWarning, match="vfm_adapters.from_pretrained"):
        model.push_to_hub("org/dinov2-rein")
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= set(uploaded)

    write_hub_cache(offline_hub, "org/dinov2-rein", uploaded, MAIN_COMMIT)
    with torch.no_grad():
        loaded = va.from_pretrained(transformers.Dinov2Model, "org/dinov2-rein")
        assert torch.equal(token_output(loaded, images), token_output(model, images))


def test_save_pretrained_with_push_to_hub_uploads_after_the_adapters_are_written(recording_api, tmp_path):
    model, _ = adapted_hf_dinov2(("rein",))
    with pytest.warns(UserWarning, match="vfm_adapters.from_pretrained"):
        model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/dinov2-rein", private=True,
                              commit_message="v1")
    kinds = [kind for kind, _ in recording_api.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert recording_api.calls[1][1]["private"] is True
    upload = recording_api.calls[2][1]
    assert upload["repo_id"] == "org/dinov2-rein" and upload["commit_message"] == "v1"
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= set(upload["files"])
