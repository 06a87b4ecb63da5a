"""FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020): down-weight users whose update histories look alike.

Sybils that pursue one goal send similar updates round after round; honest users with their own
data do not. FoolsGold keeps, per user id, the sum of every update that user has sent (its
history), and weights this round's participants by how unlike the others their histories are.
The weights follow the authors' reference code (DistributedML/FoolsGold, ``foolsgold()``, with
confidence kappa = 1):

1. ``cs[i, j]``: cosine similarity of the histories of participants i and j (0 on the diagonal);
   ``v[i] = max_j cs[i, j]``;
2. pardoning: ``cs[i, j] *= v[i] / v[j]`` where ``v[i] < v[j]`` (an honest user that happens to
   resemble a sybil is not punished as much as the sybil);
3. ``w[i] = 1 - max_j cs[i, j]``, clipped to [0, 1], divided by its maximum, 1 replaced by 0.99;
4. logit: ``w = ln(w / (1 - w)) + 0.5``, clipped to [0, 1].

The update applied is ``sum_i w_i alpha_i delta_i``, not renormalised: the paper's Algorithm 1
(``sum_i alpha_i Delta_i`` with its weights alpha) and the reference's ``aggregate_gradients``
(``sum_c wv[c] grad_c / n``, a step a learning rate then scales, as the server applies a model
delta). With every weight 1 it is FedAvg; sybils at weight 0 take their share of the step with them,
and a round whose users all look alike takes a short step, FoolsGold's damping. (Until 2026-12-07
fedmeta divided by ``sum_i w_i alpha_i``, a full-length step whatever the weights; revision 2 of
the rule.) If every weight is 0 the model is left unchanged.

What a history holds (``features``): by default the whole update; ``"head"`` keeps only the
output layer's weight matrix (the last parameter of two or more dimensions, bias excluded), as the
authors' deep-learning code compares ``client_grads[i][-2]``, the final linear layer's weight. In
few-shot meta-learning the head's rows are episode slots, not classes, so what the output layer
says about a user's goal is weaker than in the paper's classifiers; both are offered, and the
threat matrix measured ``"all"``.

The histories are the rule's state: checkpointed with the run and restored on resume. The rule
needs every update on its own, so it cannot run under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.federation.updates import layer_slices
from fedmeta.registry import RULES


class FoolsGoldOptions(Options):
    features: Literal["all", "head"] = "all"
    """What a user's history sums: its whole updates, or the output layer's weights only (the authors' code)."""


def head_slice(shapes: Sequence[tuple[int, ...]]) -> slice:
    """The coordinates of the output layer's weight in an update flattened in ``shapes``' order:
    the last parameter with two or more dimensions."""
    matrices = [part for shape, part in zip(shapes, layer_slices(shapes), strict=True) if len(shape) >= 2]
    if not matrices:
        raise ValueError(f"no weight matrix among the layer shapes {list(shapes)}")
    return matrices[-1]


def foolsgold_weights(histories: Tensor) -> Tensor:
    """The weights ``[n]`` of FoolsGold for the participants' histories ``[n, d]``."""
    n = len(histories)
    unit = histories / histories.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cs = unit @ unit.T - torch.eye(n, dtype=histories.dtype, device=histories.device)
    v = cs.max(dim=1).values
    pardon = v[:, None] < v[None, :]
    cs = torch.where(pardon, cs * v[:, None] / v[None, :], cs)
    w = (1 - cs.max(dim=1).values).clamp(0, 1)
    if float(w.max()) == 0.0:
        return w
    w = w / w.max()
    w = torch.where(w == 1, torch.full_like(w, 0.99), w)
    w = torch.log(w / (1 - w)) + 0.5
    # The reference's ``wv[(np.isinf(wv) + wv > 1)] = 1`` parses as ``(isinf + wv) > 1``: +inf and
    # values above 1 become 1, while -inf (log 0: an exact sybil) stays and is clipped to 0 below.
    return torch.where(w > 1, torch.ones_like(w), w).clamp_min(0)


@RULES.register("foolsgold", options=FoolsGoldOptions, revision=2)  # 2: the step is no longer renormalised
class FoolsGold:
    """FoolsGold (Fung et al., 2020): per-user update histories; sybils that look alike get weight 0."""

    sees_shapes: ClassVar[bool] = True

    def __init__(self, features: str = "all") -> None:
        self.features = features
        self.history: dict[int, Tensor] = {}

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None,
                 shapes: Sequence[tuple[int, ...]] | None = None) -> Tensor:
        if users is None:
            raise ValueError("FoolsGold needs the user id of every update")
        if self.features == "head" and shapes is None:
            raise ValueError("foolsgold with features = 'head' needs the layer shapes: call it with shapes= "
                             "(fedmeta's server passes them)")
        seen = head_slice(shapes) if self.features == "head" else slice(None)
        for user, row in zip(users, updates[:, seen], strict=True):
            self.history[user] = self.history[user] + row if user in self.history else row.clone()
        if len(users) == 1:
            return updates[0]
        return (foolsgold_weights(torch.stack([self.history[u] for u in users])) * weights) @ updates

    def state_dict(self) -> dict[str, Tensor]:
        return {f"history.{user}": h for user, h in self.history.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history = {int(k.removeprefix("history.")): v for k, v in state.items() if k.startswith("history.")}
