"""The server model against eager PyTorch on the same weights, and its refusals.

Each case exports a small bundle with `write_bundles` from an eager split model; the server
loads it from disk (`from_bundle`), so agreement with the eager model also proves the body
and head weights were loaded under the right keys.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from sfprompt.cloud_server import evaluation
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.export.bundle_writer import WEIGHTS_FILE, write_bundles
from sfprompt.export.config import ExportConfig
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import SplitViT, select_tail_input
from sfprompt.protocol.bundle import PROMPT_KEY, BundleError, load_manifest, write_manifest
from tests.bundles import SMALL_VIT

CASES = {
    # name: (model_args, head_blocks, tail_blocks): the class token crosses the wire (m = 0),
    # or every token does, to a tail holding one block of a mean-pooling model.
    "token_m0": (SMALL_VIT, 1, 0),
    "avg_m1": ({**SMALL_VIT, "global_pool": "avg", "class_token": False}, 1, 1),
}
MODEL = "vit_tiny_patch16_224"


def export_config(name: str, out: Path) -> ExportConfig:
    args, k, m = CASES[name]
    return ExportConfig(
        model=MODEL,
        num_classes=7,
        model_args=dict(args),
        prompts=4,
        head_blocks=k,
        tail_blocks=m,
        out=out,
        seed=3,
    )


@dataclass
class Case:
    cfg: ExportConfig
    split: SplitViT  # the eager model the bundle was written from
    server_dir: Path
    model: ServerModel  # loaded from the bundle


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    cfg = export_config(request.param, tmp_path_factory.mktemp(request.param))
    vit = create_vit(MODEL, cfg.num_classes, model_args=dict(cfg.model_args), seed=cfg.seed)
    split = SplitViT.cut_model(vit, cfg.cut)
    result = write_bundles(split, cfg, progress=lambda _: None)
    model = ServerModel.from_bundle(result.server_dir, BodyConfig(device="cpu"))
    return Case(cfg, split, result.server_dir, model)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def random_h(model: ServerModel, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(model.h_shape(batch)).astype(np.float32)


def eager_z(split: SplitViT, h: torch.Tensor) -> torch.Tensor:
    return select_tail_input(split.body(h), split.tail_input, split.skip_tokens)


def test_body_forward_equals_eager(case: Case) -> None:
    """z_sel from the loaded bundle equals the eager body on the exported weights."""
    h = random_h(case.model, 3)
    z = case.model.body_forward(h)
    with torch.no_grad():
        want = eager_z(case.split, torch.from_numpy(h)).numpy()
    assert z.dtype == np.float32 and z.shape == case.model.z_shape(3) == want.shape
    assert rel_err(z, want) <= 1e-4


def test_body_vjp_equals_eager_and_computes_no_weight_gradient(case: Case) -> None:
    """dL/dh equals autograd through the eager body; the body's weights get no gradient."""
    h = random_h(case.model, 2, seed=1)
    grad_z = np.random.default_rng(2).standard_normal(case.model.z_shape(2)).astype(np.float32)
    grad_h = case.model.body_vjp(h, grad_z)
    h_t = torch.from_numpy(h).requires_grad_(True)
    (want,) = torch.autograd.grad(eager_z(case.split, h_t), h_t, torch.from_numpy(grad_z))
    assert grad_h.dtype == np.float32 and grad_h.shape == h.shape
    assert rel_err(grad_h, want.numpy()) <= 1e-4
    assert all(p.grad is None and not p.requires_grad for p in case.model.split.vit.parameters())


def perturbed(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Params unlike the model's own tail weights, so a tail that ignored them would show."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()
    }


def eager_logits(case: Case, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """SplitViT.forward on a copy of the eager model holding `params` under their timm keys."""
    vit = copy.deepcopy(case.split.vit)
    tail = {
        k.removeprefix("tail."): torch.from_numpy(v) for k, v in params.items() if k != PROMPT_KEY
    }
    unexpected = vit.load_state_dict(tail, strict=False).unexpected_keys
    assert not unexpected
    split = SplitViT.cut_model(vit, case.cfg.cut)
    with torch.no_grad():
        return split.forward(torch.from_numpy(images), torch.from_numpy(params[PROMPT_KEY])).numpy()


def test_evaluate_and_logits_equal_the_eager_split_model(case: Case) -> None:
    """The whole model with given prompt + tail equals SplitViT.forward, across chunks."""
    params = perturbed(case.model.initial_parameters(), seed=4)
    rng = np.random.default_rng(5)
    images = rng.standard_normal((7, 3, 32, 32)).astype(np.float32)
    want = eager_logits(case, params, images)
    logits = evaluation.logits(case.model, params, images, batch_size=3)
    assert logits.shape == (7, 7) and rel_err(logits, want) <= 1e-4

    labels = want.argmax(axis=1)
    labels[:3] = (labels[:3] + 1) % 7  # three wrong on purpose
    result = evaluation.evaluate(case.model, params, images, labels, batch_size=3)
    shifted = want - want.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert result.samples == 7
    assert result.accuracy == pytest.approx(4 / 7)
    assert result.loss == pytest.approx(-log_probs[np.arange(7), labels].mean(), rel=1e-4)


def test_features_are_what_the_tail_reads(case: Case) -> None:
    params = case.model.initial_parameters()
    images = np.random.default_rng(6).standard_normal((5, 3, 32, 32)).astype(np.float32)
    features = evaluation.features(case.model, params, images, batch_size=2)
    with torch.no_grad():
        h = case.split.head(torch.from_numpy(images), torch.from_numpy(params[PROMPT_KEY]))
        want = eager_z(case.split, h).numpy()
    assert features.shape == case.model.z_shape(5)
    assert rel_err(features, want) <= 1e-4


def test_initial_parameters_are_the_bundles(case: Case) -> None:
    written = load_numpy(str(case.server_dir / WEIGHTS_FILE))
    got = case.model.initial_parameters()
    assert set(got) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(got[key], value)


def test_from_timm_initial_parameters_equal_the_exporters(case: Case) -> None:
    """Same ExportConfig (and so seed) as the case's export: the prompt + tail it starts from
    (random tail blocks included) and the manifest's contract are the bundle's."""
    written = load_numpy(str(case.server_dir / WEIGHTS_FILE))
    model = ServerModel.from_timm(case.cfg, BodyConfig(device="cpu"))
    got = model.initial_parameters()
    assert set(got) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(got[key], value)
    server = load_manifest(case.server_dir, role="server")
    assert model.manifest.parameters == server.parameters
    assert model.manifest.tail_input == server.tail_input
    assert model.manifest.tokens == server.tokens
    assert model.manifest.contract_hash() == server.contract_hash()  # frozen weights included
    reseeded = dataclasses.replace(case.cfg, seed=case.cfg.seed + 1)
    other = ServerModel.from_timm(reseeded, BodyConfig(device="cpu"))  # other random weights
    assert other.manifest.contract_hash() != server.contract_hash()
    h = random_h(model, 2)
    np.testing.assert_allclose(model.body_forward(h), case.model.body_forward(h), rtol=1e-5)


def test_wrong_shapes_and_dtypes_raise_value_error_naming_the_tensor(case: Case) -> None:
    model = case.model
    good = random_h(model, 2)
    tokens, dim = model.manifest.tokens, model.manifest.embed_dim
    with pytest.raises(ValueError, match=rf"h: expected float32 \(B, {tokens}, {dim}\)"):
        model.body_forward(good[:, :-1])
    with pytest.raises(ValueError, match="h: expected float32.*got float64"):
        model.body_forward(good.astype(np.float64))
    with pytest.raises(ValueError, match="h: expected a float32 numpy array"):
        model.body_forward(good.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"h: expected.*got float32 \(0,"):
        model.body_forward(good[:0])
    grad_z = np.zeros(model.z_shape(3), np.float32)  # batch 3 for an h of batch 2
    with pytest.raises(ValueError, match=r"grad_z: expected float32 \(2, "):
        model.body_vjp(good, grad_z)
    params = model.initial_parameters()
    del params[PROMPT_KEY]
    images = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"missing \['prompt.tokens'\]"):
        evaluation.evaluate(model, params, images, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"images: expected .*\(N, 3, 32, 32\)"):
        evaluation.logits(model, model.initial_parameters(), images[:, :, :16])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        evaluation.evaluate(model, model.initial_parameters(), images, np.array([7]))


def copy_bundle(case: Case, to: Path) -> Path:
    shutil.copytree(case.server_dir, to)
    return to


def test_corrupt_or_missing_body_file_raises_bundle_error(case: Case, tmp_path: Path) -> None:
    corrupt = copy_bundle(case, tmp_path / "corrupt")
    data = bytearray((corrupt / "body.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "body.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="body.safetensors is corrupt"):
        ServerModel.from_bundle(corrupt)
    missing = copy_bundle(case, tmp_path / "missing")
    (missing / "body.safetensors").unlink()
    with pytest.raises(BundleError, match="body.safetensors is missing"):
        ServerModel.from_bundle(missing)


def test_body_file_with_other_keys_or_shapes_raises_bundle_error(
    case: Case, tmp_path: Path
) -> None:
    """Checksums that match (the manifest rewritten) but weights that do not fit the model."""
    first = case.cfg.head_blocks
    for name, change, message in [
        ("lost", lambda s: s.pop(f"blocks.{first}.mlp.fc1.bias"), "missing 1 keys"),
        ("extra", lambda s: s.update(extra=torch.zeros(1)), r"unexpected 1 keys \(extra\)"),
        (
            "shape",
            lambda s: s.update({f"blocks.{first}.norm1.weight": torch.ones(5)}),
            rf"blocks.{first}.norm1.weight: file torch.float32 \[5\]",
        ),
    ]:
        bundle = copy_bundle(case, tmp_path / name)
        state = load_file(str(bundle / "body.safetensors"))
        change(state)
        save_file(state, str(bundle / "body.safetensors"))
        write_manifest(bundle, load_manifest(bundle, verify=False))
        with pytest.raises(BundleError, match=message):
            ServerModel.from_bundle(bundle)


def test_a_device_bundle_is_refused(case: Case) -> None:
    with pytest.raises(BundleError, match="expected a server bundle"):
        ServerModel.from_bundle(case.server_dir.parent / "device")


def test_bf16_path_runs_close_to_fp32(case: Case) -> None:
    """bfloat16 autocast on the CPU: float32 out, within bfloat16's precision of fp32."""
    model = ServerModel.from_bundle(case.server_dir, BodyConfig(device="cpu", bf16=True))
    h = random_h(model, 2, seed=7)
    grad_z = np.ones(model.z_shape(2), np.float32)
    z, grad_h = model.body_forward(h), model.body_vjp(h, grad_z)
    assert z.dtype == grad_h.dtype == np.float32
    assert rel_err(z, case.model.body_forward(h)) < 0.1
    assert rel_err(grad_h, case.model.body_vjp(h, grad_z)) < 0.1


def test_device_choice() -> None:
    assert BodyConfig(device="cpu").resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        BodyConfig(device="tpu").resolve_device()
    if not torch.cuda.is_available():
        assert BodyConfig().resolve_device() == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            BodyConfig(device="cuda").resolve_device()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(case: Case) -> None:
    model = ServerModel.from_bundle(case.server_dir, BodyConfig(device="cuda"))
    h = random_h(model, 4, seed=8)
    grad_z = np.random.default_rng(9).standard_normal(model.z_shape(4)).astype(np.float32)
    assert model.device.type == "cuda"
    assert rel_err(model.body_forward(h), case.model.body_forward(h)) <= 1e-3
    assert rel_err(model.body_vjp(h, grad_z), case.model.body_vjp(h, grad_z)) <= 1e-3
    params = perturbed(model.initial_parameters(), seed=10)
    images = np.random.default_rng(11).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = evaluation.logits(case.model, params, images)
    assert rel_err(evaluation.logits(model, params, images), want) <= 1e-3
    bf16 = ServerModel.from_bundle(case.server_dir, BodyConfig(device="cuda", bf16=True))
    assert rel_err(bf16.body_forward(h), case.model.body_forward(h)) < 0.1
