"""Secure aggregation with SecAgg+ (Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod``).

Under ``federation.secure_aggregation = true`` the server learns only the mean of the round's
updates: each node masks its quantized delta, and the workflow unmasks the sum. So only FedAvg
with equal weights can run (the config refuses other rules; ``flower_engine`` refuses size
weights), and nothing per client is screened. The global model differs from plain FedAvg by the
quantization error only: every coordinate of ``delta_i`` is clipped to ``±CLIPPING_RANGE`` and
quantized to ``QUANTIZATION_RANGE`` levels, an error below ``2 * CLIPPING_RANGE / QUANTIZATION_RANGE``
per coordinate (about 1.9e-6). A node whose delta would be clipped answers with an error instead
of silently sending a different update, and is left out of the round like a node that drops out.

Dropouts: the workflow waits up to the round's reply timeout at each of its four stages and goes
on without the nodes that did not answer or answered with an error; their masks are removed with
the other nodes' shares, so the mean is over the users that stayed (``FlowerServer`` reports the
others as missing and fails the round below ``min_updates``). SecAgg+ cannot go on when too few
nodes stay to reconstruct the dropped ones' masks (half of the round's nodes here, and at least
2: the ``reconstruction_threshold``): the round then fails with ``SecureAggregationError``. Nor can it
take a node's update back out of the sum once unmasked: a node that answers for another user than
its own fails the round instead of being left out.

SecAgg+ exists in flwr 1.42 for the legacy Strategy/FitIns API only, so one round here is one run
of the workflow with a legacy strategy that hands it our round's users (seeded schedule) and
takes back the unmasked mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmeta.federation.updates import ClientUpdate
from fedmeta.models.conv4 import Params

log = logging.getLogger(__name__)

CLIPPING_RANGE = 16.0
"""Largest |coordinate| of a delta (the attacker's boosted one included) that SecAgg+ carries."""

QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32
"""Sums of up to MODULUS_RANGE / QUANTIZATION_RANGE = 256 clients do not overflow."""


class SecureAggregationError(RuntimeError):
    """SecAgg+ did not produce the round's mean."""


class _Scheduled(LegacyFedAvg):
    """The legacy strategy the workflow drives: our round's fit instructions; the unmasked mean back."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]], user_of: Mapping[int, int]) -> None:
        super().__init__(fraction_evaluate=0.0)
        self.instructions, self.user_of = instructions, user_of
        self.losses: dict[int, float] | None = None  # None until the workflow unmasked the sum

    def configure_fit(self, server_round: int, parameters: Any, client_manager: ClientManager) -> list:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        for failure in failures:
            log.warning("SecAgg+: a node is left out of the round: %.300s", failure)
        losses = {}
        for proxy, res in results:
            user = self.user_of[proxy.node_id]
            if int(res.metrics["user-id"]) != user:
                raise SecureAggregationError(f"node {proxy.node_id} sent user {res.metrics['user-id']}'s update for "
                                             f"user {user}; it is in the unmasked sum, which cannot be undone")
            losses[user] = float(res.metrics["loss"])
        self.losses = losses
        return results[0][1].parameters, {}  # the workflow put the unmasked mean in every result


def secure_mean(grid: Grid, context: Context, instructions: dict[int, tuple[int, dict[str, Any]]],
                params: Params, timeout: float) -> tuple[Params, dict[int, float]]:
    """The mean delta of the users in ``instructions`` (user -> (node id, round spec)) that stayed to
    the end, and their losses; each stage waits up to ``timeout`` seconds for the nodes."""
    names = list(params)
    weights = ndarrays_to_parameters([params[k].detach().cpu().numpy() for k in names])
    extra = {"names": "\n".join(names), "clip": CLIPPING_RANGE}  # legacy FitIns configs carry scalars only
    strategy = _Scheduled([
        (GridClientProxy(node, grid, context.run_id), FitIns(weights, {**spec, **extra}))
        for node, spec in instructions.values()
    ], {node: user for user, (node, _) in instructions.items()})
    legacy = LegacyContext(Context(context.run_id, context.node_id, {}, RecordDict(), {}), ServerConfig(1), strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(weights, keep_input=True)
    SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0, clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout,
    )(grid, legacy)
    if not strategy.losses:
        raise SecureAggregationError("SecAgg+ halted before unmasking the sum: too few nodes answered "
                                     "(see the ServerApp's log)")
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                  keep_input=True))
    device = next(iter(params.values())).device
    delta = {k: torch.from_numpy(a).to(device, params[k].dtype).view_as(params[k]) for k, a in zip(names, mean, strict=True)}
    return delta, strategy.losses


def secure_reply(msg: Message, update: Callable[[Mapping[str, Any], Params], ClientUpdate]) -> Message:
    """The client side of the masked stage: run the round, hand the delta to ``secaggplus_mod``."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    spec = fitins.config
    names = str(spec["names"]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    result = update(spec, {k: torch.from_numpy(np.array(a)) for k, a in zip(names, arrays, strict=True)})
    delta = [result.delta[k].detach().cpu().numpy() for k in names]
    if not all(np.isfinite(d).all() for d in delta):  # quantised, NaN would enter the sum as a large integer
        raise SecureAggregationError(f"user {result.user}: a non-finite update (the training diverged); it is not "
                                     "sent into the secure sum")
    largest = max(float(np.abs(d).max()) for d in delta)
    if largest > float(spec["clip"]):
        raise SecureAggregationError(f"user {result.user}: an update coordinate of {largest:.3g} exceeds the SecAgg+ "
                                     f"clipping range {spec['clip']}")
    # The mod quantizes with numpy's global generator: seed it so runs repeat exactly.
    np.random.seed(int(result.user) * 1_000_003 + int(spec["round"]))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), 1,
                    {"user-id": result.user, "loss": result.metrics["loss"]})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
