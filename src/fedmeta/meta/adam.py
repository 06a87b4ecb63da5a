"""Adam over lists of tensors, with its state as plain tensors (so it can be carried and saved).

Reptile's inner optimiser is Adam with beta1 = 0 whose moments carry over from task to task
(supervised-reptile keeps one TensorFlow optimiser for the whole run); MAML's outer optimiser is a
standard Adam. Both use this module: the state is explicit, so a learner can carry it, reset it
for an evaluation episode, average it over parallel episodes, or checkpoint it with safetensors.

The update itself is PyTorch's own functional Adam with ``fused=True``: one kernel per tensor,
measured at about twice the speed of the ``foreach`` path on this model. The fused kernel walks
parameter and gradient memory in lockstep, so a gradient whose strides differ from its
parameter's (a channels-last convolution returns its weight gradient channels-last) would be
paired with the wrong elements, silently (pytorch/pytorch#106951 covers the family); gradients
are therefore laid out like their parameters first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adam import adam


@dataclass
class AdamState:
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    step: list[Tensor]  # one float scalar per tensor, as the fused kernel wants

    @classmethod
    def zeros(cls, params: Sequence[Tensor]) -> AdamState:
        return cls(
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            [torch.zeros((), device=p.device) for p in params],
        )

    def clone(self) -> AdamState:
        return AdamState([t.clone() for t in self.exp_avg], [t.clone() for t in self.exp_avg_sq], [t.clone() for t in self.step])

    def expand(self, n: int) -> AdamState:
        """The state repeated for ``n`` stacked copies of the parameters (batched episodes)."""
        rep = lambda ts: [t.unsqueeze(0).repeat(n, *([1] * t.dim())) for t in ts]  # noqa: E731
        return AdamState(rep(self.exp_avg), rep(self.exp_avg_sq), [t.clone() for t in self.step])

    @staticmethod
    def mean(states: Sequence[AdamState]) -> AdamState:
        """Element-wise mean of moments of states that took the same number of steps."""
        avg = lambda ts: torch.stack(ts).mean(0)  # noqa: E731
        first = states[0]
        return AdamState(
            [avg([s.exp_avg[i] for s in states]) for i in range(len(first.exp_avg))],
            [avg([s.exp_avg_sq[i] for s in states]) for i in range(len(first.exp_avg_sq))],
            [t.clone() for t in first.step],
        )

    def to_tensors(self, prefix: str, names: Sequence[str]) -> dict[str, Tensor]:
        """The state as named tensors (``names``: the parameters, in the order of the lists)."""
        out = {}
        for part, ts in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq), ("step", self.step)):
            out.update({f"{prefix}{part}.{name}": t for name, t in zip(names, ts, strict=True)})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, names: Sequence[str]) -> AdamState:
        part = lambda p: [tensors[f"{prefix}{p}.{name}"] for name in names]  # noqa: E731
        return cls(part("exp_avg"), part("exp_avg_sq"), part("step"))


def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: AdamState,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float = 1e-8,
) -> None:
    """One in-place Adam step on ``params`` (call under ``torch.no_grad()``)."""
    adam(
        list(params),
        [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for p, g in zip(params, grads)],
        state.exp_avg,
        state.exp_avg_sq,
        [],
        state.step,
        fused=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )
