"""The baseline methods (LoRA, VPT, AdaptFormer) over every host family, and their edges."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vfm_adapters as va
from vfm_adapters.hosts import UnsupportedModelError, describe_host
from vfm_adapters.methods.base import AdapterError, injection_state

from model_zoo import FAMILY_IDS, make_model, sample_images, token_output

METHODS = ("lora", "vpt", "adaptformer")
SPATIAL = {"timm_sam", "hf_sam"}
INJECT = {
    "lora": lambda m, **kw: va.inject_lora(m, **kw),
    "vpt": lambda m, **kw: va.inject_vpt(m, **{"num_tokens": 5, **kw}),
    "adaptformer": lambda m, **kw: va.inject_adaptformer(m, **kw),
}


def _snapshot(model: nn.Module) -> dict:
    """Everything an injection may touch: tensors, flags, module classes and hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: id(p) for n, p in model.named_parameters()},
        "modules": {n: type(m) for n, m in model.named_modules()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        },
        "attrs": {n: getattr(m, "num_prefix_tokens", None) for n, m in model.named_modules()},
        "state": (hasattr(model, "vfm_adapters"), hasattr(model, "_vfm_adapters_state")),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["state"] == before["state"]
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    assert after["params"] == before["params"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def _perturb(model: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in va.adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return token_output(model, images)


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_method_on_every_host(family: str, method: str) -> None:
    model, size = make_model(family)
    images = sample_images(size)
    reference = _output(model, images)
    before = _snapshot(model)

    if method == "vpt" and family in SPATIAL:
        with pytest.raises(UnsupportedModelError, match=r"\(B, H, W, C\)"):
            INJECT[method](model)
        _assert_same(before, _snapshot(model))
        return

    INJECT[method](model)
    adapters = va.adapter_parameters(model)
    assert adapters and va.injected_methods(model) == [method]
    # frozen host: exactly the adapter parameters train
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters}
    assert va.trainable_parameters(model) == sum(p.numel() for p in adapters)

    injected = _output(model, images)
    assert injected.shape == reference.shape
    if method in ("lora", "adaptformer"):  # zero-initialised B / up-projection
        assert torch.equal(injected, reference)

    # perturbing the adapter changes the output
    _perturb(model)
    perturbed = token_output(model, images)
    assert (perturbed - reference).abs().max() > 1e-3
    # gradients reach every adapter parameter and no host parameter
    perturbed.float().pow(2).mean().backward()
    for param in adapters:
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if id(p) not in {id(a) for a in adapters})

    va.remove_adapters(model)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_output(model, images), reference)


# --------------------------------------------------------------------------- exact counts


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def dinov2_large() -> nn.Module:
    return _meta("vit_large_patch14_dinov2")


@pytest.mark.parametrize(
    ("method", "expected"),
    [("lora", 786_432), ("adaptformer", 3_171_840), ("vpt", 3_686_400), ("rein", 2_990_081)],
)
def test_paper_counts_on_dinov2_large(dinov2_large: nn.Module, method: str, expected: int) -> None:
    inject = {"lora": va.inject_lora, "adaptformer": va.inject_adaptformer, "vpt": va.inject_vpt, "rein": va.inject_rein}
    inject[method](dinov2_large)
    try:
        assert va.trainable_parameters(dinov2_large) == expected
        assert va.format_count(expected) == {"lora": "0.79M", "adaptformer": "3.17M", "vpt": "3.69M", "rein": "2.99M"}[method]
    finally:
        va.remove_adapters(dinov2_large)


def test_lora_count_on_eva02_large_separate_qkv() -> None:
    model = _meta("eva02_large_patch14_224")
    assert describe_host(model).parts.q is not None  # separate q/k/v projections
    assert va.trainable_parameters(va.inject_lora(model)) == 1_179_648 == 3 * 8 * (1024 + 1024) * 24


def test_vpt_shallow_count(dinov2_large: nn.Module) -> None:
    va.inject_vpt(dinov2_large, deep=False)
    try:
        assert va.trainable_parameters(dinov2_large) == 150 * 1024
    finally:
        va.remove_adapters(dinov2_large)


@settings(max_examples=15, deadline=None)
@given(
    depth=st.integers(1, 4),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 16]),
    rank=st.integers(1, 12),
    tokens=st.integers(1, 40),
    bottleneck=st.integers(1, 32),
)
def test_count_formulas(depth: int, heads: int, head_dim: int, rank: int, tokens: int, bottleneck: int) -> None:
    c = heads * head_dim

    def fresh() -> nn.Module:
        return _meta("vit_small_patch14_dinov2", depth=depth, embed_dim=c, num_heads=heads, img_size=28)

    assert va.trainable_parameters(va.inject_lora(fresh(), rank=rank)) == depth * rank * (c + 3 * c)
    assert va.trainable_parameters(va.inject_vpt(fresh(), num_tokens=tokens)) == depth * tokens * c
    assert va.trainable_parameters(va.inject_adaptformer(fresh(), bottleneck=bottleneck)) == depth * (
        2 * c * bottleneck + bottleneck + c
    )


# --------------------------------------------------------------------------- LoRA specifics


@pytest.mark.parametrize("family", ["timm_dinov2", "timm_eva02", "timm_eva02_fused_qkv", "hf_dinov2", "hf_clip", "timm_sam"])
def test_lora_merge_unmerge(family: str) -> None:
    model, size = make_model(family)
    images = sample_images(size)
    va.inject_lora(model, alpha=16)
    _perturb(model, std=0.2)
    layers = va.lora_layers(model)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    unmerged = _output(model, images)

    va.merge_lora(model)
    assert all(layer.merged for layer in layers.values())
    assert any(not torch.equal(layer.base_layer.weight, originals[n]) for n, layer in layers.items())
    merged = _output(model, images)
    torch.testing.assert_close(merged, unmerged, atol=2e-4, rtol=1e-4)

    va.unmerge_lora(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(_output(model, images), unmerged, atol=2e-4, rtol=1e-4)


def test_lora_finds_attention_that_reads_the_weight_directly() -> None:
    """timm EvaAttention with fused qkv and q/v biases calls F.linear(x, self.qkv.weight)."""
    model, size = make_model("timm_eva02_fused_qkv")
    assert model.blocks[0].attn.q_bias is not None
    images = sample_images(size)
    reference = _output(model, images)
    va.inject_lora(model)
    extra = injection_state(model).attachments["lora"].extra
    assert extra["direct_weight_blocks"] == [0, 1]
    _perturb(model)
    assert (_output(model, images) - reference).abs().max() > 1e-3
    # the wrapper's forward never runs there: LoRA works through the effective weight
    calls = []
    handle = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda *a: calls.append(1))
    _output(model, images)
    handle.remove()
    assert calls == []
    # and PEFT's format cannot represent it, so it is refused instead of silently wrong
    with pytest.raises(AdapterError, match="reads its projection weight directly"):
        va.save_lora_for_peft(model, "/nonexistent")


def test_lora_uses_the_module_call_where_the_host_calls_it() -> None:
    for family in ("timm_dinov2", "timm_eva02", "hf_dinov2", "timm_sam"):
        model, _ = make_model(family)
        va.inject_lora(model)
        assert injection_state(model).attachments["lora"].extra["direct_weight_blocks"] == [], family


def test_lora_is_peft_layers() -> None:
    from peft.tuners.lora import LoraLayer

    model, _ = make_model("hf_dinov2")
    va.inject_lora(model, rank=4, alpha=8, targets=("q", "v"))
    layers = va.lora_layers(model)
    assert sorted(layers) == [f"encoder.layer.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(isinstance(layer, LoraLayer) and layer.scaling["default"] == 2.0 for layer in layers.values())
    assert va.trainable_parameters(model) == 2 * 2 * 4 * (32 + 32)


@pytest.mark.parametrize("family", ["hf_dinov2", "timm_dinov2", "timm_eva02"])
def test_peft_loads_a_lora_saved_here(family: str, tmp_path) -> None:
    import peft
    from safetensors.torch import load_file

    model, size = make_model(family)
    images = sample_images(size)
    va.inject_lora(model, rank=4, alpha=6)
    _perturb(model, std=0.2)
    expected = _output(model, images)
    va.save_lora_for_peft(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 6
    assert sorted(config["target_modules"]) == sorted(va.lora_layers(model))
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    base, _ = make_model(family)
    plain = _output(base, images)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        got = loaded(pixel_values=images).last_hidden_state if family.startswith("hf") else loaded.forward_features(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_save_lora_for_peft_refuses_other_methods(tmp_path) -> None:
    model, _ = make_model("hf_dinov2")
    va.inject_adaptformer(va.inject_lora(model))
    with pytest.raises(AdapterError, match="LoRA only"):
        va.save_lora_for_peft(model, tmp_path)
    with pytest.raises(AdapterError, match="no LoRA"):
        va.save_lora_for_peft(make_model("hf_dinov2")[0], tmp_path)


def test_remove_while_merged_unmerges() -> None:
    model, size = make_model("timm_dinov2")
    images = sample_images(size)
    reference = _output(model, images)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    va.inject_lora(model)
    _perturb(model)
    va.merge_lora(model)
    va.remove_adapters(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(_output(model, images), reference, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- VPT specifics


def _block_inputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Registers (after VPT's hooks) recorders of every block's input as the block sees it."""
    host = describe_host(model)
    seen: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
        for block in host.blocks(model)
    ]
    return seen, handles


@pytest.mark.parametrize("family", ["timm_dinov2", "timm_dinov2_reg", "timm_deit_distilled", "hf_dinov2_reg", "hf_clip", "timm_eva02"])
@pytest.mark.parametrize("deep", [True, False])
def test_vpt_token_bookkeeping(family: str, deep: bool) -> None:
    model, size = make_model(family)
    host = describe_host(model)
    npt, m = host.num_prefix_tokens, 7
    images = sample_images(size)
    reference = _output(model, images)
    va.inject_vpt(model, num_tokens=m, deep=deep)
    prompts = model.vfm_adapters["vpt"].prompts
    assert prompts.shape == ((host.depth if deep else 1), m, host.embed_dim)
    seen, handles = _block_inputs(model)
    out = _output(model, images)
    for handle in handles:
        handle.remove()

    assert out.shape == reference.shape  # the output keeps the host's length
    n = reference.shape[1]
    assert [x.shape[1] for x in seen] == [n + m] * host.depth  # inside: prefix + prompts + patches
    first = seen[0]
    # prefix tokens stay first, prompts follow them
    torch.testing.assert_close(first[:, npt : npt + m], prompts[0].expand(first.shape[0], -1, -1))
    if deep:
        for index, x in enumerate(seen):
            torch.testing.assert_close(x[:, npt : npt + m], prompts[index].expand(x.shape[0], -1, -1))
    else:
        # shallow: the prompts are carried (and transformed) through the blocks
        assert not torch.allclose(seen[1][:, npt : npt + m], prompts[0].expand(seen[1].shape[0], -1, -1))


def test_vpt_prefix_tokens_stay_in_place() -> None:
    model, size = make_model("timm_dinov2_reg")
    images = sample_images(size)
    va.inject_vpt(model, num_tokens=3)
    seen, handles = _block_inputs(model)
    with torch.no_grad():
        embedded = model._pos_embed(model.patch_embed(images))
        model.forward_features(images)
    for handle in handles:
        handle.remove()
    npt = model.num_prefix_tokens
    torch.testing.assert_close(seen[0][:, :npt], embedded[:, :npt])  # CLS + 4 registers first
    torch.testing.assert_close(seen[0][:, npt + 3 :], embedded[:, npt:])  # then the patches


@pytest.mark.parametrize("family", ["timm_eva02", "timm_eva02_fused_qkv"])
def test_vpt_rope_applies_to_patch_tokens_only(family: str) -> None:
    """EVA02 rotates the tokens after its prefix; prompts must count as prefix in each block."""
    model, size = make_model(family)
    images = sample_images(size)
    npt, m = model.num_prefix_tokens, 6
    va.inject_vpt(model, num_tokens=m)
    _perturb(model, std=0.5)
    counts = []
    probe = model.blocks[0].attn.register_forward_pre_hook(lambda mod, a: counts.append(mod.num_prefix_tokens))
    out = _output(model, images)
    probe.remove()
    assert counts == [npt + m]
    assert [b.attn.num_prefix_tokens for b in model.blocks] == [npt, npt]  # restored after each block

    # reference: the same computation by hand, bypassing every hook
    prompts = model.vfm_adapters["vpt"].prompts
    with torch.no_grad():
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        assert rope is not None
        for index, block in enumerate(model.blocks):
            x = torch.cat([x[:, :npt], prompts[index].expand(x.shape[0], -1, -1), x[:, npt:]], dim=1)
            block.attn.num_prefix_tokens = npt + m
            try:
                x = block.forward(x, rope=rope)
            finally:
                block.attn.num_prefix_tokens = npt
            x = torch.cat([x[:, :npt], x[:, npt + m :]], dim=1)
        expected = model.norm(x)
    torch.testing.assert_close(out, expected)


def test_vpt_restores_prefix_count_when_a_block_raises() -> None:
    model, size = make_model("timm_eva02")
    va.inject_vpt(model, num_tokens=4)
    npt = model.blocks[0].attn.num_prefix_tokens

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.blocks[0].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        _output(model, sample_images(size))
    handle.remove()
    assert model.blocks[0].attn.num_prefix_tokens == npt


def test_vpt_init_bound() -> None:
    model, _ = make_model("timm_dinov2")
    va.inject_vpt(model)
    bound = math.sqrt(6.0 / (3 * 14 * 14 + 64))  # VPT's Xavier-uniform bound, p = 14, c = 64
    prompts = model.vfm_adapters["vpt"].prompts
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.9 * bound


@settings(max_examples=6, deadline=None)
@given(tokens=st.integers(1, 20), deep=st.booleans(), batch=st.integers(1, 3))
def test_vpt_keeps_shapes(tokens: int, deep: bool, batch: int) -> None:
    model = timm.create_model("vit_small_patch14_reg4_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28).eval()
    images = torch.randn(batch, 3, 28, 28)
    before = model.forward_features(images).shape
    va.inject_vpt(model, num_tokens=tokens, deep=deep)
    assert model.forward_features(images).shape == before
    intermediates = model.forward_intermediates(images, intermediates_only=True) if deep else None
    if deep:  # every block output keeps the host's length, so spatial maps still come out
        assert [tuple(t.shape) for t in intermediates] == [(batch, 32, 2, 2)] * 2


# --------------------------------------------------------------------------- AdaptFormer specifics


def test_adaptformer_is_parallel_to_the_mlp() -> None:
    """Block output = x + ls2(mlp(norm2(x)) + 0.1 * up(relu(down(x)))), x after attention."""
    model, size = make_model("timm_dinov2")
    va.inject_adaptformer(model)
    _perturb(model)
    block = model.blocks[0]
    adapter = model.vfm_adapters["adaptformer"].adapters[0]
    tokens = torch.randn(2, 17, 64)
    with torch.no_grad():
        got = block(tokens)
        x = tokens + block.ls1(block.attn(block.norm1(tokens)))
        branch = block.mlp.forward(block.norm2.forward(x)) + 0.1 * adapter.up(torch.relu(adapter.down(x)))
        expected = x + block.ls2(branch)
    torch.testing.assert_close(got, expected)


def test_adaptformer_starts_as_identity_and_has_zero_up() -> None:
    model, size = make_model("hf_sam")
    images = sample_images(size)
    reference = _output(model, images)
    va.inject_adaptformer(model, bottleneck=8, scale=0.5)
    for adapter in model.vfm_adapters["adaptformer"].adapters:
        assert not adapter.up.weight.any() and not adapter.up.bias.any() and adapter.down.weight.any()
    assert torch.equal(_output(model, images), reference)


# --------------------------------------------------------------------------- combining methods


def test_rein_and_lora_combine_and_both_train() -> None:
    model, size = make_model("timm_dinov2")
    images = sample_images(size)
    reference = _output(model, images)
    before = _snapshot(model)
    va.inject_lora(va.inject_rein(model, link_queries=False))  # the query link only feeds a decode head
    assert va.injected_methods(model) == ["rein", "lora"]
    _perturb(model)
    token_output(model, images).pow(2).mean().backward()
    state = injection_state(model)
    for name in ("rein", "lora"):
        params = va.methods.get_method(name).parameters(model, state.attachments[name])
        assert params and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    va.remove_adapters(model)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_output(model, images), reference)


def test_all_baselines_together_and_removed_one_by_one() -> None:
    model, size = make_model("timm_eva02")
    images = sample_images(size)
    reference = _output(model, images)
    before = _snapshot(model)
    va.inject_adaptformer(va.inject_vpt(va.inject_lora(model), num_tokens=4))
    _perturb(model)
    assert _output(model, images).shape == reference.shape
    for name in ("vpt", "lora", "adaptformer"):
        va.remove_adapters(model, name)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_output(model, images), reference)


@pytest.mark.parametrize("method", METHODS)
def test_same_method_twice_is_an_error(method: str) -> None:
    model, _ = make_model("timm_dinov2")
    INJECT[method](model)
    before = _snapshot(model)
    with pytest.raises(AdapterError, match="already injected"):
        INJECT[method](model)
    _assert_same(before, _snapshot(model))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("family", "methods"),
    [
        ("timm_dinov2", ("lora",)),
        ("timm_eva02_fused_qkv", ("lora",)),
        ("hf_clip", ("vpt",)),
        ("timm_eva02", ("vpt",)),
        ("hf_sam", ("adaptformer",)),
        ("hf_dinov2", ("lora", "vpt", "adaptformer")),
        ("timm_dinov2_reg", ("rein", "lora")),
    ],
)
def test_save_load_round_trip_is_bit_exact(family: str, methods: tuple[str, ...], tmp_path) -> None:
    model, size = make_model(family)
    images = sample_images(size)
    for method in methods:
        {"rein": lambda m: va.inject_rein(m, kernel="torch"), **INJECT}[method](model)
    _perturb(model)
    expected = _output(model, images)
    saved = {k: v.clone() for k, v in va.adapter_state_dict(model).items()}
    va.save_adapters(model, tmp_path)

    fresh, _ = make_model(family)
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == list(methods)
    loaded = va.adapter_state_dict(fresh)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert torch.equal(_output(fresh, images), expected)
    assert va.trainable_parameters(fresh) == va.trainable_parameters(model)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("lora", {"rank": 0}, "rank must be a positive integer"),
        ("lora", {"rank": 2.5}, "rank must be a positive integer"),
        ("lora", {"alpha": -1}, "alpha must be None or a positive"),
        ("lora", {"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ("lora", {"targets": ("q", "o")}, r"subset of \['q', 'k', 'v'\]"),
        ("lora", {"targets": ()}, "non-empty subset"),
        ("vpt", {"num_tokens": 0}, "num_tokens must be a positive integer"),
        ("vpt", {"deep": "yes"}, "deep must be True"),
        ("adaptformer", {"bottleneck": 0}, "bottleneck must be a positive integer"),
        ("adaptformer", {"scale": float("nan")}, "scale must be a finite number"),
    ],
)
def test_invalid_options_name_the_accepted_values(method: str, options: dict, message: str) -> None:
    model, _ = make_model("timm_dinov2")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        INJECT[method](model, **options)
    _assert_same(before, _snapshot(model))


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(-5, 40))
def test_lora_rank_validation(rank: int) -> None:
    if rank >= 1:
        assert va.LoRAConfig(rank=rank).rank == rank
    else:
        with pytest.raises(ValueError, match="positive integer"):
            va.LoRAConfig(rank=rank)


def test_lora_subset_on_fused_qkv_is_refused_untouched() -> None:
    model, _ = make_model("timm_dinov2")
    before = _snapshot(model)
    with pytest.raises(AdapterError, match="fuses query, key and value"):
        va.inject_lora(model, targets=("q", "v"))
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_model(method: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="not a supported ViT"):
        INJECT[method](model)
    assert not hasattr(model, "_vfm_adapters_state")


def test_vpt_on_sam_names_the_problem_and_leaves_the_model() -> None:
    model, _ = make_model("timm_sam")
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="no sequence to extend"):
        va.inject_vpt(model)
    _assert_same(before, _snapshot(model))


def test_broken_block_is_refused_untouched() -> None:
    model, _ = make_model("timm_dinov2")
    model.blocks[1].attn.qkv = nn.Identity()  # the second block has no Linear to wrap
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="Identity"):
        va.inject_lora(model)
    _assert_same(before, _snapshot(model))


def test_failed_attach_rolls_back_lora(monkeypatch) -> None:
    """A LoRA that fails half-way through the blocks leaves every wrapped layer restored."""
    from vfm_adapters.methods import lora

    calls = []

    class Failing(lora.lora_linear_class()):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory, say")
            super().__init__(*args, **kwargs)

    model, size = make_model("timm_dinov2")
    images = sample_images(size)
    reference = _output(model, images)
    before = _snapshot(model)
    monkeypatch.setattr(lora, "_LORA_LINEAR", Failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        va.inject_lora(model)
    assert len(calls) == 2
    _assert_same(before, _snapshot(model))
    assert torch.equal(_output(model, images), reference)


@pytest.mark.parametrize("method", METHODS)
def test_adapters_for_another_width_are_refused(method: str, tmp_path) -> None:
    model, _ = make_model("timm_dinov2")  # width 64
    INJECT[method](model)
    va.save_adapters(model, tmp_path)
    other = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=56)
    before = _snapshot(other)
    with pytest.raises(AdapterError, match="embed_dim=64"):
        va.load_adapters(other, tmp_path)
    _assert_same(before, _snapshot(other))


def test_adapters_saved_with_other_options_are_refused(tmp_path) -> None:
    model, _ = make_model("timm_dinov2")
    va.inject_lora(model, rank=4)
    va.save_adapters(model, tmp_path)
    other, _ = make_model("timm_dinov2")
    va.inject_lora(other, rank=8)
    va.inject_vpt(other, num_tokens=3)
    before = _snapshot(other)
    with pytest.raises(AdapterError, match="saved with"):
        va.load_adapters(other, tmp_path)
    _assert_same(before, _snapshot(other))


def test_weights_of_another_method_are_refused(tmp_path) -> None:
    """A config naming LoRA beside weights written for AdaptFormer."""
    from safetensors.torch import save_file

    model, _ = make_model("timm_dinov2")
    va.inject_lora(model)
    va.save_adapters(model, tmp_path)
    af, _ = make_model("timm_dinov2")
    tensors = {k.replace("adaptformer.", "lora.", 1): v for k, v in va.adapter_state_dict(va.inject_adaptformer(af)).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "adapter_model.safetensors")
    fresh, _ = make_model("timm_dinov2")
    before = _snapshot(fresh)
    with pytest.raises(AdapterError, match="do not match"):
        va.load_adapters(fresh, tmp_path)
    _assert_same(before, _snapshot(fresh))


@pytest.mark.parametrize("method", METHODS)
def test_truncated_weights_file(method: str, tmp_path) -> None:
    model, _ = make_model("timm_dinov2")
    INJECT[method](model)
    va.save_adapters(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fresh, _ = make_model("timm_dinov2")
    before = _snapshot(fresh)
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        va.load_adapters(fresh, tmp_path)
    _assert_same(before, _snapshot(fresh))


def test_loading_into_a_merged_lora_is_refused(tmp_path) -> None:
    model, _ = make_model("timm_dinov2")
    va.inject_lora(model)
    va.save_adapters(model, tmp_path)
    va.merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge_lora"):
        va.load_adapters(model, tmp_path)


# --------------------------------------------------------------------------- the params command


def test_params_command_json() -> None:
    from vfm_adapters.cli import main

    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        assert main(["params", "--json", "--backbones", "DINOv2-L"]) == 0
    rows = {row["method"]: row for row in json.loads(stream.getvalue())}
    full = sum(p.numel() for p in _meta("vit_large_patch14_dinov2", num_classes=0).parameters())
    assert rows["Full"]["trainable"] == full  # computed, not typed in
    assert rows["Full@512"]["formatted"] == rows["Full@512"]["paper"] == "304.20M"
    assert rows["Freeze"]["trainable"] == 0
    for method, count in (("LoRA", 786_432), ("AdaptFormer", 3_171_840), ("VPT", 3_686_400), ("Rein", 2_990_081)):
        assert rows[method]["trainable"] == count and rows[method]["matches_paper"] is True


def test_params_command_table_marks_vpt_on_sam() -> None:
    from vfm_adapters.commands.params import count_rows, format_table

    rows = count_rows(["SAM-H"], ["VPT", "Rein"])
    assert rows[0]["trainable"] is None and "no token sequence" in rows[0]["note"]
    assert rows[1]["trainable"] == 4_510_721 and rows[1]["matches_paper"]
    assert "n/a" in format_table(rows)


@pytest.mark.parametrize("method", METHODS)
def test_a_deep_copy_carries_its_own_adapters(method: str) -> None:
    """An EMA teacher made with deepcopy must neither share nor call the student's adapters."""
    import copy

    model, size = make_model("timm_eva02")  # EVA02: VPT's prefix count is per-copy state too
    images = sample_images(size)
    reference = _output(model, images)
    INJECT[method](model)
    _perturb(model)
    teacher = copy.deepcopy(model)
    teacher_before = _output(teacher, images)
    _perturb(model, seed=7)  # change the student only
    assert torch.equal(_output(teacher, images), teacher_before)
    assert not torch.equal(_output(model, images), teacher_before)
    va.remove_adapters(teacher)
    assert torch.equal(_output(teacher, images), reference)
    assert va.injected_methods(model) == [method]
    assert not torch.equal(_output(model, images), reference)


def test_a_model_with_lora_pickles(tmp_path) -> None:
    model, size = make_model("timm_dinov2")
    va.inject_lora(model)
    _perturb(model)
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    images = sample_images(size)
    assert torch.equal(_output(again, images), _output(model, images))
