"""Rein over every supported host family: freezing, gradients, effect, removal, round trips."""

from __future__ import annotations

import pytest
import torch

import vfm_adapters as va
from model_zoo import FAMILY_IDS, make_model, sample_images, token_output


def rein_params(model):
    return dict(model.vfm_adapters.rein.named_parameters())


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_only_rein_trains_and_every_rein_parameter_gets_a_gradient(family):
    model, size = make_model(family)
    va.inject_rein(model, token_length=6, rank=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"vfm_adapters.rein.{n}" for n in rein_params(model)}
    assert va.trainable_parameters(model) == sum(p.numel() for p in rein_params(model).values())

    with torch.no_grad():
        model.vfm_adapters.rein.scale.fill_(0.5)
    loss = token_output(model, sample_images(size)).square().mean() + va.rein_queries(model).square().mean()
    loss.backward()
    for name, param in rein_params(model).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert all(p.grad is None for n, p in model.named_parameters() if n not in {f"vfm_adapters.rein.{k}" for k in rein_params(model)})


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_perturbing_rein_changes_the_output_and_removal_restores_it(family):
    model, size = make_model(family)
    images = sample_images(size)
    original_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = token_output(model, images)
        va.inject_rein(model, token_length=6, rank=3)
        with_rein = token_output(model, images)
        model.vfm_adapters.rein.scale.fill_(1.0)
        perturbed = token_output(model, images)
    assert not torch.allclose(perturbed, with_rein), "changing Rein's scale must change the output"
    assert not torch.allclose(perturbed, before)
    va.remove_adapters(model)
    with torch.no_grad():
        assert torch.equal(token_output(model, images), before)
    assert not hasattr(model, "vfm_adapters") and va.injected_methods(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == original_flags


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model, size = make_model(family)
    va.inject_rein(model, token_length=6, rank=3)
    with torch.no_grad():
        for param in rein_params(model).values():
            param.add_(torch.randn_like(param) * 0.1)  # trained-looking values, not the init
    va.save_adapters(model, tmp_path)

    fresh, _ = make_model(family)  # same host weights (seeded), no adapters
    va.load_adapters(fresh, tmp_path)
    for name, tensor in va.adapter_state_dict(model).items():
        assert torch.equal(va.adapter_state_dict(fresh)[name], tensor), name
    images = sample_images(size)
    with torch.no_grad():
        assert torch.equal(token_output(fresh, images), token_output(model, images))
