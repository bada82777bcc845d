"""Domino on a small conv decode head trained on two synthetic domains (CPU, seconds).

The task is binary segmentation of rectangles. In the "day" domain the background is
bright and the objects dark; in the "night" domain it is the other way round (lit
objects on a dark background). A small window of pixels cannot tell the two apart, so
a head without domain information can at best learn one domain's polarity. The domain
embedding ``W = sum_i softmax_i(cos(I, d_i)) d_i`` (:class:`vfm_adapters.DomainEmbedder`)
carries the global cue, and Domino layers turn it into per-image normalisation
parameters. The "text embeddings" are precomputed random vectors and the "image
encoder" is a fixed random projection of colour statistics: stand-ins for CLIP, which
cannot be downloaded here.

Run:  python examples/domino_two_domains.py [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vfm_adapters as va

DOMAINS = ("day", "night")
DESCRIPTIONS = (
    "a photo taken on a clear day",
    "a photo taken at night",
    "a photo taken in fog",
    "a photo taken in rain",
    "a photo taken in snow",
)


def make_batch(domain: str, batch: int, generator: torch.Generator, size: int = 24) -> tuple[Tensor, Tensor]:
    """Images (B, 3, size, size) and labels (B, size, size): 1 inside 1-3 random rectangles."""
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            h, w = (int(v) for v in torch.randint(5, 11, (2,), generator=generator))
            y, x = (int(v) for v in torch.randint(0, size - 5, (2,), generator=generator))
            labels[b, y : y + h, x : x + w] = 1
    bright, dark = 0.8, 0.2
    fg, bg = (dark, bright) if domain == "day" else (bright, dark)
    base = torch.where(labels.bool(), torch.tensor(fg), torch.tensor(bg))
    tint = 1.0 + 0.1 * torch.randn(batch, 3, 1, 1, generator=generator)  # per-image colour cast
    images = base[:, None] * tint + 0.08 * torch.randn(batch, 3, size, size, generator=generator)
    return images, labels


def make_head(channels: int = 16, classes: int = 2) -> nn.Module:
    """A small conv decode head with BatchNorm (what Domino replaces)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, classes, 1),
    )


def make_embedder(embed_dim: int, generator: torch.Generator) -> va.DomainEmbedder:
    text_embeddings = torch.randn(len(DESCRIPTIONS), embed_dim, generator=generator)  # "CLIP_text(k_i)"
    projection = torch.randn(6, embed_dim, generator=generator)

    def image_encoder(images: Tensor) -> Tensor:  # "CLIP_image(x)": colour mean and spread
        stats = torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)
        return (stats - 0.5) @ projection

    return va.DomainEmbedder(text_embeddings, image_encoder=image_encoder, descriptions=DESCRIPTIONS)


def mean_iou(logits: Tensor, labels: Tensor, classes: int = 2) -> float:
    prediction = logits.argmax(1)
    ious = []
    for c in range(classes):
        inter = ((prediction == c) & (labels == c)).sum().item()
        union = ((prediction == c) | (labels == c)).sum().item()
        ious.append(inter / union if union else 1.0)
    return 100.0 * sum(ious) / classes


def train(head: nn.Module, embedder: va.DomainEmbedder | None, steps: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-3)
    head.train()
    for _ in range(steps):
        parts = [make_batch(domain, 8, generator) for domain in DOMAINS]  # 50/50 mixed batches
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if embedder is not None:
            with torch.no_grad():
                va.set_domain_embedding(head, embedder(images))
        loss = F.cross_entropy(head(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head.eval()


@torch.no_grad()
def evaluate(head: nn.Module, embedder: va.DomainEmbedder | None, seed: int = 1234) -> dict[str, float]:
    head.eval()
    scores = {}
    for domain in DOMAINS:
        images, labels = make_batch(domain, 64, torch.Generator().manual_seed(seed + len(domain)))
        if embedder is not None:
            va.set_domain_embedding(head, embedder(images))
        scores[domain] = mean_iou(head(images), labels)
    return scores


def main(steps: int = 300, seed: int = 0, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Trains a plain head and a Domino head with the same data; returns mIoU per domain."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    embedder = make_embedder(embed_dim=32, generator=torch.Generator().manual_seed(seed))
    plain = make_head()
    domino = va.inject_domino(copy.deepcopy(plain), embed_dim=32, hidden_dim=32)

    with torch.no_grad():  # what the embedder sees: the weights alpha of the descriptions
        for domain in DOMAINS:
            images, _ = make_batch(domain, 64, torch.Generator().manual_seed(seed + 7))
            alpha = embedder.weights(images).mean(0)
            if verbose:
                print(f"{domain:>5}: alpha = " + ", ".join(f"{a:.3f}" for a in alpha.tolist()))

    results = {}
    for name, head, emb in (("plain head", plain, None), ("Domino head", domino, embedder)):
        train(head, emb, steps, seed)
        results[name] = evaluate(head, emb)
    if verbose:
        print(f"trainable parameters: plain {va.trainable_parameters(plain):,}, "
              f"Domino {va.trainable_parameters(domino):,} "
              f"(of which Domino MLPs {sum(p.numel() for p in va.adapter_parameters(domino)):,})")
        print(f"mIoU after {steps} steps     day   night")
        for name, scores in results.items():
            print(f"  {name:<22} {scores['day']:5.1f}   {scores['night']:5.1f}")
        print(f"({time.perf_counter() - start:.1f} s on CPU)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest (and robust to a busy machine)
    main(args.steps, args.seed)
