import pytest
import timm
import torch


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    """A 4-block, 64-wide DINOv2-style timm ViT with random weights."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=4, embed_dim=64,
                             num_heads=2, img_size=56).eval()


@pytest.fixture
def one_thread():
    """One CPU thread: the tiny models of the tests run faster that way, and much faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
