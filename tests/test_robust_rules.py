"""The modern server defenses on crafted updates with hand-computed results: FLAME, FLTrust (and the
server's reference hook), Bulyan, Centered Clipping, DnC, the robust learning rate, FreqFed, and
the rules that read an update layer by layer (the server's shapes hook)."""

from __future__ import annotations

import dataclasses
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.fft
import torch

from fedmeta.config import ConfigError, load_config
from fedmeta.data.pool import ClassPool
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.fltrust import trust_weights
from fedmeta.federation.freqfed import layer_low_frequencies, low_frequencies
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.federation.subsets import local_models, majority_cluster
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.learner import build_learner
from fedmeta.models.build import build_model
from fedmeta.rng import stream, stream_seed
from fedmeta.scenario.backdoor import EvalPool, Scenario
from fedmeta.scenario.builder import Partition, Phase, benign_client, build_server, reference_client

GEN = torch.Generator
EQUAL7 = torch.full((7,), 1 / 7)


def call(name: str, updates: torch.Tensor, weights: torch.Tensor | None = None, options: dict | None = None, **kw):
    weights = torch.full((len(updates),), 1 / len(updates)) if weights is None else weights
    rule = make_rule(name, options)
    if getattr(rule, "sees_model", False):
        kw.setdefault("model", torch.zeros(updates.shape[1]))  # G = 0: the local models are the updates
    return rule(updates, weights, GEN().manual_seed(0), users=list(range(len(updates))), **kw)


# --- FLAME -----------------------------------------------------------------------------------

BENIGN = torch.tensor([[1.0, 0.1, 0, 0], [2, 0, 0.1, 0], [3, 0, 0, 0.1], [1, -0.1, 0, 0], [2, 0, -0.1, 0]])
PLANTED = torch.tensor([[0.0, 0, 5, 5], [0, 0, 5, 5.5]])  # a colluding pair, pointing elsewhere


def test_flame_excludes_the_planted_cluster_and_clips_to_the_median_norm():
    updates = torch.cat([BENIGN, PLANTED])
    # norms: 1.005, 2.0025, 3.0017, 1.005, 2.0025, 7.07, 7.43 -> median (4th of 7) = sqrt(4.01)
    median = math.sqrt(4.01)
    third = BENIGN[2] * median / math.sqrt(9.01)  # the only admitted update above the median, clipped to it
    expected = (BENIGN[0] + BENIGN[1] + third + BENIGN[3] + BENIGN[4]) / 5
    torch.testing.assert_close(call("flame", updates, options={"noise": 0.0}), expected)


def test_flame_and_freqfed_cluster_the_local_models_so_a_scaled_up_update_stands_out():
    """The paper's W_i = G + delta_i: far from the origin, cosines between models see how far each
    update moves G, where the updates' own cosines see only directions (a boosted copy of a benign
    direction, or its mirror, looks benign to them)."""
    global_model = torch.tensor([10.0, 0.0, 0.0, 0.0])
    benign = torch.tensor([[0.0, 1.0, 0.1, 0.0], [0.0, 1.0, 0.0, 0.1], [0.0, 1.0, -0.1, 0.0],
                           [0.0, 1.0, 0.0, -0.1], [0.0, 1.0, 0.05, 0.05]])
    boosted = torch.tensor([[0.0, 12.0, 1.2, 0.0], [0.0, 12.0, 0.0, 1.2]])  # two benign-looking directions x 12
    updates = torch.cat([benign, boosted])
    norms = updates.norm(dim=1)
    bound = norms.median()  # the 4th of 7: a benign norm
    clipped = updates * torch.clamp(bound / norms, max=1.0)[:, None]
    expected = {"flame": clipped[:5].mean(dim=0), "freqfed": benign.mean(dim=0)}  # the benign five alone
    for name, options in (("flame", {"noise": 0.0}), ("freqfed", {"low": 1.0})):
        torch.testing.assert_close(call(name, updates, options=options, model=global_model), expected[name])
        on_updates = call(name, updates, options={**options, "cluster": "updates"}, model=global_model)
        assert not torch.allclose(on_updates, expected[name]), name
    assert majority_cluster(local_models(updates, global_model, "flame").numpy()).tolist() == [True] * 5 + [False] * 2
    assert majority_cluster(updates.double().numpy())[5:].any()  # by direction alone a boosted update is in
    with pytest.raises(ValueError, match="flame clusters the local models"):
        make_rule("flame")(updates, torch.full((7,), 1 / 7), GEN())


def test_flame_noise_has_std_lambda_times_median_norm():
    d = 20000
    rows = torch.ones(3, d) * torch.tensor([[1.0], [2.0], [4.0]]) / math.sqrt(d)  # norms 1, 2, 4: median 2
    noisy = call("flame", rows, options={"noise": 0.05})
    plain = (rows[0] + rows[1] + rows[2] / 2) / 3  # the third clipped to norm 2, averaged
    assert abs(float((noisy - plain).std()) - 0.05 * 2) < 0.05 * 2 * 0.03


def test_a_rule_that_excludes_everything_logs_and_leaves_the_model_unchanged(caplog):
    with caplog.at_level(logging.WARNING):
        out = call("fltrust", torch.tensor([[-1.0, 0.0], [0.0, -2.0]]), reference=torch.tensor([1.0, 0.0]))
    assert torch.equal(out, torch.zeros(2)) and "fltrust" in caplog.text


# --- FreqFed ---------------------------------------------------------------------------------

def test_low_frequencies_are_scipy_dct_ii_orthonormal_first_half():
    rows = torch.randn(3, 9, generator=GEN().manual_seed(1))
    low = low_frequencies(rows, 0.5)
    assert low.shape == (3, 5)  # indices k <= floor(9 / 2)
    np.testing.assert_allclose(low.numpy(), scipy.fft.dct(rows.double().numpy(), type=2, norm="ortho", axis=1)[:, :5])
    torch.testing.assert_close(low_frequencies(rows, 1.0).norm(dim=1), rows.double().norm(dim=1))  # orthonormal


def test_freqfed_excludes_the_planted_cluster_and_keeps_updates_that_differ_in_high_frequencies():
    d, gen = 64, GEN().manual_seed(2)
    i = torch.arange(d) + 0.5
    smooth, other = torch.cos(math.pi * i / d), torch.cos(2 * math.pi * i / d)  # DCT frequencies 1 and 2
    high = torch.zeros(7, d)
    high[:, d // 2 + 1 :] = torch.randn(7, d - d // 2 - 1, generator=gen)  # beyond the kept low half
    noise = torch.from_numpy(scipy.fft.idct(high.double().numpy(), type=2, norm="ortho", axis=1)).float()
    benign = smooth * torch.tensor([[1.0], [1.5], [0.8], [1.2]]) + noise[:4]
    planted = other * torch.tensor([[1.0], [1.3], [0.9]]) + noise[4:]  # 3 of 7: a near-majority
    updates = torch.cat([benign[:2], planted[:1], benign[2:], planted[1:]])
    torch.testing.assert_close(call("freqfed", updates), benign.mean(dim=0))
    assert not torch.allclose(call("flame", updates, options={"noise": 0.0}), benign.mean(dim=0))  # noise misleads FLAME


def test_layer_low_frequencies_keep_each_layers_triangle_of_its_2d_dct():
    """Layers (2, 3), (4,) and (3, 2, 2), read as 2x3, 4x1 and 3x4 matrices: with low = 0.5 the
    triangles i + j <= 1, i <= 2 and i + j <= 1 keep 3 coefficients each, in row-major order."""
    shapes = [(2, 3), (4,), (3, 2, 2)]
    rows = torch.randn(2, 22, generator=GEN().manual_seed(3))
    blocks = [rows[:, :6].reshape(2, 2, 3), rows[:, 6:10].reshape(2, 4, 1), rows[:, 10:].reshape(2, 3, 4)]
    spectra = [scipy.fft.dctn(b.double().numpy(), type=2, norm="ortho", axes=(1, 2)) for b in blocks]
    expected = np.concatenate([spectra[0][:, [0, 0, 1], [0, 1, 0]], spectra[1][:, :3, 0],
                               spectra[2][:, [0, 0, 1], [0, 1, 0]]], axis=1)
    np.testing.assert_allclose(layer_low_frequencies(rows, shapes, 0.5).numpy(), expected)
    # one vector layer is the flat transform: its column's 2-D DCT is the 1-D one, i <= floor(d / 2)
    np.testing.assert_allclose(layer_low_frequencies(rows, [(22,)], 0.5).numpy(), low_frequencies(rows, 0.5).numpy())
    with pytest.raises(ValueError, match="do not add up"):
        layer_low_frequencies(rows, [(2, 3)], 0.5)


def test_freqfed_per_layer_needs_the_shapes_and_keeps_the_benign_cluster():
    d, gen = 64, GEN().manual_seed(4)
    benign = torch.randn(4, d, generator=gen) * 0.1 + 1.0
    planted = torch.randn(3, d, generator=gen) * 0.1 - torch.linspace(-2, 2, d)  # a different low-frequency shape
    updates = torch.cat([benign, planted])
    layers = {"transform": "layers"}
    torch.testing.assert_close(call("freqfed", updates, options=layers, shapes=[(8, 8)]), benign.mean(dim=0))
    with pytest.raises(ValueError, match="needs the layer shapes"):
        call("freqfed", updates, options=layers)


def test_majority_cluster_keeps_the_densest_majority():
    """HDBSCAN's single-cluster labelling: the benign update at 10 degrees joins last and is noise."""
    angles = torch.tensor([0.0, 1, 2, 3, 10, 90, 91]) * math.pi / 180
    kept = majority_cluster(torch.stack([angles.cos(), angles.sin()], dim=1).numpy())
    assert kept.tolist() == [True] * 4 + [False] * 3


# --- FLTrust ---------------------------------------------------------------------------------

ROOT = torch.tensor([2.0, 0.0])
THREE = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [1.0, 1.0]])


def test_fltrust_weights_and_rescaling_on_three_vectors():
    torch.testing.assert_close(trust_weights(THREE, ROOT), torch.tensor([0.6, 0.0, 1 / math.sqrt(2)]))
    # rescaled to ||root|| = 2: (1.2, 1.6), ignored, (sqrt 2, sqrt 2); trust-weighted mean
    expected = (0.6 * torch.tensor([1.2, 1.6]) + torch.tensor([1.0, 1.0])) / (0.6 + 1 / math.sqrt(2))
    torch.testing.assert_close(call("fltrust", THREE, reference=ROOT), expected)


def test_fltrust_without_a_reference_is_refused():
    with pytest.raises(ValueError, match="reference"):
        call("fltrust", THREE)


class Fixed:
    """A client that always sends ``delta`` and records the weights it was given."""

    def __init__(self, user: int, delta: list[float]) -> None:
        self.user, self.delta, self.seen = user, torch.tensor(delta), []

    def update(self, params, settings):
        self.seen.append((params["w"].clone(), settings))
        return ClientUpdate(self.user, {"w": self.delta}, 1)


def test_fltrust_server_hook_runs_through_server_round():
    clients = {u: Fixed(u, row.tolist()) for u, row in enumerate(THREE)}
    reference = Fixed(-1, ROOT.tolist())
    server = Server(clients, Schedule(users=3, per_round=3, seed=0), make_rule("fltrust"), 3, reference=reference)
    params, report = server.round({"w": torch.ones(2)}, RoundSettings(2))
    expected = (0.6 * torch.tensor([1.2, 1.6]) + torch.tensor([1.0, 1.0])) / (0.6 + 1 / math.sqrt(2))
    torch.testing.assert_close(params["w"], 1 + expected)
    assert report.aggregated == [0, 1, 2]
    (weights, settings), = reference.seen
    assert torch.equal(weights, torch.ones(2)) and settings.round == 2  # the same global weights and round


def test_the_server_hands_flame_the_global_model():
    """FLAME through ``Server.round`` clusters G + delta_i: a round with G = 0 and one with G far
    away admit different updates (one sent in the benign direction, scaled up)."""
    rows = [[1.0, 0.1], [1.0, -0.1], [1.0, 0.0], [8.0, 0.0]]
    clients = {u: Fixed(u, row) for u, row in enumerate(rows)}
    server = Server(clients, Schedule(users=4, per_round=4, seed=0), make_rule("flame", {"noise": 0.0}), 4)
    near, _ = server.round({"w": torch.zeros(2)}, RoundSettings(1))
    far, _ = server.round({"w": torch.tensor([0.0, 50.0])}, RoundSettings(1))
    # norms 1.005, 1.005, 1, 8: median 1.005. At G = 0 all four point the same way (the fourth clipped
    # to 1.005); at G = (0, 50) the fourth moves its model 8 units across: it is left out.
    torch.testing.assert_close(near["w"], torch.tensor([(3 + 1.0049876) / 4, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(far["w"] - torch.tensor([0.0, 50.0]), torch.tensor([1.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_flower_engine_keeps_the_reference_client():
    from fedmeta.engines.flower.apps import FlowerEngine, FlowerServer

    server = Server({}, Schedule(3, 3, 0), make_rule("fltrust"), 3, reference=Fixed(-1, [1.0]))
    cfg = SimpleNamespace(rule_options=lambda name: {}, federation=SimpleNamespace(secure_aggregation=False))
    served = FlowerEngine(nodes=None).serve(server, cfg, Phase(), "fltrust")
    assert isinstance(served, FlowerServer) and served.reference is server.reference


# --- the server's root set (build_server) ----------------------------------------------------

def partition(classes: int = 24, per_class: int = 20) -> Partition:
    images = torch.randint(0, 256, (classes, per_class, 28, 28, 1), dtype=torch.uint8, generator=GEN().manual_seed(3))
    pool = ClassPool.from_class_major(images, [f"c{i}" for i in range(classes)])
    return Partition([pool.classes(range(6 * u, 6 * u + 6)) for u in range(4)], pool.classes(range(5)))


FLTRUST = ["federation.rule=fltrust", "model.filters=4", "meta.meta_batch=1", "federation.episodes=1"]


def test_build_server_gives_fltrust_a_reference_client_on_a_root_set():
    cfg = load_config("omniglot-rmaml-federated-quick", [*FLTRUST, "rules.fltrust.root_examples=16",
                                                         "rules.fltrust.root_classes=7"])
    population = partition()
    server = build_server(cfg, Phase(), population)
    ref = server.reference
    assert isinstance(ref, MetaClient) and ref.user == -1 and ref.examples == 7 * 16
    assert ref.seed == stream_seed(cfg.seed, "reference") and ref.steps == server.clients[3].steps
    episodes = ref.sample(stream(0, "test"))
    own = torch.cat([p.index[:, :20].flatten() for p in population.users])
    assert bool(torch.isin(episodes.rows, own).all())  # only rows of the benign users' classes
    assert len(episodes.rows.unique()) <= 7 * 16
    assert build_server(cfg, Phase(), population).reference.sample(stream(0, "test")).rows.equal(episodes.rows)
    assert not any(server.clients[u].seed == ref.seed for u in server.clients)  # its own stream
    assert build_server(cfg, Phase(), population, rule="fedavg").reference is None


def test_the_backdoor_root_set_is_benign_training_data_and_its_client_trains():
    """In the backdoor layout the root set comes from ``everyone``'s meta-training classes, below the
    held-out split, never the target class; the reference client trains like a benign user."""
    cfg = load_config("omniglot-exp1a-quick", ["federation.rule=fltrust", "model.filters=4", "meta.meta_batch=1",
                                               "federation.episodes=1", "meta.inner_steps=1"])
    images = torch.randint(0, 256, (13, 20, 28, 28, 1), dtype=torch.uint8, generator=GEN().manual_seed(4))
    pool = ClassPool.from_class_major(images, [f"c{i}" for i in range(13)])  # 12 benign classes + the target
    split = torch.tensor([15] * 12 + [10])
    everyone = EvalPool(pool, split, 12, torch.empty(0, dtype=torch.long))
    empty = torch.empty(0, dtype=torch.long)
    layout = {"users": [pool.classes(range(6)), pool.classes(range(6, 12))], "attackers": (0,), "everyone": everyone,
              "test": pool, "case": "a", "evaluation": [], "trigger": None}
    scenario = Scenario(**{f.name: layout.get(f.name, empty) for f in dataclasses.fields(Scenario)})
    learner = build_learner(cfg, (28, 28, 1))
    clients = {1: benign_client(cfg, 1, learner, scenario.users[1], 1)}
    ref = reference_client(cfg, scenario, clients, "fltrust", cfg.rule_options("fltrust"))
    rows = ref.sample(stream(0, "test")).rows
    allowed = pool.index[:12, :15].flatten()
    assert bool(torch.isin(rows, allowed).all()) and ref.examples == 100
    params = build_model(cfg.model, (28, 28, 1), cfg.meta.ways).init(GEN().manual_seed(0))
    update = ref.update(params, RoundSettings(1))
    assert update.is_finite() and update.user == -1
    again = ref.update(params, RoundSettings(1))
    assert all(torch.equal(update.delta[k], again.delta[k]) for k in params)  # seeded: the same each time


@pytest.mark.parametrize(("settings", "key"), [
    ([], "rules.fltrust: a root set of 10 classes x 10 examples"),  # 1 shot + 15 queries need 16 examples
    (["rules.fltrust.root_examples=16", "rules.fltrust.root_classes=25"], "rules.fltrust.root_classes: 25"),
    (["rules.fltrust.root_examples=21"], "rules.fltrust.root_examples: 21"),
])
def test_a_root_set_that_cannot_work_is_refused_naming_the_key(settings, key):
    cfg = load_config("omniglot-rmaml-federated-quick", [*FLTRUST, *settings])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_server(cfg, Phase(), partition())


# --- Bulyan ----------------------------------------------------------------------------------

def test_bulyan_by_hand():
    # n = 7, f = 1: theta = 5 picks by repeated Krum. Scores (4 nearest): 0:126 1:95 3:63 4:62 10:266,
    # the outliers far more -> 4; then (3 nearest) 3:62 -> 3; (2) 1:82 -> 1; (1) 0 and 10 tie at 100 -> 0
    # (lower id); (1) 10 and 100 tie at 8100 -> 10. Selection {0, 1, 3, 4, 10}: median 3; the
    # beta = 3 closest to it are 3, 4, 1 -> 8 / 3.
    values = torch.tensor([[0.0], [1], [3], [4], [10], [100], [-100]])
    torch.testing.assert_close(call("bulyan", values, EQUAL7), torch.tensor([8 / 3]))
    two = torch.cat([values, values * torch.tensor([[1, 1, 1, 1, 1, -1, -1]]).T], dim=1)  # per-coordinate trims
    torch.testing.assert_close(call("bulyan", two, EQUAL7), torch.tensor([8 / 3, 8 / 3]))


def test_bulyan_refuses_fewer_than_4f_plus_3_updates():
    with pytest.raises(ValueError, match=r"rules\.bulyan\.byzantine = 1 needs at least 4f \+ 3 = 7 updates"):
        call("bulyan", torch.zeros(6, 2))
    assert call("bulyan", torch.ones(3, 2), options={"byzantine": 0}).tolist() == [1.0, 1.0]


# --- Centered Clipping -----------------------------------------------------------------------

def test_centered_clipping_by_hand_and_its_center_survives_a_checkpoint():
    rule = make_rule("centered-clipping", {"tau": 1.0, "iterations": 2})
    updates = torch.tensor([[0.5, 0.0], [0.0, 0.5], [4.0, 0.0]])
    w = torch.full((3,), 1 / 3)
    # from v = 0: offsets (0.5,0), (0,0.5), (4,0) -> the last clipped to (1,0): v1 = (1.5, 0.5) / 3 = (0.5, 1/6);
    # then offsets (0,-1/6), (-0.5,1/3), (3.5,-1/6) (norm > 1, scaled by 1/sqrt(3.5^2 + 1/36))
    v1 = torch.tensor([0.5, 1 / 6])
    last = torch.tensor([3.5, -1 / 6])
    v2 = v1 + (torch.tensor([0.0, -1 / 6]) + torch.tensor([-0.5, 1 / 3]) + last / last.norm()) / 3
    torch.testing.assert_close(rule(updates, w, GEN()), v2)
    state = rule.state_dict()
    torch.testing.assert_close(state["center"], v2)
    resumed = make_rule("centered-clipping", {"tau": 1.0, "iterations": 2})
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    torch.testing.assert_close(resumed(updates, w, GEN()), rule(updates, w, GEN()))  # same next round
    assert make_rule("centered-clipping").state_dict() == {}


def test_centered_clipping_state_goes_through_the_server_snapshot():
    clients = {u: Fixed(u, [float(u), 0.0]) for u in range(3)}
    server = Server(clients, Schedule(3, 3, 0), make_rule("centered-clipping", {"tau": 0.5}), 3)
    params, _ = server.round({"w": torch.zeros(2)}, RoundSettings(1))
    again = Server(clients, Schedule(3, 3, 0), make_rule("centered-clipping", {"tau": 0.5}), 3)
    restored = again.restore(server.snapshot(params), params)
    torch.testing.assert_close(again.round(restored, RoundSettings(2))[0]["w"], server.round(params, RoundSettings(2))[0]["w"])


# --- DnC -------------------------------------------------------------------------------------

def test_dnc_drops_the_largest_projections_on_the_top_singular_vector():
    # mean (1, 2); centred (-1,-2) (1,-2) (0,-1) (0,-3) (0,8): C^T C = diag(2, 82), so v = (0, 1) and the
    # scores are 4, 4, 1, 9, 64. f = 1 drops the planted (1, 10); f = 2 also drops (1, -1).
    updates = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [1.0, 10.0]])
    torch.testing.assert_close(call("dnc", updates), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(call("dnc", updates, options={"byzantine": 2}), torch.tensor([1.0, 1 / 3]))
    with pytest.raises(ValueError, match=r"rules\.dnc"):
        call("dnc", updates, options={"byzantine": 5})


# --- robust learning rate --------------------------------------------------------------------

def test_rlr_flips_the_coordinates_without_enough_sign_agreement():
    updates = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 2.0, 1.0]])
    # |sum of signs| = 3, 1, 1; threshold 2 -> rates +1, -1, -1; mean (1, 2/3, -1/3)
    torch.testing.assert_close(call("rlr", updates, options={"threshold": 2}), torch.tensor([1.0, -2 / 3, 1 / 3]))
    with pytest.raises(ValueError, match=r"rules\.rlr\.threshold = 4 exceeds the 3 updates"):
        call("rlr", updates)


# --- the layer shapes: FoolsGold on the output layer --------------------------------------

class Sends:
    """A client that always sends the same update of several parameters."""

    def __init__(self, user: int, delta: dict[str, list]) -> None:
        self.user, self.delta = user, {k: torch.tensor(v) for k, v in delta.items()}

    def update(self, params, settings):
        return ClientUpdate(self.user, self.delta, 1)


def test_the_server_hands_the_layer_shapes_to_foolsgold_on_the_output_layer():
    """Users 0 and 1 send the same output-layer weights and different trunks (whole updates at
    cosine 0.35), users 2 and 3 orthogonal ones. On whole updates every FoolsGold weight logits
    to 1 (a plain mean); on the output layer (``head.weight``: the last matrix, the bias left
    out) the pair are sybils at cosine 1 and weigh 0, the other two keep their quarter each."""
    head = [[1.0, 1.0], [0.0, 0.0]]
    sent = [{"trunk": [1.0, 0, 0], "head.weight": head, "head.bias": [0.0, 0]},
            {"trunk": [0.0, 0, 3], "head.weight": head, "head.bias": [0.0, 0]},
            {"trunk": [0.0, 1, 0], "head.weight": [[0.0, 0], [1, 0]], "head.bias": [0.0, 0]},
            {"trunk": [0.0, 0, 0], "head.weight": [[0.0, 0], [0, 1]], "head.bias": [1.0, 0]}]
    params = {"trunk": torch.zeros(3), "head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}
    for features, kept in (("all", [0, 1, 2, 3]), ("head", [2, 3])):
        rule = make_rule("foolsgold", {"features": features})
        server = Server({u: Sends(u, d) for u, d in enumerate(sent)}, Schedule(4, 4, 0), rule, 4)
        new, _ = server.round(params, RoundSettings(1))
        for k in params:
            torch.testing.assert_close(new[k], torch.stack([torch.tensor(sent[u][k]) for u in kept]).sum(0) / 4)
    assert rule.history[0].shape == (4,)  # a history of the output layer's weights only
    with pytest.raises(ValueError, match="needs the layer shapes"):
        rule(torch.zeros(2, 9), torch.full((2,), 0.5), GEN(), users=[0, 1])


# --- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "options", "key"), [
    ("flame", {"noise": -1}, "flame.noise"), ("bulyan", {"byzantine": -1}, "bulyan.byzantine"),
    ("centered-clipping", {"tau": 0}, "centered-clipping.tau"), ("dnc", {"filter": 0}, "dnc.filter"),
    ("rlr", {"threshold": 0}, "rlr.threshold"), ("freqfed", {"low": 1.5}, "freqfed.low"),
    ("fltrust", {"root_classes": 0}, "fltrust.root_classes"), ("dnc", {"niters": 3}, "dnc.niters"),
    ("freqfed", {"transform": "'2d'"}, "freqfed.transform"), ("foolsgold", {"features": "'tail'"}, "foolsgold.features"),
])
def test_bad_options_are_refused_naming_the_key(rule, options, key):
    with pytest.raises(ValueError, match=f"rules: {key}".replace(".", r"\.")):
        load_config("omniglot-exp1a-quick", [f"rules.{rule}.{k}={v}" for k, v in options.items()])


def test_new_rules_need_every_update_and_are_listed():
    from fedmeta.registry import RULES

    new = ["flame", "fltrust", "bulyan", "centered-clipping", "dnc", "rlr", "freqfed"]
    assert set(new) <= set(RULES.names())
    assert all(RULES.get(n).info.get("individual", True) for n in new)
    with pytest.raises(ValueError, match="federation.rule = 'flame' needs every update"):
        load_config("omniglot-exp1a-quick", ["federation.rule=flame", "federation.secure_aggregation=true"])


def test_effective_weights_read_what_a_rule_let_through():
    from fedmeta.federation.updates import effective_weights

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 500, generator=gen, dtype=torch.float64).float()
    rows[3] *= 40  # one boosted update, norm about 40x the others
    updates = [ClientUpdate(u, {"w": rows[u]}, 1) for u in range(4)]
    equal = torch.full((4,), 0.25)
    fedavg = effective_weights(updates, make_rule("fedavg")(rows, equal, gen))
    assert [fedavg[u] for u in range(4)] == pytest.approx([0.25] * 4, abs=1e-6)
    krum = effective_weights(updates, make_rule("krum", {"byzantine": 1})(rows, equal, gen))
    assert sorted(round(w, 6) for w in krum.values()) == [0, 0, 0, 1]  # one update chosen whole
    norms = rows.norm(dim=1)
    clipped = effective_weights(updates, make_rule("clip", {"norm": 1.0})(rows, equal, gen))
    assert [clipped[u] for u in range(4)] == pytest.approx((0.25 / norms.clamp(min=1.0)).tolist(), rel=1e-5)
