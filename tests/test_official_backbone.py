"""The authors' converted DINOv2 file (facebookresearch names, patch 16, 512-px grid) into timm's DINOv2.

The file is written here from the names and shapes of the authors' ``DinoVisionTransformer``
(``block_chunks=0``, layer scale, MLP FFN) for a tiny model: patch 16 on a 32-px grid
(2 x 2 patches + 1 class position, the small twin of 32 x 32 + 1 at 512 px).
"""

from __future__ import annotations

import pytest
import timm
import torch

from vfm_adapters.official import OfficialCheckpointError, load_official_dinov2, official_dinov2_state_dict

C, DEPTH, GRID, PATCH = 32, 2, 2, 16


def tiny_timm(img_size: int = GRID * PATCH, patch_size: int = PATCH) -> torch.nn.Module:
    return timm.create_model("vit_small_patch14_dinov2", depth=DEPTH, embed_dim=C, num_heads=2, img_size=img_size,
                             patch_size=patch_size, num_classes=0).eval()


def facebook_dinov2_state(chunked: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, 1 + GRID * GRID, C), "mask_token": (1, C),
              "patch_embed.proj.weight": (C, 3, PATCH, PATCH), "patch_embed.proj.bias": (C,),
              "norm.weight": (C,), "norm.bias": (C,)}
    for i in range(DEPTH):
        block = f"blocks.0.{i}" if chunked else f"blocks.{i}"
        shapes.update({
            f"{block}.norm1.weight": (C,), f"{block}.norm1.bias": (C,),
            f"{block}.attn.qkv.weight": (3 * C, C), f"{block}.attn.qkv.bias": (3 * C,),
            f"{block}.attn.proj.weight": (C, C), f"{block}.attn.proj.bias": (C,), f"{block}.ls1.gamma": (C,),
            f"{block}.norm2.weight": (C,), f"{block}.norm2.bias": (C,),
            f"{block}.mlp.fc1.weight": (4 * C, C), f"{block}.mlp.fc1.bias": (4 * C,),
            f"{block}.mlp.fc2.weight": (C, 4 * C), f"{block}.mlp.fc2.bias": (C,), f"{block}.ls2.gamma": (C,),
        })
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def test_every_tensor_of_the_converted_file_lands_under_its_timm_name():
    theirs = facebook_dinov2_state()
    model = load_official_dinov2(tiny_timm(), theirs)
    ours = model.state_dict()
    assert set(ours) == set(theirs) - {"mask_token"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model(torch.randn(1, 3, GRID * PATCH, GRID * PATCH)).shape == (1, C)


def test_chunked_block_names_and_a_full_mmseg_checkpoint_are_accepted(tmp_path):
    theirs = facebook_dinov2_state(chunked=True)
    full = {"state_dict": {**{f"backbone.{k}": v for k, v in theirs.items()},
                           "backbone.reins.scale": torch.tensor(1.0), "decode_head.cls_embed.bias": torch.zeros(3)}}
    path = tmp_path / "full.pth"
    torch.save(full, path)
    converted = official_dinov2_state_dict(path, tiny_timm())
    assert torch.equal(converted["blocks.1.attn.qkv.weight"], theirs["blocks.0.1.attn.qkv.weight"])


@pytest.mark.parametrize("model_kwargs, match", [
    ({"img_size": 3 * PATCH}, "pos_embed"),  # another position grid: refused, not resampled
    ({"img_size": 28, "patch_size": 14}, "patch_embed.proj.weight"),  # the unconverted patch 14
])
def test_other_grids_or_patch_sizes_are_refused_and_the_model_is_unchanged(model_kwargs, match):
    model = tiny_timm(**model_kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official_dinov2(model, facebook_dinov2_state())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_file_of_another_model_is_refused():
    theirs = facebook_dinov2_state()
    del theirs["blocks.1.ls2.gamma"]
    with pytest.raises(OfficialCheckpointError, match="missing \\['blocks.1.ls2.gamma'\\]"):
        load_official_dinov2(tiny_timm(), theirs)
