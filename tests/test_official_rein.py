"""The Rein authors' checkpoint layout: import, export, the float64 formula, and refusals.

Checkpoints are made here from the authors' names and shapes (``backbone.reins.``,
``LoRAReins``/``Reins``) with random values; the reference computation restates the
paper's equations in the authors' own layout (interleaved ``merge`` columns, one
prefix token stripped), independently of the library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import vfm_adapters as va
from vfm_adapters.official import (
    OfficialCheckpointError,
    blocks_to_interleaved,
    interleaved_to_blocks,
    official_rein_config,
)

PREFIX = "backbone.reins."
DEPTH, WIDTH, TOKENS, RANK, QUERY = 3, 32, 5, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def host(depth: int = DEPTH, width: int = WIDTH) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch14_dinov2", depth=depth, embed_dim=width, num_heads=2,
                             img_size=32, patch_size=16).eval()


def authors_state(layers=DEPTH, tokens=TOKENS, rank=RANK, width=WIDTH, query=QUERY, *, full_rank=False,
                  fixed_scale=False, seed=0) -> dict[str, torch.Tensor]:
    """A state dict in the authors' names and shapes (their Reins/LoRAReins.create_model)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if full_rank:
        shapes["learnable_tokens"] = (layers, tokens, width)
    else:
        shapes["learnable_tokens_a"] = (layers, tokens, rank)
        shapes["learnable_tokens_b"] = (layers, rank, width)
    if not fixed_scale:
        shapes["scale"] = ()
    shapes.update({
        "mlp_token2feat.weight": (width, width), "mlp_token2feat.bias": (width,),
        "mlp_delta_f.weight": (width, width), "mlp_delta_f.bias": (width,),
        "transform.weight": (query, width), "transform.bias": (query,),
        "merge.weight": (query, 3 * query), "merge.bias": (query,),
    })
    generator = torch.Generator().manual_seed(seed)
    return {PREFIX + name: torch.randn(shape, generator=generator) * 0.5 for name, shape in shapes.items()}


# ----------------------------------------------------------------------------- the authors' formula, float64
def authors_tokens(state, layer=None):
    get = lambda name: state[PREFIX + name].double()  # noqa: E731
    if PREFIX + "learnable_tokens" in state:
        tokens = get("learnable_tokens")
    else:
        tokens = get("learnable_tokens_a") @ get("learnable_tokens_b")
    return tokens if layer is None else tokens[layer]


def authors_refine(state, patches: torch.Tensor, layer: int) -> torch.Tensor:
    """f + s * ((S[:, 1:] (T[1:] W_t^T + b_t) + f) W_f^T + b_f), S = softmax(f T^T / sqrt(c))."""
    get = lambda name: state[PREFIX + name].double()  # noqa: E731
    tokens = authors_tokens(state, layer)
    scale = get("scale") if PREFIX + "scale" in state else 1.0
    attention = torch.softmax(torch.einsum("bnc,mc->bnm", patches, tokens) / math.sqrt(patches.shape[-1]), dim=-1)
    values = tokens[1:] @ get("mlp_token2feat.weight").T + get("mlp_token2feat.bias")
    delta = torch.einsum("bnm,mc->bnc", attention[..., 1:], values)
    delta = (delta + patches) @ get("mlp_delta_f.weight").T + get("mlp_delta_f.bias")
    return patches + scale * delta


def authors_queries(state) -> torch.Tensor:
    """merge(flatten([max, mean, last] per channel)): input column 3*j + k, statistic k of channel j."""
    get = lambda name: state[PREFIX + name].double()  # noqa: E731
    per_layer = authors_tokens(state) @ get("transform.weight").T + get("transform.bias")  # (L, m, q)
    by_channel = per_layer.permute(1, 2, 0)  # (m, q, L)
    stats = torch.stack([by_channel.max(-1).values, by_channel.mean(-1), by_channel[..., -1]], dim=-1)  # (m, q, 3)
    return stats.flatten(-2) @ get("merge.weight").T + get("merge.bias")


def authors_forward_features(vit, state, images):
    """The host's own blocks with the authors' Rein after each (one prefix token kept aside)."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for layer, block in enumerate(vit.blocks):
        x = block(x)
        x = torch.cat([x[:, :1], authors_refine(state, x[:, 1:], layer)], dim=1)
    return vit.norm(x)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, va.injected_methods(model),
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_untouched(model, before):
    state, methods, grads = before
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert va.injected_methods(model) == methods
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


# ----------------------------------------------------------------------------- tests
def test_config_is_inferred_from_the_shapes():
    config, layers, width = official_rein_config(authors_state())
    assert (config.token_length, config.rank, config.query_dim, layers, width) == (TOKENS, RANK, QUERY, DEPTH, WIDTH)
    assert config.link_queries and not config.zero_init_delta and config.patch_size == 16
    full, _, _ = official_rein_config(authors_state(full_rank=True, fixed_scale=True))
    assert full.rank is None and full.zero_init_delta


def test_every_tensor_lands_where_it_should():
    theirs = authors_state()
    model = va.import_official_rein(host(), theirs)
    rein = model.vfm_adapters["rein"]
    assert va.injected_methods(model) == ["rein"]
    assert torch.equal(rein.tokens_a, theirs[PREFIX + "learnable_tokens_a"])
    assert torch.equal(rein.tokens_b, theirs[PREFIX + "learnable_tokens_b"])
    assert torch.equal(rein.scale, theirs[PREFIX + "scale"])
    for ours, name in ((rein.token_to_feature, "mlp_token2feat"), (rein.delta_feature, "mlp_delta_f"),
                       (rein.transform, "transform")):
        assert torch.equal(ours.weight, theirs[f"{PREFIX}{name}.weight"])
        assert torch.equal(ours.bias, theirs[f"{PREFIX}{name}.bias"])
    assert torch.equal(rein.merge.bias, theirs[PREFIX + "merge.bias"])
    merge = theirs[PREFIX + "merge.weight"]
    for j in range(QUERY):  # our column k*q + j is their column 3*j + k
        for k in range(3):
            assert torch.equal(rein.merge.weight[:, k * QUERY + j], merge[:, 3 * j + k])
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vfm_adapters."))


@pytest.mark.parametrize("variant", [{}, {"full_rank": True}, {"fixed_scale": True}])
def test_injected_model_equals_the_authors_formula_in_float64(variant):
    theirs = authors_state(**variant, seed=3)
    model = va.import_official_rein(host(), theirs).double()
    clean = host().double()  # the same host weights (same seed), without Rein
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        ours = model.forward_features(images)
        expected = authors_forward_features(clean, theirs, images)
        reference_without_rein = clean.forward_features(images)
    assert not torch.allclose(expected, reference_without_rein, atol=1e-3)  # Rein changes the features
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(va.rein_queries(model), authors_queries(theirs), rtol=1e-10, atol=1e-10)


def test_block_layout_differs_from_interleaved_so_the_permutation_matters():
    theirs = authors_state(seed=4)
    unpermuted = dict(theirs)
    unpermuted[PREFIX + "merge.weight"] = interleaved_to_blocks(theirs[PREFIX + "merge.weight"])
    model = va.import_official_rein(host(), unpermuted).double()
    assert not torch.allclose(va.rein_queries(model), authors_queries(theirs), atol=1e-3)


@pytest.mark.parametrize("variant", [{}, {"full_rank": True}, {"fixed_scale": True}])
def test_export_round_trips_bit_identically(variant):
    theirs = authors_state(**variant, seed=6)
    exported = va.export_official_rein(va.import_official_rein(host(), theirs))
    assert set(exported) == set(theirs)
    assert all(exported[k].dtype == theirs[k].dtype and torch.equal(exported[k], theirs[k]) for k in theirs)
    # and from our side: a trained-here Rein survives export -> import unchanged
    mine = va.inject_rein(host(), token_length=TOKENS, rank=RANK, query_dim=QUERY)
    again = va.import_official_rein(host(), va.export_official_rein(mine))
    mine_state, again_state = va.adapter_state_dict(mine), va.adapter_state_dict(again)
    assert set(mine_state) == set(again_state)
    assert all(torch.equal(mine_state[k], again_state[k]) for k in mine_state)


def test_export_has_the_authors_names_and_shapes():
    mine = va.inject_rein(host(), token_length=TOKENS, rank=RANK, query_dim=QUERY)
    exported = va.export_official_rein(mine)
    layout = authors_state()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in layout.items()}


def test_merge_permutation_is_an_exact_inverse():
    weight = torch.randn(6, 18)
    assert torch.equal(blocks_to_interleaved(interleaved_to_blocks(weight)), weight)
    assert not torch.equal(interleaved_to_blocks(weight), weight)


def test_import_from_a_pth_file_and_into_an_already_injected_rein(tmp_path):
    theirs = authors_state(seed=8)
    path = tmp_path / "iter_40000_published.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": {**theirs, "decode_head.cls_embed.bias": torch.zeros(3)}}, path)
    model = va.inject_rein(host(), token_length=TOKENS, rank=RANK, query_dim=QUERY)
    va.import_official_rein(model, path)
    assert torch.equal(model.vfm_adapters["rein"].tokens_a, theirs[PREFIX + "learnable_tokens_a"])


def test_strict_refuses_unknown_rein_names_and_strict_false_ignores_them():
    theirs = dict(authors_state(), **{PREFIX + "extra": torch.zeros(2)})
    model = host()
    before = snapshot(model)
    with pytest.raises(OfficialCheckpointError, match="unknown Rein parameters"):
        va.import_official_rein(model, theirs)
    assert_untouched(model, before)
    va.import_official_rein(model, theirs, strict=False)
    assert va.injected_methods(model) == ["rein"]


def _not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"this is not a checkpoint\n" * 4)
    return path


@pytest.mark.parametrize("case, match", [
    ("no rein keys", "no Rein parameters"),
    ("width", "width 48"),
    ("depth", "refines 4 layers"),
    ("full rank on low rank", "full-rank"),
    ("other token length", "token_length"),
    ("not a checkpoint", "not a readable PyTorch checkpoint"),
])
def test_bad_inputs_get_clear_errors_and_leave_the_model_untouched(tmp_path, case, match):
    model, source = host(), authors_state()
    if case == "no rein keys":
        source = {"decode_head.cls_embed.weight": torch.zeros(3, 8)}
    elif case == "width":
        source = authors_state(width=48)
    elif case == "depth":
        source = authors_state(layers=4)
    elif case == "full rank on low rank":
        model = va.inject_rein(model, token_length=TOKENS, rank=RANK, query_dim=QUERY)
        source = authors_state(full_rank=True)
    elif case == "other token length":
        model = va.inject_rein(model, token_length=TOKENS + 1, rank=RANK, query_dim=QUERY)
    elif case == "not a checkpoint":
        source = _not_a_checkpoint(tmp_path)
    before = snapshot(model)
    with pytest.raises(OfficialCheckpointError, match=match):
        va.import_official_rein(model, source)
    assert_untouched(model, before)


class TrainingLogEntry:
    """Stands for mmengine's HistoryBuffer in a checkpoint's message_hub: a class from outside torch."""

    built = 0

    def __init__(self):
        self.values = [1.0, 2.0]

    def __setstate__(self, state):
        TrainingLogEntry.built += 1
        self.__dict__.update(state)


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo ran > ran.txt",))


def test_an_mmengine_checkpoint_with_logging_objects_loads_without_running_their_code(tmp_path):
    theirs = authors_state(seed=9)
    path = tmp_path / "iter_40000.pth"
    torch.save({"state_dict": theirs, "meta": {"seed": np.int64(0), "iter": 40000},
                "message_hub": {"log_scalars": {"loss": TrainingLogEntry()}}}, path)
    TrainingLogEntry.built = 0
    model = va.import_official_rein(host(), path)
    assert TrainingLogEntry.built == 0  # replaced by a placeholder, never rebuilt
    assert torch.equal(model.vfm_adapters["rein"].tokens_b, theirs[PREFIX + "learnable_tokens_b"])


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": authors_state(), "hook": RunsCode()}, path)
    model = host()
    before = snapshot(model)
    with pytest.raises(OfficialCheckpointError, match="not a readable PyTorch checkpoint"):
        va.import_official_rein(model, path)
    assert not (tmp_path / "ran.txt").exists()
    assert_untouched(model, before)


def test_export_refuses_a_model_without_rein_or_with_a_partial_one():
    with pytest.raises(va.AdapterError, match="no Rein"):
        va.export_official_rein(host())
    with pytest.raises(va.AdapterError, match="every block"):
        va.export_official_rein(va.inject_rein(host(), layers=[0, 1], token_length=TOKENS, query_dim=QUERY))
    with pytest.raises(va.AdapterError, match="link_queries=False"):
        va.export_official_rein(va.inject_rein(host(), link_queries=False, token_length=TOKENS))


def test_the_released_dinov2_l_shapes_give_the_papers_rein_on_meta():
    """The released checkpoint's shapes (L=24, m=100, r=16, c=1024, q=256) configure the paper's Rein."""
    shapes = {k: tuple(v.shape) for k, v in authors_state(layers=1, tokens=2, rank=1, width=2, query=2).items()}
    big = {"learnable_tokens_a": (24, 100, 16), "learnable_tokens_b": (24, 16, 1024), "scale": (),
           "mlp_token2feat.weight": (1024, 1024), "mlp_token2feat.bias": (1024,), "mlp_delta_f.weight": (1024, 1024),
           "mlp_delta_f.bias": (1024,), "transform.weight": (256, 1024), "transform.bias": (256,),
           "merge.weight": (256, 768), "merge.bias": (256,)}
    assert set(shapes) == {PREFIX + k for k in big}
    released = {PREFIX + k: torch.empty(shape, device="meta") for k, shape in big.items()}
    with torch.device("meta"):
        vit = timm.create_model("vit_large_patch14_dinov2", img_size=512, patch_size=16, num_classes=0)
    va.import_official_rein(vit, released)
    assert va.trainable_parameters(vit) == 2_990_081
    assert {k: tuple(v.shape) for k, v in va.export_official_rein(vit).items()} == {PREFIX + k: s for k, s in big.items()}


def test_on_a_host_with_registers_all_prefix_tokens_pass_through_and_patches_follow_the_formula():
    """The authors strip one prefix token (CLS); a host with registers has five, and all of them pass through."""
    def reg_host():
        torch.manual_seed(2)
        return timm.create_model("vit_small_patch14_reg4_dinov2", depth=DEPTH, embed_dim=WIDTH, num_heads=2,
                                 img_size=32, patch_size=16).eval()

    theirs = authors_state(seed=10)
    model = va.import_official_rein(reg_host(), theirs).double()
    clean = reg_host().double()
    prefix = clean.num_prefix_tokens
    assert prefix == 5
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        x = clean.norm_pre(clean._pos_embed(clean.patch_embed(images)))
        for layer, block in enumerate(clean.blocks):
            x = block(x)
            x = torch.cat([x[:, :prefix], authors_refine(theirs, x[:, prefix:], layer)], dim=1)
        expected = clean.norm(x)
        torch.testing.assert_close(model.forward_features(images), expected, rtol=1e-10, atol=1e-10)
