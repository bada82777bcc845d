"""Domino: the domain embedding, DominoNorm, inject_domino, domain_rein and the example."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vfm_adapters as va
from vfm_adapters.methods.base import injection_state
from vfm_adapters.methods.domino import DomainReinShift

from model_zoo import make_model, sample_images, token_output

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=15, deadline=None)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is faster and robust to a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- embedding


def _formula(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = sum_i softmax_i(I.d_i / (|I| |d_i|)) d_i, written out image by image."""
    ws, alphas = [], []
    for vector in image:
        cos = torch.stack([(vector @ d) / (vector.norm() * d.norm()) for d in text])
        alpha = cos.exp() / cos.exp().sum()
        alphas.append(alpha)
        ws.append(sum(a * d for a, d in zip(alpha, text)))
    return torch.stack(ws), torch.stack(alphas)


@FAST
@given(batch=st.integers(1, 4), descriptions=st.integers(1, 6), width=st.integers(2, 12), seed=st.integers(0, 10**6))
def test_domain_embedding_matches_the_formula(batch, descriptions, width, seed):
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(batch, width, generator=g, dtype=torch.float64), torch.randn(
        descriptions, width, generator=g, dtype=torch.float64
    )
    w, alpha = va.domain_embedding(image, text, return_weights=True)
    expected_w, expected_alpha = _formula(image, text)
    torch.testing.assert_close(alpha, expected_alpha)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(batch, dtype=torch.float64))
    assert (alpha > 0).all()
    # the temperature extension: 1.0 is the paper's equation; a lower one sharpens alpha
    _, sharp = va.domain_embedding(image, text, temperature=0.01, return_weights=True)
    torch.testing.assert_close(sharp, torch.softmax(F.cosine_similarity(image[:, None], text[None], dim=-1) / 0.01, -1))


def test_domain_embedder_from_precomputed_embeddings():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(5, 8, generator=g)
    encoder = nn.Linear(20, 8)
    embedder = va.DomainEmbedder(text, image_encoder=encoder)
    images = torch.randn(3, 20, generator=g)
    expected, expected_alpha = _formula(encoder(images), text)
    w, alpha = embedder(images, return_weights=True)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(embedder.weights(images), expected_alpha)
    assert "text_embeddings" in dict(embedder.named_buffers())
    # a callable that is not a Module works too, and the embedder has no parameters of its own
    plain = va.DomainEmbedder(text, image_encoder=lambda x: x @ encoder.weight.T + encoder.bias)
    torch.testing.assert_close(plain(images), expected)
    assert list(plain.parameters()) == []
    # precomputed image embeddings, no encoder
    torch.testing.assert_close(va.DomainEmbedder(text).embed(encoder(images)), expected)


def test_domain_embedder_errors():
    embedder = va.DomainEmbedder(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="no image encoder"):
        embedder(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="width 6 but the description embeddings have width 8"):
        embedder.embed(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        va.DomainEmbedder(torch.randn(8))
    with pytest.raises(ValueError, match="3 descriptions for 4"):
        va.DomainEmbedder(torch.randn(4, 8), descriptions=["a", "b", "c"])
    with pytest.raises(ValueError, match="temperature"):
        va.DomainEmbedder(torch.randn(4, 8), temperature=0.0)
    bad = va.DomainEmbedder(torch.randn(4, 8), image_encoder=lambda x: torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"must return \(B, d\)"):
        bad(torch.randn(3, 5))


class WordTokenizer:
    """A word-level stand-in for CLIPTokenizer (no vocabulary files can be downloaded)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [[0] + [2 + self.vocab.setdefault(w, len(self.vocab)) for w in t.split()] + [1] for t in texts]
        length = max(map(len, ids))
        return {
            "input_ids": torch.tensor([i + [1] * (length - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids]),
        }


def _tiny_clip() -> transformers.CLIPModel:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=8,
    )
    return transformers.CLIPModel(config).eval()


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_domain_embedder_from_clip_caches_descriptions(monkeypatch):
    clip, tokenizer = _tiny_clip(), WordTokenizer()
    calls = []
    original = clip.get_text_features
    monkeypatch.setattr(clip, "get_text_features", lambda **kw: calls.append(1) or original(**kw))
    embedder = va.DomainEmbedder.from_clip(clip, tokenizer)
    assert len(calls) == 1
    assert embedder.descriptions == list(va.DEFAULT_DRIVING_DOMAINS)
    assert len(va.DEFAULT_DRIVING_DOMAINS) >= 8 and "a photo taken at night" in va.DEFAULT_DRIVING_DOMAINS
    with torch.no_grad():
        text = _features(original(**tokenizer(list(va.DEFAULT_DRIVING_DOMAINS))))
    torch.testing.assert_close(embedder.text_embeddings, text)
    assert len({tuple(row.tolist()) for row in text}) == len(text)  # the descriptions differ

    images = torch.randn(2, 3, 28, 28)
    for _ in range(3):
        w = embedder(images)
    assert len(calls) == 1  # no text-encoder call per image batch
    with torch.no_grad():
        expected, _ = _formula(_features(clip.get_image_features(pixel_values=images)), text)
    torch.testing.assert_close(w, expected)
    # frozen: nothing trainable; other image sizes are resized to CLIP's input size
    assert not any(p.requires_grad for p in embedder.parameters())
    assert embedder(torch.randn(2, 3, 40, 60)).shape == (2, 8)
    trainable = va.DomainEmbedder.from_clip(_tiny_clip(), tokenizer, ["a photo taken at night", "fog"],
                                           freeze_image_encoder=False)
    assert any(p.requires_grad for p in trainable.parameters())
    assert trainable.text_embeddings.shape == (2, 8)


def test_condition_prompts_add_and_sub():
    classes, w = torch.randn(5, 6), torch.randn(3, 6)
    torch.testing.assert_close(va.condition_prompts(classes, w, "add"), classes[None] + w[:, None])
    torch.testing.assert_close(va.condition_prompts(classes, w, "sub"), classes[None] - w[:, None])
    batched = torch.randn(3, 5, 6)
    torch.testing.assert_close(va.condition_prompts(batched, w, "sub"), batched - w[:, None])
    with pytest.raises(ValueError, match="mode"):
        va.condition_prompts(classes, w, "mul")
    with pytest.raises(ValueError, match="width 6 but the domain embedding has width 4"):
        va.condition_prompts(classes, torch.randn(3, 4))
    with pytest.raises(ValueError, match="batch of 2"):
        va.condition_prompts(torch.randn(2, 5, 6), w)


# ---------------------------------------------------------------------------- DominoNorm


def _perturb(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _random_affine(norm: nn.Module, seed: int = 1) -> nn.Module:
    _perturb(norm, seed)
    if isinstance(norm, nn.BatchNorm2d):
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return norm


NORMS = {
    "batch_eval": (lambda c: nn.BatchNorm2d(c).eval(), lambda b, c: torch.randn(b, c, 5, 4)),
    "batch_train": (lambda c: nn.BatchNorm2d(c).train(), lambda b, c: torch.randn(b, c, 5, 4)),
    "group": (lambda c: nn.GroupNorm(2, c), lambda b, c: torch.randn(b, c, 5, 4)),
    "layer": (lambda c: nn.LayerNorm(c), lambda b, c: torch.randn(b, 7, c)),
}


@FAST
@given(kind=st.sampled_from(sorted(NORMS)), batch=st.integers(2, 4), half=st.integers(1, 4), seed=st.integers(0, 999))
def test_domino_starts_as_the_layer_it_replaces(kind, batch, half, seed):
    torch.manual_seed(seed)
    make_norm, make_input = NORMS[kind]
    channels = 2 * half
    norm = _random_affine(make_norm(channels), seed)
    reference = copy.deepcopy(norm)
    domino = va.DominoNorm(norm, embed_dim=6, hidden_dim=5).train(norm.training)
    domino.set_domain_embedding(torch.randn(batch, 6))
    x = make_input(batch, channels)
    torch.testing.assert_close(domino(x), reference(x), atol=1e-5, rtol=1e-5)
    if kind.startswith("batch"):  # same statistics: running stats carried over and updated alike
        torch.testing.assert_close(domino.norm.running_mean, reference.running_mean)
        torch.testing.assert_close(domino.norm.running_var, reference.running_var)
    # the replaced layer is not modified, and the normaliser has no affine parameters
    assert all(p is q for p, q in zip(norm.parameters(), [norm.weight, norm.bias]))
    assert {n for n, _ in domino.named_parameters()} == {
        "shared.0.weight", "shared.0.bias", "to_gamma.weight", "to_gamma.bias", "to_mu.weight", "to_mu.bias"
    }


@FAST
@given(kind=st.sampled_from(sorted(NORMS)), batch=st.integers(2, 4), seed=st.integers(0, 999))
def test_domino_output_is_normalised_times_gamma_plus_mu(kind, batch, seed):
    torch.manual_seed(seed)
    make_norm, make_input = NORMS[kind]
    norm = _random_affine(make_norm(6), seed)
    domino = va.DominoNorm(norm, embed_dim=5, hidden_dim=7).train(norm.training)
    _perturb(domino, seed)
    w, x = torch.randn(batch, 5), make_input(batch, 6)
    gamma, mu = domino.modulation(w)
    assert gamma.shape == mu.shape == (batch, 6)
    if kind == "batch_eval":
        mean, var = norm.running_mean.view(1, -1, 1, 1), norm.running_var.view(1, -1, 1, 1)
    elif kind == "batch_train":
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    elif kind == "group":
        groups = x.reshape(batch, 2, -1)
        mean = groups.mean(-1, keepdim=True).repeat_interleave(3, 1).reshape(batch, 6, 1, 1)
        var = groups.var(-1, unbiased=False, keepdim=True).repeat_interleave(3, 1).reshape(batch, 6, 1, 1)
    else:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normalised = (x - mean) / torch.sqrt(var + norm.eps)
    shape = (batch, 1, 6) if kind == "layer" else (batch, 6, 1, 1)
    expected = normalised * gamma.reshape(shape) + mu.reshape(shape)
    torch.testing.assert_close(domino.set_domain_embedding(w) or domino(x), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_over_several_dims_and_without_affine():
    x = torch.randn(2, 3, 4, 5)
    plain = nn.LayerNorm((4, 5), elementwise_affine=False)
    domino = va.DominoNorm(plain, embed_dim=3)
    domino.set_domain_embedding(torch.randn(2, 3))
    torch.testing.assert_close(domino(x), plain(x))
    _perturb(domino)
    gamma, mu = domino.modulation(domino._domain_embedding)
    expected = F.layer_norm(x, (4, 5)) * gamma.reshape(2, 1, 4, 5) + mu.reshape(2, 1, 4, 5)
    torch.testing.assert_close(domino(x), expected)


def test_each_image_is_modulated_by_its_own_embedding():
    torch.manual_seed(0)
    domino = va.DominoNorm(nn.GroupNorm(2, 4), embed_dim=6)
    x, w = torch.randn(3, 4, 5, 5), torch.randn(3, 6)
    domino.set_domain_embedding(w)
    before = domino(x)
    torch.testing.assert_close(before, nn.GroupNorm(2, 4)(x))  # init: no dependence on W
    _perturb(domino)
    out = domino(x)
    other = w.clone()
    other[1] += 1.0
    domino.set_domain_embedding(other)
    changed = domino(x)
    assert not torch.allclose(changed[1], out[1], atol=1e-4)
    torch.testing.assert_close(changed[[0, 2]], out[[0, 2]])  # only image 1 changes
    domino.set_domain_embedding(w[0])  # one embedding (d,) for the whole batch
    torch.testing.assert_close(domino(x)[0], out[0])


def test_gradients_reach_the_mlps():
    torch.manual_seed(0)
    domino = va.DominoNorm(nn.BatchNorm2d(4), embed_dim=6, hidden_dim=5)
    x, w = torch.randn(3, 4, 5, 5), torch.randn(3, 6)
    domino.set_domain_embedding(w)
    domino(x).pow(2).mul(torch.randn(3, 4, 5, 5)).sum().backward()
    # at init the last layers are zero, so only they (and their biases) get gradients
    assert domino.to_gamma.weight.grad.abs().sum() > 0 and domino.to_mu.weight.grad.abs().sum() > 0
    domino.zero_grad()
    _perturb(domino)
    domino(x).pow(2).mul(torch.randn(3, 4, 5, 5)).sum().backward()
    for name, param in domino.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_domino_errors_are_clear():
    domino = va.DominoNorm(nn.BatchNorm2d(4), embed_dim=6)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(va.AdapterError, match="no domain embedding is set"):
        domino(x)
    with pytest.raises(va.AdapterError, match=r"width 6, shape \(B, 6\)"):
        domino.set_domain_embedding(torch.randn(2, 5))
    domino.set_domain_embedding(torch.randn(3, 6))
    with pytest.raises(va.AdapterError, match="batch of 3 images but the features are for 2"):
        domino(x)
    domino.set_domain_embedding(torch.randn(2, 6))
    with pytest.raises(va.AdapterError, match=r"expected features \(B, 4, \.\.\.\)"):
        domino(torch.randn(2, 5, 3, 3))
    domino.set_domain_embedding(None)
    with pytest.raises(va.AdapterError, match="no domain embedding"):
        domino(x)
    layer = va.DominoNorm(nn.LayerNorm(8), embed_dim=6)
    layer.set_domain_embedding(torch.randn(2, 6))
    with pytest.raises(va.AdapterError, match=r"expected features \(B, \.\.\., 8\)"):
        layer(torch.randn(2, 3, 7))
    with pytest.raises(va.AdapterError, match="not InstanceNorm2d"):
        va.DominoNorm(nn.InstanceNorm2d(4), embed_dim=6)


# ---------------------------------------------------------------------------- inject_domino


class Head(nn.Module):
    """A small decode head: conv blocks with BatchNorm and GroupNorm, and a token branch."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.ReLU())
        self.token_norm = nn.LayerNorm(8)
        self.classifier = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fuse(self.block(x))
        b, c, h, w = x.shape
        tokens = self.token_norm(x.flatten(2).transpose(1, 2))
        return self.classifier(tokens.transpose(1, 2).reshape(b, c, h, w))


def _head(seed: int = 0) -> Head:
    torch.manual_seed(seed)
    head = Head()
    for module in head.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            _random_affine(module, seed + 1)
    return head.eval()


def test_inject_domino_replaces_norms_and_remove_restores():
    head = _head()
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 10)
    originals = {n: m for n, m in head.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))}
    state_before = {k: v.clone() for k, v in head.state_dict().items()}
    before = head(x)
    head.train()
    train_before = copy.deepcopy(head)(x)
    head.eval()

    assert va.inject_domino(head, embed_dim=10, hidden_dim=4) is head
    assert va.injected_methods(head) == ["domino"]
    assert {n for n, m in head.named_modules() if isinstance(m, va.DominoNorm)} == set(originals)
    assert injection_state(head).host is None  # no ViT here
    assert all(p.requires_grad for p in head.parameters())  # a decode head trains by default
    va.set_domain_embedding(head, w)
    torch.testing.assert_close(head(x), before, atol=1e-5, rtol=1e-5)
    head.train()
    torch.testing.assert_close(head(x), train_before, atol=1e-5, rtol=1e-5)
    head.eval()
    assert len(va.adapter_parameters(head)) == 6 * 3

    for layer in [m for m in head.modules() if isinstance(m, va.DominoNorm)]:
        _perturb(layer)  # train the Domino layers (only them: the host must come back as it was)
    assert not torch.allclose(head(x), before, atol=1e-3)
    va.remove_adapters(head)
    for name, module in originals.items():
        assert head.get_submodule(name) is module
    assert head.state_dict().keys() == state_before.keys()
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state_before.items())
    assert va.injected_methods(head) == [] and not hasattr(head, "vfm_adapters")


def test_inject_domino_options_and_errors():
    head = va.inject_domino(_head(), embed_dim=4, types=[nn.GroupNorm, "LayerNorm"], freeze_host=True)
    assert isinstance(head.block[1], nn.BatchNorm2d) and isinstance(head.fuse[1], va.DominoNorm)
    trainable = {id(p) for p in head.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in va.adapter_parameters(head)}
    with pytest.raises(va.AdapterError, match="already injected"):
        va.inject_domino(head, embed_dim=4)
    va.remove_adapters(head)
    assert all(p.requires_grad for p in head.parameters())

    with pytest.raises(va.AdapterError, match="no normalisation layer"):
        va.inject_domino(nn.Sequential(nn.Linear(2, 2)), embed_dim=4)
    with pytest.raises(ValueError, match="cannot replace"):
        va.inject_domino(_head(), embed_dim=4, types=[nn.InstanceNorm2d])
    with pytest.raises(ValueError, match="embed_dim must be a positive integer"):
        va.inject_domino(_head(), embed_dim=0)
    with pytest.raises(va.AdapterError, match="wrap it"):
        va.inject_domino(nn.LayerNorm(4), embed_dim=4)
    with pytest.raises(va.AdapterError, match="no Domino layers"):
        va.set_domain_embedding(_head(), torch.randn(2, 4))

    head = va.inject_domino(_head(), embed_dim=4)
    with pytest.raises(va.AdapterError, match="width 4"):
        va.set_domain_embedding(head, torch.randn(2, 5))
    with pytest.raises(va.AdapterError, match="no domain embedding"):
        head(torch.randn(2, 3, 6, 6))
    va.set_domain_embedding(head, torch.randn(3, 4))
    with pytest.raises(va.AdapterError, match="batch of 3"):
        head(torch.randn(2, 3, 6, 6))


def test_shared_norm_is_replaced_once():
    norm = nn.LayerNorm(4)
    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 4), norm)
    va.inject_domino(model, embed_dim=3)
    assert model[1] is model[3] and isinstance(model[1], va.DominoNorm)
    assert len(va.adapter_parameters(model)) == 6
    va.remove_adapters(model)
    assert model[1] is norm and model[3] is norm


def test_save_load_round_trip_is_bit_exact(tmp_path):
    head = va.inject_domino(_head(), embed_dim=10, hidden_dim=4)
    head.train()
    optimiser = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in range(3):  # move the MLPs and the BatchNorm running statistics
        x = torch.randn(4, 3, 6, 6)
        va.set_domain_embedding(head, torch.randn(4, 10))
        head(x).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
    head.eval()
    va.save_adapters(head, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["host"] is None
    assert config["methods"] == {"domino": {"embed_dim": 10, "hidden_dim": 4, "types": list(va.DominoConfig(1).types)}}
    saved = va.adapter_state_dict(head)
    assert "domino.block.1.norm.running_mean" in saved and "domino.fuse.1.to_gamma.bias" in saved

    fresh = _head()
    fresh.load_state_dict({k: v for k, v in head.state_dict().items() if "." in k and not _is_domino_key(head, k)},
                          strict=False)
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == ["domino"]
    loaded = va.adapter_state_dict(fresh)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 10)
    va.set_domain_embedding(head, w)
    va.set_domain_embedding(fresh, w)
    assert torch.equal(fresh(x), head(x))


def _is_domino_key(model: nn.Module, key: str) -> bool:
    return any(key.startswith(name + ".") for name, m in model.named_modules() if isinstance(m, va.DominoNorm))


def test_load_into_a_mismatched_head_changes_nothing(tmp_path):
    va.save_adapters(va.inject_domino(_head(), embed_dim=10), tmp_path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(va.AdapterError, match="do not match"):
        va.load_adapters(other, tmp_path)
    assert isinstance(other[1], nn.BatchNorm2d) and va.injected_methods(other) == []
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_domino_beside_rein_on_a_vit(tmp_path):
    vit, size = make_model("hf_vit")  # its LayerNorms are torch's (timm's are a subclass, left alone)
    x = sample_images(size)
    va.inject_rein(vit, token_length=4, rank=2)
    reference = token_output(vit, x)
    va.inject_domino(vit, embed_dim=6, types=["LayerNorm"])
    va.set_domain_embedding(vit, torch.randn(2, 6))
    torch.testing.assert_close(token_output(vit, x), reference, atol=1e-4, rtol=1e-4)
    va.save_adapters(vit, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["host"]["family"] == "transformers.ViTModel"
    fresh, _ = make_model("hf_vit")
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == ["rein", "domino"]
    va.remove_adapters(vit)
    assert not any(isinstance(m, va.DominoNorm) for m in vit.modules())


# ---------------------------------------------------------------------------- domain_rein


def test_domain_rein_conditions_rein_tokens(tmp_path):
    vit, size = make_model("timm_dinov2")
    x = sample_images(size)
    with pytest.raises(va.AdapterError, match="needs Rein"):
        va.inject_domain_rein(vit, embed_dim=6)
    va.inject_rein(vit, token_length=4, rank=2)
    rein = vit.vfm_adapters["rein"]
    with torch.no_grad():
        rein.scale.fill_(1.0)  # make Rein's (and so the shift's) effect visible
    rein_only = token_output(vit, x)

    va.inject_domain_rein(vit, embed_dim=6, mode="sub")
    shift = vit.vfm_adapters["domain_rein"]
    assert isinstance(shift, DomainReinShift) and rein.token_shift.__self__ is shift
    with pytest.raises(va.AdapterError, match="no domain embedding"):
        token_output(vit, x)
    w = torch.randn(2, 6)
    va.set_domain_embedding(vit, w)
    torch.testing.assert_close(token_output(vit, x), rein_only)  # zero-initialised projection

    _perturb(shift)
    conditioned = token_output(vit, x)
    assert not torch.allclose(conditioned, rein_only, atol=1e-4)
    offset = -(w @ shift.projection.weight.T + shift.projection.bias)[:, None, :]
    rein.set_token_shift(lambda layer: offset)  # the same per-image shift, by hand
    torch.testing.assert_close(conditioned, token_output(vit, x))
    rein.set_token_shift(shift.__call__)

    conditioned.square().mean().backward()
    assert shift.projection.weight.grad.abs().sum() > 0
    with pytest.raises(va.AdapterError, match="batch of 2 images but the model runs 1"):
        token_output(vit, x[:1])

    va.save_adapters(vit, tmp_path)
    fresh, _ = make_model("timm_dinov2")
    va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == ["rein", "domain_rein"]
    va.set_domain_embedding(fresh, w)
    assert torch.equal(token_output(fresh, x), conditioned.detach())

    va.remove_adapters(vit, "domain_rein")
    assert rein.token_shift is None
    torch.testing.assert_close(token_output(vit, x), rein_only)

    va.inject_domain_rein(vit, embed_dim=6, mode="add")
    va.set_domain_embedding(vit, w)
    with torch.no_grad():
        vit.vfm_adapters["domain_rein"].projection.weight.copy_(shift.projection.weight)
        vit.vfm_adapters["domain_rein"].projection.bias.copy_(shift.projection.bias)
    rein.set_token_shift(lambda layer: -offset)
    by_hand = token_output(vit, x)
    rein.set_token_shift(vit.vfm_adapters["domain_rein"].__call__)
    torch.testing.assert_close(token_output(vit, x), by_hand)
    with pytest.raises(ValueError, match="mode"):
        va.inject_domain_rein(fresh, embed_dim=6, mode="mul")


# ---------------------------------------------------------------------------- example


def test_two_domain_example_runs():
    spec = importlib.util.spec_from_file_location("domino_two_domains", ROOT / "examples" / "domino_two_domains.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(steps=3, verbose=False)
    assert set(results) == {"plain head", "Domino head"}
    assert all(set(s) == {"day", "night"} and all(0 <= v <= 100 for v in s.values()) for s in results.values())
