"""SFL, the paper's split-learning baseline (SplitFed v2), run in-process with PyTorch.

The device holds head + tail (every weight trained, no prompts), the server the body, which is
trained on every batch; devices are served one after another within a round and the device
parts are averaged (FedAvg) at its end. Bytes per batch are the lengths of the real protocol
messages (SMASHED, BODY_OUT, GRAD_Z, GRAD_H) the exchange would send.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sfprompt.export.split_vit import Cut, Tail, select_tail_input, tail_input_for
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import BodyOut, GradH, GradZ, Smashed

from .baselines import (
    MOMENTUM,
    BaselineConfig,
    DeviceCost,
    DeviceData,
    Trained,
    batches,
    count_flops,
    run_blocks,
)


def split_batch_bytes(
    device_id: str,
    round: int,
    step: int,
    h: np.ndarray,
    z: np.ndarray,
    grad_z: np.ndarray,
    grad_h: np.ndarray,
) -> tuple[int, int]:
    """(up, down) bytes of one split-training batch: the codec's SMASHED + GRAD_Z up and
    BODY_OUT + GRAD_H down, the real messages the device and the server would exchange."""
    up = len(encode(Smashed(device_id=device_id, round=round, step=step, h=h)))
    up += len(encode(GradZ(device_id=device_id, round=round, step=step, grad_z=grad_z)))
    down = len(encode(BodyOut(device_id=device_id, round=round, step=step, z=z)))
    down += len(encode(GradH(device_id=device_id, round=round, step=step, grad_h=grad_h)))
    return up, down


class SflRun(Trained):
    """SFL (SplitFed v2): head + tail on the device (every weight trained, no prompts), the body
    on the server, trained on every batch; devices are served one after another in a round."""

    measured = {"bytes": True, "flops": True}  # run_baseline measures the memory

    def __init__(self, vit: VisionTransformer, cut: Cut, cfg: BaselineConfig):
        Cut(cut.head_blocks, cut.tail_blocks, 1).check(len(vit.blocks))  # Cut.check wants prompts
        self.vit = vit.eval()
        self.cut = Cut(cut.head_blocks, cut.tail_blocks, 0)
        self.tail_input = tail_input_for(vit, self.cut)
        self.tail = Tail(vit, self.cut, self.tail_input)
        self.body_blocks = vit.blocks[cut.head_blocks : len(vit.blocks) - cut.tail_blocks]
        server = {id(p) for p in self.body_blocks.parameters()}
        device = {n: p for n, p in vit.named_parameters() if id(p) not in server}
        super().__init__(device, cfg)
        self.server = list(self.body_blocks.parameters())
        for p in self.server:
            p.requires_grad_(True)
        self.server_opt = torch.optim.SGD(self.server, lr=cfg.lr, momentum=MOMENTUM)
        self.device_per_sample = self.server_per_sample = 0.0
        self.notes = [
            "bytes: codec sizes of SMASHED, BODY_OUT, GRAD_Z and GRAD_H per batch, plus the "
            f"safetensors size of head + tail ({self.size} B) each way per round",
            "FLOPs: FlopCounterMode on one batch of head, body and tail, scaled by samples",
        ]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.vit, self.cut.head_blocks, x)  # (B, T, D)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        z = self.body_blocks(h)  # (B, T, D)
        return select_tail_input(z, self.tail_input, self.vit.num_prefix_tokens)  # (B, R', D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count the device's and the server's FLOPs per sample on one batch."""
        device = list(self.trained.values())
        with torch.no_grad():
            h = self.head(x)
            z = self.body(h).requires_grad_(True)
        h.requires_grad_(True)
        head_flops = count_flops(lambda: self.head(x).sum().backward(), device)
        step = lambda: F.cross_entropy(self.tail(z), y).backward()  # noqa: E731
        tail_flops = count_flops(step, device)
        server_flops = count_flops(lambda: self.body(h).sum().backward(), self.server)
        self.device_per_sample = (head_flops + tail_flops) / len(y)
        self.server_per_sample = server_flops / len(y)

    def device_round(
        self,
        device_id: str,
        number: int,
        x: torch.Tensor,
        y: torch.Tensor,
        rng: np.random.Generator,
    ) -> tuple[float, int, int]:
        """One device's split training, batch by batch as over the wire: the mean loss and the
        activation bytes up and down. The server steps its body after every batch."""
        optimizer, losses, up, down = self.optimizer(), [], 0, 0
        self.vit.train()
        for step, idx in enumerate(
            i
            for _ in range(self.cfg.local_epochs)
            for i in batches(len(y), self.cfg.batch_size, rng)
        ):
            h = self.head(x[idx])  # device
            h_sent = h.detach().requires_grad_(True)
            z = self.body(h_sent)  # server
            z_sent = z.detach().requires_grad_(True)
            loss = F.cross_entropy(self.tail(z_sent), y[idx])  # device
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.server_opt.zero_grad(set_to_none=True)
            z.backward(z_sent.grad)  # server: body weights and dL/dh
            self.server_opt.step()
            h.backward(h_sent.grad)  # device: head weights
            optimizer.step()
            grad_z, grad_h = z_sent.grad, h_sent.grad
            assert grad_z is not None and grad_h is not None  # both were leaves that need grad
            arrays = (h_sent.detach(), z_sent.detach(), grad_z, grad_h)
            sizes = split_batch_bytes(device_id, number, step, *(a.numpy() for a in arrays))
            up, down = up + sizes[0], down + sizes[1]
            losses.append(loss.item())
        self.vit.eval()
        return float(np.mean(losses)), up, down

    def round(self, number: int, data: DeviceData, rng: np.random.Generator) -> list[DeviceCost]:
        updates, costs = [], []
        for index, (x, y) in data.items():
            self.load(self.params)
            loss, up, down = self.device_round(f"dev-{index}", number, x, y, rng)
            updates.append((self.state(), len(y)))
            samples = len(y) * self.cfg.local_epochs
            device, server = self.device_per_sample * samples, self.server_per_sample * samples
            costs.append(DeviceCost(loss, up + self.size, down + self.size, device, server))
        self.aggregate(updates)
        return costs
