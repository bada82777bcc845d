"""The authors' training and evaluation protocol (Rein paper configs): neck, optimiser
groups, train resize, photometric hue range, patch conversion, schedules, Mapillary,
and the whole-segmentor report over every paper config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vfm_adapters.seg.features import InterpolationNeck, MultiLevelNeck, MultiScaleNeck, build_neck
from vfm_adapters.seg.build import build_segmentor
from vfm_adapters.seg.config import DEFAULTS


TINY_M2F = dict(num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
                pixel_decoder_ffn_dim=32, num_points=16)


def tiny_model_config(**overrides):
    config = {**DEFAULTS["model"], "backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 64, "patch_size": 16, "depth": 4,
              "embed_dim": 32, "num_heads": 2}, "methods": ["rein"], "num_classes": 3, "head_channels": 16}
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- 1. neck
def test_interpolation_neck_is_parameter_free_bilinear():
    neck = InterpolationNeck(8)
    assert sum(p.numel() for p in neck.parameters()) == 0
    maps = [torch.randn(2, 8, 5, 7) for _ in range(4)]
    out = neck(maps)
    for feature, result, scale in zip(maps, out, (4, 2, 1, 0.5)):
        expected = feature if scale == 1 else F.interpolate(feature, scale_factor=scale, mode="bilinear",
                                                            align_corners=False)
        assert torch.equal(result, expected)
    assert [tuple(o.shape[-2:]) for o in out] == [(20, 28), (10, 14), (5, 7), (2, 3)]


def test_multilevel_neck_matches_mmseg_structure():
    channels = 8
    neck = MultiLevelNeck(channels)
    assert sum(p.numel() for p in neck.parameters()) == 4 * (channels * channels + channels) + 4 * (9 * channels * channels + channels)
    x = torch.randn(1, channels, 4, 4)
    out = neck([x] * 4)
    lateral, conv = neck.lateral_convs[0], neck.convs[0]
    expected = conv(F.interpolate(lateral(x), scale_factor=4.0, mode="bilinear", align_corners=False))
    assert torch.allclose(out[0], expected)
    assert all(float(c.bias.detach().abs().sum()) == 0 for c in neck.convs)


def test_learnable_neck_kept_and_unknown_neck_rejected():
    assert isinstance(build_neck("learnable", 8), MultiScaleNeck)
    assert sum(p.numel() for p in MultiScaleNeck(1024).parameters()) == 12_588_032  # ~12.6M, not the paper's
    try:
        build_neck("fpn", 8)
    except ValueError as error:
        assert "interpolate" in str(error)
    else:
        raise AssertionError("an unknown neck must be refused")


def test_segmentors_take_the_neck_from_the_config():
    fpn = build_segmentor(tiny_model_config(neck="interpolate"))
    assert isinstance(fpn.neck, InterpolationNeck) and fpn.settings["neck"] == "interpolate"
    assert fpn(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    m2f = build_segmentor(tiny_model_config(neck="interpolate", head="mask2former", head_options=dict(TINY_M2F),
                                            method_options={"rein": {"token_length": 4, "query_dim": 32}}))
    assert isinstance(m2f.neck, InterpolationNeck) and sum(p.numel() for p in m2f.neck.parameters()) == 0
    assert m2f(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    old = build_segmentor(tiny_model_config())  # default stays the library's learnable neck
    assert isinstance(old.neck, MultiScaleNeck)


# ----------------------------------------------------------------------------- 6. decay groups
def test_decay_groups_follow_the_authors_names():
    import vfm_adapters as va
    from vfm_adapters.optim import authors_name
    from vfm_adapters.seg.optim import parameter_groups

    model = build_segmentor(tiny_model_config(neck="learnable", head="mask2former", head_options=dict(TINY_M2F),
                                              method_options={"rein": {"token_length": 4, "query_dim": 32,
                                                                       "link_queries": False}}))
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=1.0)
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    rein = "features.model.vfm_adapters.rein."
    for exempt in (rein + "tokens_a", rein + "tokens_b", rein + "scale",
                   "head.transformer.queries_embedder.weight",  # their query_embed
                   "head.transformer.level_embed.weight",  # their level_embed
                   "neck.branches.0.1.weight", "neck.branches.0.1.bias",  # GroupNorm
                   "head.pixel_decoder.input_projections.0.1.weight",  # GroupNorm
                   "head.transformer.decoder.layers.0.self_attn_layer_norm.bias",
                   "head.transformer.decoder.layernorm.weight"):
        assert decay[exempt] == 0.0, exempt
    for decays in (rein + "token_to_feature.weight", rein + "token_to_feature.bias",  # biases decay
                   rein + "delta_feature.weight", rein + "delta_feature.bias",
                   "head.transformer.queries_features.weight",  # their query_feat decays
                   "head.pixel_decoder.level_embed",  # their level_encoding decays
                   "head.class_predictor.bias", "neck.branches.0.0.bias",
                   "head.transformer.decoder.layers.0.fc1.bias"):
        assert decay[decays] == 0.05, decays
    assert authors_name(rein + "scale").endswith("reins.scale")
    # the public helper agrees with the trainer's groups
    public = va.param_groups(model, weight_decay=0.05)
    ids = {id(p): g["weight_decay"] for g in public for p in g["params"]}
    named = dict(model.named_parameters())
    assert {name: ids[id(named[name])] for name in decay} == decay


def test_full_fine_tuning_decays_host_positions_not_norms():
    from vfm_adapters.optim import no_decay_names

    model = build_segmentor(tiny_model_config(methods=["full"], neck="interpolate"))
    exempt = no_decay_names(model)
    assert not exempt["features.model.pos_embed"] and not exempt["features.model.cls_token"]
    assert not exempt["features.model.blocks.0.ls1.gamma"] and not exempt["features.model.blocks.0.attn.qkv.bias"]
    assert exempt["features.model.blocks.0.norm1.weight"] and exempt["features.model.norm.bias"]


# ----------------------------------------------------------------------------- 2. train resize, hue, padding
def test_random_choice_resize_draws_only_the_16_short_sides_and_caps_the_long_side():
    import numpy as np

    from vfm_adapters.seg.transforms import RandomChoiceResize, paper_short_sides

    sides = paper_short_sides(512)
    assert sides == tuple(int(512 * x * 0.1) for x in range(5, 21)) and len(set(sides)) == 16
    assert sides[0] == 256 and sides[-1] == 1024
    resize = RandomChoiceResize(sides, max_long_side=2048, image_mode="nearest")
    rng = np.random.default_rng(0)
    seen_gta, capped = set(), 0
    # one channel keeps the test fast; the sizes do not depend on the channels
    gta = {"image": torch.zeros(1, 1052, 1914, dtype=torch.uint8), "label": torch.zeros(1052, 1914, dtype=torch.uint8)}
    wide = {"image": torch.zeros(1, 100, 300, dtype=torch.uint8), "label": torch.zeros(100, 300, dtype=torch.uint8)}
    for _ in range(120):
        out = resize(gta, rng=rng)
        h, w = out["image"].shape[-2:]
        assert out["label"].shape == (h, w) and h in sides and max(h, w) <= 2048
        assert w == int(1914 * h / 1052 + 0.5)
        seen_gta.add(h)
        out = resize(wide, rng=rng)
        h, w = out["image"].shape[-2:]
        assert w <= 2048
        if w == 2048:  # the long side is capped: the short side is below the drawn value
            capped += 1
            assert h == int(100 * 2048 / 300 + 0.5)
        else:
            assert h in sides
    assert seen_gta == set(sides)  # every value drawn, nothing else
    assert capped > 0


def test_paper_pipeline_pads_after_normalisation_with_zero_and_ignore():
    import numpy as np

    from vfm_adapters.seg.transforms import train_transform

    pipeline = train_transform((64, 64), resize="short_side_choice", short_sides=[32], photometric=False, flip=0.0)
    sample = {"image": torch.full((3, 40, 40), 255, dtype=torch.uint8), "label": torch.ones(40, 40, dtype=torch.long)}
    out = pipeline(sample, rng=np.random.default_rng(0))
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (64, 64)
    assert torch.all(out["image"][:, 32:] == 0) and torch.all(out["image"][:, :, 32:] == 0)  # zero AFTER normalising
    assert torch.all(out["label"][32:] == 255) and torch.all(out["label"][:32, :32] == 1)
    assert torch.all(out["image"][:, :32, :32] > 1)  # white, normalised
    assert "RandomChoiceResize(short_sides=(32,), max_long_side=256)" in repr(pipeline)


def test_photometric_hue_range_is_opencv_180_scale():
    import numpy as np

    from vfm_adapters.seg.transforms import PhotoMetricDistortion, hsv_to_rgb, rgb_to_hsv

    distortion = PhotoMetricDistortion()
    rng = np.random.default_rng(0)
    shifts = [distortion.hue_shift_degrees(rng) for _ in range(4000)]
    assert set(shifts) == {2.0 * k for k in range(-18, 18)}  # mmseg's randint(-18, 18) on OpenCV's 0..180 hue
    assert min(shifts) == -36.0 and max(shifts) == 34.0
    # an applied shift: an orange moves by the drawn hue (no other step changes hue: nothing clips)
    red = torch.zeros(3, 2, 2, dtype=torch.uint8)
    red[0], red[1], red[2] = 120, 80, 60
    moved = []
    for seed in range(60):
        out = distortion({"image": red}, rng=np.random.default_rng(seed))["image"] / 255.0
        delta = (rgb_to_hsv(out)[0, 0, 0] - rgb_to_hsv(red.float() / 255.0)[0, 0, 0]).item() * 360.0
        moved.append((delta + 180.0) % 360.0 - 180.0)
    assert max(abs(m) for m in moved) > 18.5  # beyond the old +-18 degrees
    assert max(abs(m) for m in moved) <= 36.0 + 1e-3
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(red.float() / 255)), red.float() / 255, atol=1e-6)


# ----------------------------------------------------------------------------- 7. precision, Full lr; every paper config
from pathlib import Path  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "examples" / "configs" / "paper"
PAPER_CONFIGS = sorted(p for p in PAPER.glob("*.yaml") if p.name != "expected_miou.yaml")


def test_every_paper_config_states_the_authors_protocol():
    from vfm_adapters.seg.config import load_config

    assert len(PAPER_CONFIGS) >= 12
    for path in PAPER_CONFIGS:
        config = load_config(path)
        assert config["train"]["mixed_precision"] == "no", path.name  # fp32
        assert config["data"]["resize"] == "short_side_choice", path.name
        assert config["data"]["cat_max_ratio"] == 0.75 and config["data"]["flip"] == 0.5, path.name
        assert config["optim"]["no_decay"] == "authors" and config["optim"]["weight_decay"] == 0.05, path.name
        expected_neck = "multilevel" if "clip" in path.name else "interpolate"
        assert config["model"]["neck"] == expected_neck, path.name
    full = load_config(PAPER / "gtav_dinov2_l_full.yaml")
    assert full["optim"]["backbone_lr_mult"] == 1.0 and full["optim"]["lr"] == 1e-4


def test_train_command_precision_flags():
    import argparse

    from vfm_adapters.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert parser.parse_args(["c.yaml", "--bf16"]).mixed_precision == "bf16"
    assert parser.parse_args(["c.yaml", "--mixed-precision", "no"]).mixed_precision == "no"
    assert parser.parse_args(["c.yaml"]).mixed_precision is None


# ----------------------------------------------------------------------------- 3. patch 14 -> 16
def _cubic_weights_float64(in_size: int, out_size: int):
    """PyTorch's bicubic (A = -0.75, half-pixel centres, border taps clamped) as an (out, in) matrix."""
    import numpy as np

    a = -0.75

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        source = (i + 0.5) * scale - 0.5
        base = int(np.floor(source))
        t = source - base
        for offset in (-1, 0, 1, 2):
            index = min(max(base + offset, 0), in_size - 1)
            matrix[i, index] += kernel(offset - t)
    return matrix


def test_bicubic_patch_conversion_matches_a_float64_computation():
    import numpy as np

    from vfm_adapters.seg.patch_resample import bicubic_patch_embed, bicubic_pos_embed

    torch.manual_seed(0)
    kernel = torch.randn(4, 3, 14, 14)
    ours = bicubic_patch_embed(kernel, (16, 16)).double().numpy()
    w = _cubic_weights_float64(14, 16)
    expected = np.einsum("oi,bcij,pj->bcop", w, kernel.double().numpy(), w)
    assert np.abs(ours - expected).max() < 1e-5
    pos = torch.randn(1, 1 + 37 * 37, 6)
    converted = bicubic_pos_embed(pos, (32, 32), num_prefix=1)
    assert torch.equal(converted[:, :1], pos[:, :1])  # CLS position kept
    w = _cubic_weights_float64(37, 32)
    grid = pos[0, 1:].double().numpy().reshape(37, 37, 6)
    expected = np.einsum("oi,ijc,pj->opc", w, grid, w).reshape(1024, 6)
    assert np.abs(converted[0, 1:].double().numpy() - expected).max() < 1e-5


def test_bicubic_and_pseudo_inverse_conversions_differ_on_a_smooth_patch():
    from timm.layers import resample_patch_embed

    from vfm_adapters.seg.patch_resample import bicubic_patch_embed

    kernel = torch.randn(8, 3, 1, 1).expand(8, 3, 14, 14).contiguous()  # smooth (constant) kernel
    patch14, patch16 = torch.ones(3, 14, 14), torch.ones(3, 16, 16)  # a constant image patch
    original = (kernel * patch14).sum((1, 2, 3))
    bicubic = (bicubic_patch_embed(kernel, (16, 16)) * patch16).sum((1, 2, 3))
    pinv = (resample_patch_embed(kernel, [16, 16]) * patch16).sum((1, 2, 3))
    assert torch.allclose(bicubic / original, torch.full((8,), (16 / 14) ** 2), rtol=1e-4)  # x1.31
    assert torch.allclose(pinv / original, torch.ones(8), atol=0.05)  # about x1.0


def test_build_backbone_uses_the_configured_patch_conversion(tmp_path):
    import timm
    from safetensors.torch import save_file

    from vfm_adapters.seg.patch_resample import bicubic_patch_embed, bicubic_pos_embed
    from vfm_adapters.seg.build import build_backbone
    from vfm_adapters.seg.config import ConfigError

    arch = {"depth": 1, "embed_dim": 16, "num_heads": 2}
    torch.manual_seed(0)
    native = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **arch)  # native 518 px, 37x37 grid
    weights = tmp_path / "native.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(weights))
    kwargs = {"img_size": 64, "patch_size": 16, **arch,
              "pretrained_cfg_overlay": {"file": str(weights), "num_classes": 0}}
    base = {**DEFAULTS["model"], "backbone": "vit_small_patch14_dinov2", "pretrained": True, "backbone_kwargs": kwargs}
    bicubic = build_backbone({**base, "patch_resample": "bicubic"})
    expected = bicubic_patch_embed(native.patch_embed.proj.weight.detach(), (16, 16))
    assert torch.allclose(bicubic.patch_embed.proj.weight, expected)
    assert torch.allclose(bicubic.pos_embed, bicubic_pos_embed(native.pos_embed.detach(), (4, 4), 1))
    assert torch.equal(bicubic.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)
    timm_way = build_backbone({**base, "patch_resample": "timm"})
    assert not torch.allclose(timm_way.patch_embed.proj.weight, expected, atol=1e-3)
    assert not torch.allclose(timm_way.pos_embed, bicubic.pos_embed, atol=1e-4)  # timm anti-aliases
    try:
        build_backbone({**base, "patch_resample": "nearest"})
    except ConfigError as error:
        assert "bicubic" in str(error)
    else:
        raise AssertionError("an unknown patch_resample must be refused")


# ----------------------------------------------------------------------------- 5. ACDC schedule and batch
def test_acdc_warmup_then_poly_restart_learning_rate():
    from vfm_adapters.seg.config import load_config

    config = load_config(PAPER / "citys_acdc_dinov2_l_rein_1024.yaml")
    oc = config["optim"]
    assert oc["schedule"] == "warmup_poly_restart" and oc["warmup_iters"] == 10000 and oc["lr"] == 6e-5
    assert config["train"]["iterations"] == 40000
    assert config["train"]["batch_size"] == 2 and config["train"]["total_batch_size"] == 8
    # the trainer's own scheduler, stepped on a dummy optimiser
    from vfm_adapters.optim import warmup_poly_restart_factor

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=oc["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_poly_restart_factor(
        s, 40000, oc["warmup_iters"], oc["warmup_ratio"], oc["poly_power"]))
    seen = {}
    for step in range(40001):
        if step in (0, 5000, 10000, 25000, 40000):
            seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    base = 6e-5
    assert abs(seen[0] - base * 1e-6) < 1e-15
    assert abs(seen[5000] - base * (1e-6 + (1 - 1e-6) * 0.5)) < 1e-12
    assert abs(seen[10000] - base) < 1e-12  # poly restarts from the base lr
    assert abs(seen[25000] - base * 0.5 ** 0.9) < 1e-12  # half-way through 10k-40k
    assert seen[40000] == 0.0


def test_effective_batch_by_accumulation_is_printed(tmp_path):
    from vfm_adapters.optim import resolve_grad_accum
    from vfm_adapters.seg.config import ConfigError
    from vfm_adapters.seg.training import train

    assert resolve_grad_accum(2, 1, 8, 1) == 4 and resolve_grad_accum(2, 1, 8, 4) == 1
    config = {
        "model": {"backbone": "vit_tiny_patch16_224", "neck": "interpolate",
                  "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2},
                  "methods": ["rein"], "method_options": {"rein": {"token_length": 2, "rank": 2}},
                  "num_classes": 7, "head_channels": 8},
        "data": {"train": [{"type": "synthetic", "num_images": 4, "size": 32, "seed": 1}], "crop_size": [32, 32],
                 "resize": "short_side_choice", "short_sides": [32, 40], "num_workers": 0},
        "optim": {"schedule": "warmup_poly_restart", "warmup_iters": 1},
        "train": {"iterations": 2, "batch_size": 1, "total_batch_size": 4, "mixed_precision": "no",
                  "checkpoint_interval": 0, "output_dir": str(tmp_path / "run")},
    }
    lines: list[str] = []
    outcome = train(config, progress=False, log=lines.append, evaluate_at_end=False)
    assert outcome["finished"]
    assert any("effective batch 4 = 1 per process x 4 accumulation step(s) x 1 process(es)" in line for line in lines)
    config["train"]["total_batch_size"] = 3
    config["train"]["batch_size"] = 2
    try:
        train(config, progress=False, log=lines.append, evaluate_at_end=False, overwrite=True)
    except ConfigError as error:
        assert "total_batch_size" in str(error)
    else:
        raise AssertionError("a total batch that the per-process batch does not divide must be refused")


# ----------------------------------------------------------------------------- 4. Mapillary
#: The 66 Mapillary Vistas v1.2 class names (config_v1.2.json order).
VISTAS_V12 = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge", "Building",
    "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox", "Manhole",
    "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole", "Traffic Light",
    "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle",
    "Unlabeled",
)


def test_mapillary_table_is_the_authors_for_all_66_ids():
    from vfm_adapters.seg.datasets import CITYSCAPES_CLASSES, MAPILLARY_ID_TO_TRAINID, make_lut

    assert len(VISTAS_V12) == 66
    expected = {
        "road": {"Bike Lane", "Crosswalk - Plain", "Parking", "Road", "Service Lane", "Lane Marking - Crosswalk",
                 "Lane Marking - General"},
        "sidewalk": {"Curb", "Curb Cut", "Pedestrian Area", "Sidewalk"}, "building": {"Building"}, "wall": {"Wall"},
        "fence": {"Fence"}, "pole": {"Street Light", "Pole", "Utility Pole"}, "traffic light": {"Traffic Light"},
        "traffic sign": {"Traffic Sign Frame", "Traffic Sign (Back)", "Traffic Sign (Front)"},
        "vegetation": {"Vegetation"}, "terrain": {"Terrain"}, "sky": {"Sky"}, "person": {"Person"},
        "rider": {"Bicyclist", "Motorcyclist", "Other Rider"}, "car": {"Car"}, "truck": {"Truck"}, "bus": {"Bus"},
        "train": {"On Rails"}, "motorcycle": {"Motorcycle"}, "bicycle": {"Bicycle"},
    }
    by_name = {name: CITYSCAPES_CLASSES.index(cls) for cls, names in expected.items() for name in names}
    lut = make_lut(MAPILLARY_ID_TO_TRAINID)
    for vistas_id, name in enumerate(VISTAS_V12):
        assert lut[vistas_id] == by_name.get(name, 255), (vistas_id, name)
    assert lut[41] == 255 and VISTAS_V12[41] == "Manhole"
    assert sorted(set(MAPILLARY_ID_TO_TRAINID)) == sorted(VISTAS_V12.index(n) for n in by_name)


def test_prepare_mapillary_half_then_keep_ratio_into_1024x512(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vfm_adapters.cli import main
    from vfm_adapters.seg.datasets import MAPILLARY_ID_TO_TRAINID, Mapillary
    from vfm_adapters.seg.transforms import rescale_size

    root = tmp_path / "mapillary"
    (root / "validation/images").mkdir(parents=True)
    (root / "validation/v1.2/labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = np.kron(rng.integers(0, 66, (17, 23)), np.ones((6, 6), dtype=np.int64))[:102, :137].astype(np.uint8)
    Image.fromarray(rng.integers(0, 256, (102, 137, 3), dtype=np.uint8)).save(root / "validation/images/a.jpg")
    label = Image.frombytes("P", (137, 102), ids.tobytes())
    label.putpalette(list(rng.integers(0, 256, 768)))
    label.save(root / "validation/v1.2/labels/a.png")
    out = tmp_path / "half"
    assert main(["prepare", "mapillary", "--root", str(root), "--output", str(out), "--half"]) == 0
    assert "1 written" in capsys.readouterr().out
    with Image.open(out / "validation/images/a.jpg") as image, Image.open(out / "validation/labels/a.png") as halved:
        assert image.size == (68, 51) and halved.size == (68, 51) and halved.mode == "P"
        stored = np.asarray(halved)
    assert set(np.unique(stored)) <= set(np.unique(ids))  # nearest: no blended ids
    assert np.array_equal(stored, np.asarray(label.resize((68, 51), Image.NEAREST)))
    sample = Mapillary(out, "validation")[0]
    assert sample["image"].shape == (3, 51, 68) and sample["label"].shape == (51, 68)
    lut = {k: v for k, v in MAPILLARY_ID_TO_TRAINID.items()}
    assert np.array_equal(sample["label"].numpy(), np.vectorize(lambda v: lut.get(int(v), 255))(stored))
    # again: the existing files are kept, the dataset itself is never a target
    assert main(["prepare", "mapillary", "--root", str(root), "--output", str(out), "--half"]) == 0
    assert "1 already there" in capsys.readouterr().out
    assert main(["prepare", "mapillary", "--root", str(root), "--output", str(root), "--half"]) == 2  # one-line error
    assert "dataset itself" in capsys.readouterr().err
    # a typical Vistas image (4032x3024) halved, then keep-ratio into (1024, 512)
    assert rescale_size(3024 // 2, 4032 // 2, (1024, 512)) == (512, 683)
    assert rescale_size(2448 // 2, 3264 // 2, (1024, 512)) == (512, 683)


def test_keep_ratio_scale_at_test_time_scores_at_the_label_size():
    from vfm_adapters.seg.inference import evaluate, predict

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.sizes = []

        def forward(self, x):
            self.sizes.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 3, *x.shape[-2:])

    model = Recorder()
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)  # a half-size file
    out = predict(model, image, 3, mode="whole", scale=(1024, 512))
    assert model.sizes == [(512, 683)] and out.shape == (120, 160)  # 4:3 into (1024, 512): 683x512, scored at 160x120
    model.sizes.clear()
    result = evaluate(model, [{"image": image, "label": torch.zeros(120, 160, dtype=torch.long)}], 3, mode="whole",
                      scale=(1024, 512))
    assert model.sizes == [(512, 683)] and result["images"] == 1


# ----------------------------------------------------------------------------- 9. whole-segmentor report
def test_report_config_on_every_paper_config(capsys):
    import json

    import yaml

    from vfm_adapters.cli import main

    expected = yaml.safe_load((PAPER / "expected_miou.yaml").read_text())
    multilevel_1024 = 4 * (1024 * 1024 + 1024) + 4 * (9 * 1024 * 1024 + 1024)
    for path in PAPER_CONFIGS:
        assert main(["report", "--config", str(path), "--json"]) == 0
        counts = json.loads(capsys.readouterr().out)
        assert all(isinstance(counts[k], int) for k in ("adapters", "neck", "head", "total")), path.name
        assert f"{(counts['adapters'] + counts['backbone']) / 1e6:.2f}M" == expected[path.name]["trainable"], path.name
        assert counts["neck"] == (multilevel_1024 if "clip" in path.name else 0), path.name
        assert counts["head"] > 0
        assert counts["total"] == counts["adapters"] + counts["backbone"] + counts["neck"] + counts["head"]
        if path.name == "gtav_dinov2_l_rein.yaml":
            assert counts["adapters"] == 2_990_081 and counts["neck"] == 0 and counts["backbone"] == 0
        if path.name == "gtav_dinov2_l_full.yaml":
            assert counts["adapters"] == 0 and counts["backbone"] > 300_000_000
    assert main(["report", "--config", str(PAPER / "gtav_dinov2_l_rein.yaml")]) == 0
    text = capsys.readouterr().out
    assert "2,990,081" in text and "paper column (adapters + backbone): 2.99M" in text
