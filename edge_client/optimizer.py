"""SGD with momentum and weight decay over named numpy arrays, as torch.optim.SGD does it.

g <- g + weight_decay * p;   v <- momentum * v + g (v = g at the first step);   p <- p - lr * v
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sgd:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    _velocity: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update `params` in place; a key in `grads` that `params` lacks is a bug (KeyError)."""
        for key, grad in grads.items():
            if self.weight_decay:
                grad = grad + self.weight_decay * params[key]
            if self.momentum:
                velocity = self._velocity.get(key)
                if velocity is None:
                    velocity = np.array(grad, dtype=np.float32)
                else:
                    velocity *= self.momentum
                    velocity += grad
                self._velocity[key] = velocity
                grad = velocity
            params[key] -= np.float32(self.lr) * grad
