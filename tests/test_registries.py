"""Registries refuse a name that is already taken, unless asked to replace it."""

from __future__ import annotations

import pytest

from vfm_adapters._registry import DuplicateNameError
from vfm_adapters.hosts import HostFamily, describe_host, register_host, supported_families, unregister_host
from vfm_adapters.methods import get_method, register_method
from vfm_adapters.methods.rein_method import ReinMethod
from vfm_adapters.seg.heads import HEADS, FPNHead, LinearHead


def test_a_second_method_under_a_taken_name_is_refused_and_the_first_kept():
    original = get_method("rein")
    with pytest.raises(DuplicateNameError, match="adapter method 'rein' is already registered.*replace=True"):
        register_method(ReinMethod())
    assert get_method("rein") is original


def test_replace_true_replaces_a_method():
    original = get_method("rein")
    replacement = ReinMethod()
    try:
        assert register_method(replacement, replace=True) is replacement
        assert get_method("rein") is replacement
    finally:
        register_method(original, replace=True)
    assert get_method("rein") is original


def test_a_second_host_family_under_a_taken_name_is_refused(tiny_vit):
    before = supported_families()
    impostor = HostFamily("timm.VisionTransformer", matches=lambda m: True, describe=lambda m: None)
    with pytest.raises(DuplicateNameError, match="host family 'timm.VisionTransformer' is already registered"):
        register_host(impostor)
    assert supported_families() == before
    assert describe_host(tiny_vit).family == "timm.VisionTransformer"


def test_replace_true_replaces_a_host_family_once():
    first = HostFamily("test.toy", matches=lambda m: False, describe=lambda m: None)
    second = HostFamily("test.toy", matches=lambda m: False, describe=lambda m: None)
    register_host(first)
    try:
        register_host(second, replace=True)
        assert supported_families().count("test.toy") == 1
        assert supported_families()[0] == "test.toy"
    finally:
        unregister_host("test.toy")
    assert "test.toy" not in supported_families()


def test_a_head_name_cannot_be_overwritten_by_assignment():
    with pytest.raises(DuplicateNameError, match="segmentation head 'fpn' is already registered"):
        HEADS["fpn"] = LinearHead
    assert HEADS["fpn"] is FPNHead
    try:
        HEADS.register("fpn", LinearHead, replace=True)
        assert HEADS["fpn"] is LinearHead
    finally:
        HEADS.register("fpn", FPNHead, replace=True)
