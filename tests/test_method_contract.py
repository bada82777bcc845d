"""One contract, checked for every registered method (issue 13, item 16).

For each method in ``available_methods()``: injecting then removing gives the model back
exactly, a refused injection leaves it untouched, a save/load round trip is bit-exact, a
deep copy (an EMA teacher) is independent of the original, and the model pickles.
Domino runs on a decode head; domain_rein on a ViT that already carries Rein.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import vfm_adapters as va
from vfm_adapters.methods.base import get_method, injection_state
from model_zoo import make_model, sample_images, token_output

EMBED = 6  # width of the domain embedding for domino / domain_rein


@dataclass
class Case:
    build: Callable[[], nn.Module]  # the model before this method is injected
    inject: Callable[[nn.Module], nn.Module]
    bad_inject: Callable[[nn.Module], nn.Module]  # an injection that must be refused
    run: Callable[[nn.Module, int], torch.Tensor]  # forward pass on a batch of the given size
    conditioned: bool = False  # needs set_domain_embedding


def _vit() -> nn.Module:
    return make_model("timm_dinov2")[0]


def _vit_with_rein() -> nn.Module:
    model = va.inject_rein(_vit(), token_length=4, rank=2)
    with torch.no_grad():
        model.vfm_adapters.rein.scale.fill_(1.0)  # make Rein's tokens (and their shift) matter
    return model


def _run_vit(model: nn.Module, batch: int) -> torch.Tensor:
    return token_output(model, sample_images(56, batch=batch))


def _head() -> nn.Module:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.GroupNorm(2, 4))
    with torch.no_grad():
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 2.0)
    return head.eval()


def _run_head(model: nn.Module, batch: int) -> torch.Tensor:
    return model(torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(batch)))


CASES: dict[str, Case] = {
    "rein": Case(_vit, lambda m: va.inject_rein(m, token_length=4, rank=2),
                 lambda m: va.inject_rein(m, layers=[7]), _run_vit),
    "lora": Case(_vit, lambda m: va.inject_lora(m, rank=2), lambda m: va.inject_lora(m, targets=("q",)), _run_vit),
    "vpt": Case(_vit, lambda m: va.inject_vpt(m, num_tokens=3), lambda m: va.inject_vpt(m, num_tokens=0), _run_vit),
    "adaptformer": Case(_vit, lambda m: va.inject_adaptformer(m, bottleneck=4),
                        lambda m: va.inject_adaptformer(m, bottleneck=0), _run_vit),
    "domino": Case(_head, lambda m: va.inject_domino(m, embed_dim=EMBED, hidden_dim=4),
                   lambda m: va.inject_domino(m, embed_dim=EMBED, types=["LayerNorm"]), _run_head, conditioned=True),
    "domain_rein": Case(_vit_with_rein, lambda m: va.inject_domain_rein(m, embed_dim=EMBED),
                        lambda m: va.inject_domain_rein(m, embed_dim=EMBED, mode="mul"), _run_vit, conditioned=True),
}


def test_every_registered_method_is_in_the_contract():
    assert sorted(CASES) == va.available_methods()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "methods": va.injected_methods(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("flags", "modules", "hooks", "methods"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def output(case: Case, model: nn.Module, batch: int = 2, embedding: torch.Tensor | None = None) -> torch.Tensor:
    if case.conditioned:
        va.set_domain_embedding(model, embedding if embedding is not None else domain_embedding(batch))
    with torch.no_grad():
        return case.run(model, batch)


def domain_embedding(batch: int) -> torch.Tensor:
    return torch.randn(batch, EMBED, generator=torch.Generator().manual_seed(100 + batch))


def injected(case: Case, seed: int = 1) -> nn.Module:
    """The model with the method injected and its adapters moved away from their (often zero) init."""
    model = case.inject(case.build())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in va.adapter_parameters(model):
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_inject_then_remove_gives_the_model_back_exactly(name):
    case = CASES[name]
    model = case.build()
    before = snapshot(model)
    with torch.no_grad():
        reference = case.run(model, 2)  # without this method (domain_rein: Rein alone)
    case.inject(model)
    attachment = injection_state(model).attachments[name]
    with torch.no_grad():
        for param in get_method(name).parameters(model, attachment):  # this method's only
            param.add_(0.1)
    assert not torch.equal(output(case, model), reference)  # the adapters do something ...
    va.remove_adapters(model, name)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(case.run(model, 2), reference)  # ... and it is gone


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_refused_injection_leaves_the_model_untouched(name):
    case = CASES[name]
    model = case.build()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        case.bad_inject(model)
    assert_unchanged(model, before)
    case.inject(model)
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match="already injected"):
        case.inject(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_failure_after_attaching_is_rolled_back_completely(name, monkeypatch):
    """Every change ``attach`` makes is recorded, so undoing it gives the model back exactly."""
    case = CASES[name]
    model = case.build()
    before = snapshot(model)
    method_class = type(get_method(name))
    real_attach = method_class.attach

    def attach_then_fail(self, *args):
        real_attach(self, *args)
        raise RuntimeError("simulated failure after attaching")

    monkeypatch.setattr(method_class, "attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        case.inject(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    case = CASES[name]
    model = injected(case)
    va.save_adapters(model, tmp_path)
    fresh = case.build()
    if name == "domain_rein":  # the checkpoint holds Rein too; load it into a bare ViT
        fresh = _vit()
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == va.injected_methods(model)
    saved, loaded = va.adapter_state_dict(model), va.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(output(case, fresh), output(case, model))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_deep_copy_is_independent_of_the_original(name):
    """An EMA teacher: a deep copy, run with its own batch size, then stripped of its adapters."""
    case = CASES[name]
    student = injected(case)
    student_output = output(case, student)
    teacher = copy.deepcopy(student)
    assert torch.equal(output(case, teacher), student_output)

    # The teacher runs with its own batch size while the student keeps its embedding.
    teacher_output = output(case, teacher, batch=1)
    torch.testing.assert_close(teacher_output, output(case, student, batch=1))
    if case.conditioned:
        va.set_domain_embedding(student, domain_embedding(2))
        va.set_domain_embedding(teacher, domain_embedding(3))
        with torch.no_grad():
            assert torch.equal(case.run(student, 2), student_output)

    # Changing the student does not change the teacher, and the other way round.
    with torch.no_grad():
        for param in va.adapter_parameters(student):
            param.add_(0.5)
    assert torch.equal(output(case, teacher, batch=1), teacher_output)
    before = snapshot(student)
    va.remove_adapters(teacher)
    assert_unchanged(student, before)
    assert va.injected_methods(teacher) == [] and name in va.injected_methods(student)
    assert not any(isinstance(m, (va.DominoNorm,)) for m in teacher.modules())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_model_with_adapters_pickles(name):
    case = CASES[name]
    model = injected(case)
    clone = pickle.loads(pickle.dumps(model))
    assert va.injected_methods(clone) == va.injected_methods(model)
    assert torch.equal(output(case, clone), output(case, model))
    before = snapshot(model)
    va.remove_adapters(clone)
    assert va.injected_methods(clone) == []
    assert_unchanged(model, before)


def test_rein_cannot_be_removed_while_domain_rein_builds_on_it():
    model = injected(CASES["domain_rein"])
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match="cannot remove 'rein': 'domain_rein' builds on it"):
        va.remove_adapters(model, "rein")
    assert_unchanged(model, before)
    va.remove_adapters(model)  # everything at once works, in reverse order
    assert va.injected_methods(model) == [] and not hasattr(model, "vfm_adapters")
