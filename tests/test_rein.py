"""Rein against a direct re-statement of the Rein paper's equations: maths, init, counts, options."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vfm_adapters as va
from vfm_adapters.methods.rein import Rein, ReinConfig, rein_init_bound


def paper_formula(layers: int, width: int, tokens: int = 100, rank: int = 16, query: int = 256) -> int:
    return (
        layers * tokens * rank
        + layers * rank * width
        + 2 * (width * width + width)
        + (width * query + query)
        + (3 * query * query + query)
        + 1
    )


def restated_update(f, A, B, Wt, bt, Wf, bf, s):
    """The Rein paper's equations, written with explicit einsums, independent of the library."""
    T = torch.einsum("mr,rc->mc", A, B)
    c = f.shape[-1]
    S = torch.softmax(torch.einsum("bnc,mc->bnm", f, T) / math.sqrt(c), dim=-1)
    V = torch.einsum("mc,dc->md", T[1:], Wt) + bt
    D = torch.einsum("bnm,mc->bnc", S[:, :, 1:], V)
    df = torch.einsum("bnc,dc->bnd", D + f, Wf) + bf
    return f + s * df


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    patches=st.integers(1, 20),
    width=st.sampled_from([8, 16, 24]),
    tokens=st.integers(1, 12),
    rank=st.integers(1, 6),
    prefix=st.integers(0, 5),
    layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_rein_equals_the_equations(batch, patches, width, tokens, rank, prefix, layers, seed):
    torch.manual_seed(seed)
    rein = Rein(layers, width, ReinConfig(token_length=tokens, rank=rank, kernel="torch"), patch_size=4).double()
    with torch.no_grad():
        rein.scale.fill_(0.7)  # make the update large enough to matter
    hidden = torch.randn(batch, prefix + patches, width, dtype=torch.float64)
    layer = layers - 1
    out = rein(hidden, layer=layer, num_prefix_tokens=prefix)
    expected_patches = restated_update(
        hidden[:, prefix:],
        rein.tokens_a[layer], rein.tokens_b[layer],
        rein.token_to_feature.weight, rein.token_to_feature.bias,
        rein.delta_feature.weight, rein.delta_feature.bias,
        rein.scale,
    )
    assert torch.equal(out[:, :prefix], hidden[:, :prefix]), "prefix tokens must pass unchanged"
    torch.testing.assert_close(out[:, prefix:], expected_patches, rtol=1e-10, atol=1e-10)


def test_token_zero_is_a_sink():
    # With a huge token 0 aligned with every feature, S[:, 0] ~ 1, so the attention term vanishes.
    torch.manual_seed(0)
    rein = Rein(1, 8, ReinConfig(token_length=3, rank=None, kernel="torch"), patch_size=4)
    f = torch.ones(1, 4, 8)
    with torch.no_grad():
        rein.tokens[0, 0] = 100.0
        rein.scale.fill_(1.0)
    out = rein.refine(f, 0)
    expected = f + rein.delta_feature(f)  # D = S[:, 1:] V ~ 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_spatial_layout_is_flattened_and_restored():
    torch.manual_seed(0)
    rein = Rein(1, 8, ReinConfig(token_length=4, rank=2, kernel="torch"), patch_size=4)
    x = torch.randn(2, 3, 5, 8)
    out = rein(x, layer=0)
    torch.testing.assert_close(out.reshape(2, 15, 8), rein.refine(x.reshape(2, 15, 8), 0))


def test_init_follows_the_paper():
    width, rank, patch = 1024, 16, 16
    assert rein_init_bound(patch, width, rank) == pytest.approx(0.0818, abs=1e-4)
    assert rein_init_bound(patch, width, None) == pytest.approx(math.sqrt(6 / (3 * 256 + 1024)))
    torch.manual_seed(0)
    rein = Rein(2, 64, ReinConfig(token_length=50, rank=8), patch_size=14)
    bound = rein_init_bound(14, 64, 8)
    for tokens in (rein.tokens_a, rein.tokens_b):
        assert tokens.abs().max() <= bound
        assert tokens.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    assert rein.scale.item() == pytest.approx(1e-3)
    linear_bound = 1 / math.sqrt(64)  # PyTorch's default Linear init
    assert rein.delta_feature.weight.abs().max() <= linear_bound


def test_zero_init_variant_fixes_the_scale():
    rein = Rein(2, 16, ReinConfig(token_length=4, rank=2, zero_init_delta=True), patch_size=4)
    assert "scale" not in dict(rein.named_parameters())
    assert rein.scale.item() == 1.0
    assert torch.count_nonzero(rein.delta_feature.weight) == 0


@pytest.mark.parametrize(
    "name, layers, width, expected",
    [
        ("vit_large_patch14_dinov2", 24, 1024, 2_990_081),
        ("eva02_large_patch14_224", 24, 1024, 2_990_081),
        ("vit_large_patch14_clip_224", 24, 1024, 2_990_081),
        ("samvit_huge_patch16", 32, 1280, 4_510_721),
    ],
)
def test_paper_parameter_counts_on_meta_models(name, layers, width, expected):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert paper_formula(layers, width) == expected
    assert va.trainable_parameters(va.inject_rein(model)) == expected
    assert va.format_count(expected) in {"2.99M", "4.51M"}


def test_sam_released_setup_uses_the_global_blocks():
    with torch.device("meta"):
        sam = timm.create_model("samvit_huge_patch16", pretrained=False)
    va.inject_rein(sam, layers="global")
    assert va.describe_host(sam).global_blocks == (7, 15, 23, 31)
    assert va.trainable_parameters(sam) == paper_formula(4, 1280) == 3_892_481


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(1, 4), width=st.sampled_from([32, 64, 96]), tokens=st.integers(1, 30), rank=st.integers(1, 8))
def test_parameter_formula_holds_for_any_shape(layers, width, tokens, rank):
    rein = Rein(layers, width, ReinConfig(token_length=tokens, rank=rank), patch_size=16, device="meta")
    assert sum(p.numel() for p in rein.parameters()) == paper_formula(layers, width, tokens, rank)


def test_queries_follow_max_mean_last_merge():
    torch.manual_seed(0)
    rein = Rein(3, 16, ReinConfig(token_length=5, rank=4, query_dim=8), patch_size=4)
    per_layer = torch.stack([rein.transform(rein.tokens_a[i] @ rein.tokens_b[i]) for i in range(3)])
    stacked = torch.cat([per_layer.amax(0), per_layer.mean(0), per_layer[2]], dim=-1)
    torch.testing.assert_close(rein.queries(), rein.merge(stacked))
    assert rein.queries().shape == (5, 8)


def test_layers_option_selects_blocks(tiny_vit):
    va.inject_rein(tiny_vit, layers=[1, -1], token_length=4, rank=2)
    rein = tiny_vit.vfm_adapters.rein
    assert rein.num_layers == 2
    state = tiny_vit._vfm_adapters_state
    assert state.attachments["rein"].extra["blocks"] == [1, 3]


def test_kernel_triton_without_a_gpu_or_interpreter_is_a_clear_error(monkeypatch, tiny_vit):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="kernel='triton' cannot run"):
        va.inject_rein(tiny_vit, kernel="triton")
    assert not hasattr(tiny_vit, "vfm_adapters")


def test_kernel_triton_refuses_shapes_it_cannot_take_at_injection(monkeypatch, tiny_vit):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(va.AdapterError, match="at most 128 tokens"):  # the reason vfm_adapters.kernels.supports gives
        va.inject_rein(tiny_vit, kernel="triton", token_length=129)
    assert not hasattr(tiny_vit, "vfm_adapters")


def test_auto_falls_back_to_torch_for_shapes_triton_cannot_take():
    from vfm_adapters.kernels import resolve_kernel, triton_takes

    feats, tokens = torch.zeros(2, 5, 24), torch.zeros(3, 24)
    assert not triton_takes(feats, tokens)  # 24 is not a multiple of 16
    assert triton_takes(torch.zeros(2, 5, 32), torch.zeros(3, 32))
    assert not triton_takes(torch.zeros(2, 5, 32), torch.zeros(2, 3, 32))  # per-image tokens
    assert resolve_kernel("auto", feats, tokens) == "torch"


@settings(max_examples=15, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    patches=st.integers(1, 16),
    prefix=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_rein_runs_in_the_features_dtype(dtype, patches, prefix, seed):
    """fp32 parameters with half-precision features: computed and returned in the features' dtype.

    Tolerance: the half-precision result against the float64 equations, relative to the
    largest output magnitude, within 2e-2 (bf16 has 8 bits of mantissa, fp16 11).
    """
    torch.manual_seed(seed)
    rein = Rein(1, 16, ReinConfig(token_length=5, rank=3, kernel="torch"), patch_size=4)
    with torch.no_grad():
        rein.scale.fill_(0.5)
    hidden = torch.randn(2, prefix + patches, 16).to(dtype)
    out = rein(hidden, layer=0, num_prefix_tokens=prefix)
    assert out.dtype == dtype and out.shape == hidden.shape
    exact = restated_update(
        hidden[:, prefix:].double(), rein.tokens_a[0].double(), rein.tokens_b[0].double(),
        rein.token_to_feature.weight.double(), rein.token_to_feature.bias.double(),
        rein.delta_feature.weight.double(), rein.delta_feature.bias.double(), rein.scale.double(),
    )
    error = (out[:, prefix:].double() - exact).abs().max() / exact.abs().max()
    assert error < 2e-2
    assert torch.equal(out[:, :prefix], hidden[:, :prefix])


def test_kernel_capability_is_public_and_auto_is_resolved_once(monkeypatch, tiny_vit):
    """supports() is the public capability query; "auto" resolves at injection and again
    only for a new device or dtype; with no GPU measurement recorded it means PyTorch."""
    import vfm_adapters.kernels as kernels
    import vfm_adapters.methods.rein as rein_module

    assert kernels.supports(1024, 100) and not kernels.supports(1024, 129) and not kernels.supports(24, 4)
    assert kernels.TRITON_MEASURED_FASTER == frozenset()
    calls = []
    original = rein_module.resolve_kernel
    monkeypatch.setattr(rein_module, "resolve_kernel", lambda *a, **k: calls.append(a[1].dtype) or original(*a, **k))
    model = va.inject_rein(tiny_vit, kernel="auto", token_length=5, rank=2)
    assert calls == [torch.float32]  # at injection
    images = torch.randn(1, 3, 56, 56)
    model.forward_features(images)
    model.forward_features(images)
    assert calls == [torch.float32]  # every block of both forwards used the cached answer
    model.to(torch.bfloat16).forward_features(images.bfloat16())
    assert calls == [torch.float32, torch.bfloat16]  # a new dtype: resolved once more
    assert model.vfm_adapters.rein.kernel_for(images) == "torch"
