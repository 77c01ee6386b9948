"""The manifest names the classes: part of the contract, defaulted for manifests without them."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from sfprompt.protocol.bundle import BundleError, Manifest


def _manifest(**changes: object) -> Manifest:
    fields = dict(
        role="device",
        protocol_version=1,
        model="vit_tiny_patch16_224",
        model_args={},
        num_classes=3,
        prompts=4,
        head_blocks=1,
        tail_blocks=0,
        depth=4,
        embed_dim=24,
        num_prefix_tokens=1,
        num_patches=16,
        export_batch=8,
        opset=17,
    )
    return Manifest(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_manifest_without_classes_names_them_by_index() -> None:
    """What manifests written before the field hold: they load, with "0".."n-1"."""
    data = asdict(_manifest(classes=["a", "b", "c"]))
    del data["classes"]
    assert Manifest.from_dict(data).classes == ["0", "1", "2"]


def test_classes_round_trip_and_join_the_contract() -> None:
    named = _manifest(classes=["bird", "cat", "dog"])
    assert Manifest.from_dict(asdict(named)) == named
    reordered = replace(named, classes=["dog", "cat", "bird"])
    assert named.contract_hash() != reordered.contract_hash()
    assert named.contract_hash() == replace(named, role="server").contract_hash()


def test_default_names_leave_the_hash_of_older_bundles_unchanged() -> None:
    """A bundle exported before classes were named keeps its hash (and its checkpoints)."""
    unnamed = _manifest()
    assert unnamed.classes == ["0", "1", "2"]
    assert unnamed.contract_hash() == _manifest(classes=["0", "1", "2"]).contract_hash()
    assert unnamed.contract_hash() != _manifest(classes=["a", "b", "c"]).contract_hash()


@pytest.mark.parametrize(
    ("classes", "problem"),
    [(["a", "b"], "2 names for 3 classes"), (["a", "a", "b"], "repeated: \\['a'\\]")],
)
def test_classes_that_do_not_name_every_logit_once_are_refused(
    classes: list[str], problem: str
) -> None:
    data = asdict(_manifest())
    data["classes"] = classes
    with pytest.raises(BundleError, match=problem):
        Manifest.from_dict(data)
