"""Methods reach other methods and hosts through public seams only (issue 14, item 4)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from safetensors.torch import load_file

import vfm_adapters as va
import vfm_adapters.methods as methods
from vfm_adapters.checkpoint import WEIGHTS_NAME
from vfm_adapters.methods import domain_rein, domino
from vfm_adapters.methods.rein import rein_blocks

from model_zoo import make_model, sample_images, token_output


def test_domain_rein_keeps_every_import_path():
    for name in ("DomainReinConfig", "DomainReinShift", "inject_domain_rein"):
        assert getattr(domino, name) is getattr(domain_rein, name)
    assert methods.inject_domain_rein is domain_rein.inject_domain_rein
    assert methods.DomainReinConfig is domain_rein.DomainReinConfig
    assert va.inject_domain_rein is domain_rein.inject_domain_rein


def test_domain_rein_uses_no_private_part_of_rein():
    source = inspect.getsource(domain_rein)
    assert "._token_shift" not in source and ".extra" not in source


def test_rein_token_shift_is_a_public_hook(tiny_vit):
    x = torch.randn(2, 3, 56, 56)
    va.inject_rein(tiny_vit, token_length=4, rank=2)
    rein = tiny_vit.vfm_adapters["rein"]
    with torch.no_grad():
        rein.scale.fill_(1.0)
    plain = token_output(tiny_vit, x)
    assert rein.token_shift is None
    rein.set_token_shift(lambda layer: torch.ones(2, 1, rein.embed_dim))
    assert not torch.allclose(token_output(tiny_vit, x), plain)
    rein.set_token_shift(None)
    assert rein.token_shift is None
    torch.testing.assert_close(token_output(tiny_vit, x), plain)


def test_rein_blocks_names_the_refined_blocks():
    vit, _ = make_model("timm_dinov2")
    depth = len(vit.blocks)
    assert rein_blocks(va.inject_rein(vit, token_length=4, rank=2, layers=[0, -1])) == [0, depth - 1]


def test_domain_rein_checkpoint_keys_and_name_are_unchanged(tmp_path):
    vit, size = make_model("timm_dinov2")
    va.inject_rein(vit, token_length=4, rank=2)
    va.inject_domain_rein(vit, embed_dim=6)
    va.save_adapters(vit, tmp_path)
    keys = {key for key in load_file(tmp_path / WEIGHTS_NAME) if "domain_rein" in key}
    assert keys == {"domain_rein.projection.weight", "domain_rein.projection.bias"}
    fresh, _ = make_model("timm_dinov2")
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == ["rein", "domain_rein"]
    va.set_domain_embedding(fresh, torch.randn(2, 6))
    assert token_output(fresh, sample_images(size)).isfinite().all()


def test_the_host_description_says_which_attention_reads_qkv_weight_directly():
    from vfm_adapters.hosts import describe_host

    fused, _ = make_model("timm_eva02_fused_qkv")
    assert describe_host(fused).parts.direct_weight_reads == ("qkv",)
    fused.blocks[0].attn.qkv_bias_separate = True  # then EvaAttention calls the qkv layer
    assert describe_host(fused).parts.direct_weight_reads == ()
    for family in ("timm_eva02", "timm_dinov2", "hf_dinov2", "timm_sam"):
        assert describe_host(make_model(family)[0]).parts.direct_weight_reads == (), family


def test_lora_reads_the_host_description_not_the_attention_source():
    import vfm_adapters.methods.lora as lora

    assert "getsource" not in inspect.getsource(lora)
    from vfm_adapters.methods.base import injection_state

    model, _ = make_model("timm_eva02_fused_qkv")
    model.blocks[0].attn.qkv_bias_separate = True
    va.inject_lora(model)  # the qkv layer is called now: the wrapper's forward is enough
    assert injection_state(model).attachments["lora"].extra["direct_weight_blocks"] == []


def test_resolve_blocks_is_the_one_range_check(tiny_vit):
    from vfm_adapters.hosts import describe_host
    from vfm_adapters.seg.features import BackboneFeatures

    host = describe_host(tiny_vit)
    assert host.resolve_blocks([-1, 0, -4]) == [3, 0, 0]
    for bad in ([4], [-5]):
        with pytest.raises(ValueError, match=re.escape(f"{bad} out of range: the host has 4 blocks")):
            host.resolve_blocks(bad)
    with pytest.raises(ValueError, match=r"feature layers \[7\] out of range"):
        BackboneFeatures(tiny_vit, layers=[7])
    assert BackboneFeatures(tiny_vit, layers=[-1, 1]).layers == [3, 1]
    with pytest.raises(va.AdapterError, match=r"ReinConfig.layers \[-5\] out of range"):
        va.inject_rein(tiny_vit, layers=[-5])


def test_split_and_join_prefix_round_trip_and_refuse_other_layouts(tiny_vit):
    from vfm_adapters.hosts import describe_host

    host = describe_host(tiny_vit)  # DINOv2-style: one CLS token
    hidden = torch.randn(2, 1 + 16, 64)
    prefix, patches = host.split_prefix(hidden)
    assert prefix.shape == (2, 1, 64) and torch.equal(patches, hidden[:, 1:])
    assert torch.equal(host.join_prefix(prefix, patches), hidden)
    with pytest.raises(ValueError, match="1 prefix tokens; got 2"):
        host.join_prefix(hidden[:, :2], patches)
    sam, _ = make_model("timm_sam")
    with pytest.raises(ValueError, match="layout 'BHWC'"):
        describe_host(sam).split_prefix(torch.zeros(1, 4, 4, 8))


def test_stage_wise_rein_asks_the_kernels_public_capability_query(monkeypatch):
    import vfm_adapters.methods.rein_stages as rein_stages

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernel="triton" must get past "no GPU here" to the width check

    assert "triton_rein" not in inspect.getsource(rein_stages)
    model, _ = make_model("timm_convnext")  # stage widths 8, 16, 32, 64
    with pytest.raises(va.AdapterError, match="the width must be a multiple of 16, got 8; .*widths \\[8, 16, 32, 64\\]"):
        va.inject_rein(model, kernel="triton")
    assert not hasattr(model, "vfm_adapters")
