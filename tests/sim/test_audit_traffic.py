"""`sfprompt-audit` on a capture written as `serve --capture` writes it: real digits through the
small exported bundle, attacked with no defense, and the errors a bad capture gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.cloud_server.traffic_capture import TrafficCapture, step_path
from sfprompt.protocol.messages import GradZ, Smashed
from sfprompt.sim.audit import AuditModel
from sfprompt.sim.audit_cli import main
from sfprompt.sim.audit_traffic import unit_pixels
from tests.federation.harness import digits_images

DEVICE, BATCH, SENT = "dev-0", 8, 32


@pytest.fixture(scope="module")
def setting(small_export, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """The bundle, the device's shard, a public set (other digits) and a capture of one round
    in which the device sent its first 32 images, 8 per step, without a defense."""
    root = tmp_path_factory.mktemp("audit_traffic")
    images, labels = digits_images()
    np.savez(root / "device.npz", images=images[:64], labels=labels[:64])
    np.savez(root / "public.npz", images=images[1000:1300])
    bundle = small_export.server_dir
    model = ServerModel.from_bundle(bundle, BodyConfig(device="cpu"))
    capture = write_capture(root / "capture", model, images[:SENT], labels[:SENT])
    return bundle, root, capture, model


def write_capture(folder: Path, model: ServerModel, images: np.ndarray, labels: np.ndarray) -> Path:
    """What the server's capture holds after a device's split steps: h by the eager head of
    the images as the bundle preprocesses them (what the device's ONNX head computes) and dL/dz
    of its batch-mean cross-entropy."""
    params = model.initial_parameters()
    am = AuditModel(model, params)
    pixels = unit_pixels(model, images)
    capture = TrafficCapture(folder, limit=64, contract_hash=model.manifest.contract_hash())
    capture.start()
    capture.round_params(1, params, RoundConfig().settings(deadline=1.0))
    for step, begin in enumerate(range(0, len(images), BATCH), start=1):
        h = am.h_of(pixels[begin : begin + BATCH])
        up = Smashed(device_id=DEVICE, round=1, step=step, h=h)
        capture.smashed(up)
        leaf = torch.from_numpy(model.body_forward(h)).requires_grad_(True)
        target = torch.from_numpy(labels[begin : begin + BATCH].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(am.tail(leaf), target)
        (grad,) = torch.autograd.grad(loss, leaf)
        capture.grad_z(GradZ(device_id=DEVICE, round=1, step=step, grad_z=grad.numpy()), h)
    capture.close()
    return folder


def run(*args: str | Path):  # noqa: ANN201
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_audit_recovers_undefended_images_and_labels(setting, tmp_path: Path) -> None:  # noqa: ANN001
    """Without a defense the inversion's SSIM is far above a random image's, every label comes
    back from dL/dz, and each captured h is matched to the image it was computed from."""
    bundle, root, capture, _ = setting
    out = tmp_path / "audit"
    result = run(
        capture, "--bundle", bundle, "--images", root / "device.npz",
        "--public", root / "public.npz", "--out", out,
        "--steps", "80", "--decoder-epochs", "3", "--max-images", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    scores = report["scores"]
    assert scores["inversion_ssim"] > scores["baseline_ssim"] + 0.2, scores
    assert scores["decoder_ssim"] > scores["baseline_ssim"], scores
    assert scores["label_accuracy"] == 1.0
    samples = report["samples"]
    assert len(samples) == SENT and report["reconstructed"] == 8
    assert [s["image"] for s in samples] == list(range(SENT))  # matched to what was sent
    assert max(s["match_distance"] for s in samples) < 1e-4
    assert {"audit.md", "audit.json", "audit.png", "reconstructions.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    arrays = load_file(str(out / "reconstructions.safetensors"))
    assert arrays["inversions"].shape == (8, 32, 32) and arrays["decodings"].shape == (8, 32, 32)
    assert "inversion SSIM" in result.output
    text = (out / "audit.md").read_text()
    assert "| labels from dL/dz | 1.00 (chance 0.10, the commonest" in text


def test_without_images_the_reconstructions_and_labels_are_still_written(
    setting, tmp_path: Path
) -> None:  # noqa: ANN001
    bundle, root, capture, _ = setting
    out = tmp_path / "audit"
    result = run(capture, "--bundle", bundle, "--out", out, "--steps", "5", "--max-images", "4")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    assert report["scores"] is None and report["public_images"] == 0
    _, labels = digits_images()
    guessed = [s["label_guessed"] for s in report["samples"]]
    assert guessed == labels[:SENT].tolist()  # the attack needs no images to read labels
    arrays = load_file(str(out / "reconstructions.safetensors"))
    assert arrays["inversions"].shape == (4, 32, 32) and "decodings" not in arrays


def test_bad_captures_are_refused_by_name(setting, tmp_path: Path) -> None:  # noqa: ANN001
    """An empty folder, a damaged file, a missing round's params, a capture whose shapes or
    contract are another bundle's: each a one-line error, no traceback."""
    bundle, _, capture, model = setting
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty capture" in run(empty, "--bundle", bundle).output

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "step-dev-0-r1-s1.safetensors").write_bytes(b"\x00" * 20)
    result = run(damaged, "--bundle", bundle)
    assert result.exit_code == 1
    assert "step-dev-0-r1-s1.safetensors: not a readable safetensors file" in result.output

    no_params = tmp_path / "no_params"
    no_params.mkdir()
    (no_params / "step-dev-0-r1-s1.safetensors").write_bytes(
        step_path(capture, DEVICE, 1, 1).read_bytes()
    )
    assert "round-1-params.safetensors: missing" in run(no_params, "--bundle", bundle).output

    other = TrafficCapture(tmp_path / "other", limit=4, contract_hash="0" * 64).start()
    other.round_params(1, model.initial_parameters(), None)
    other.smashed(Smashed(device_id=DEVICE, round=1, step=1, h=np.zeros((2, 9, 192), np.float32)))
    other.close()
    result = run(tmp_path / "other", "--bundle", bundle)
    assert "h is [2, 9, 192], the bundle's model takes [2, 21, 192]" in result.output

    foreign = TrafficCapture(tmp_path / "foreign", limit=4, contract_hash="0" * 64).start()
    foreign.round_params(1, model.initial_parameters(), None)
    foreign.smashed(Smashed(device_id=DEVICE, round=1, step=1, h=np.zeros((2, 21, 192), "f4")))
    foreign.close()
    result = run(tmp_path / "foreign", "--bundle", bundle)
    assert "bundle differs from --bundle" in result.output and result.exit_code == 1
