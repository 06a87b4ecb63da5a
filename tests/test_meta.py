"""Meta-learners: exactness of the fast paths, correctness of the meta-gradient, real learning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import brief_fomaml

from fedmeta.config import EvalConfig, MetaConfig
from fedmeta.data.episodes import gather
from fedmeta.meta.adam import AdamState
from fedmeta.meta.evaluation import meta_test, predict
from fedmeta.meta.learner import Reptile
from fedmeta.meta.maml import task_meta_gradient
from fedmeta.meta.reptile import reptile_step, reptile_step_batched, reptile_step_users
from fedmeta.models.conv4 import Conv4, channels_last


def _episode_batch(omniglot, episodes=3, steps=4, batch=10, seed=0):
    pool = omniglot.pool(torch.arange(40), rotations=False)
    gen = torch.Generator().manual_seed(seed)
    learner = Reptile(Conv4(1, 28, 5, 8), MetaConfig(meta_batch=episodes, inner_steps=steps, inner_batch=batch))
    eps = learner.sample(pool, gen)
    from fedmeta.data.episodes import minibatch_order

    order = minibatch_order(eps.support.shape[1], steps, batch, episodes, gen)
    rows = eps.support.gather(1, order.flatten(1)).view_as(order)
    return gather(pool.images, rows), eps.support_labels()[order]


def test_batched_reptile_equals_plain_loop(omniglot, tiny):
    x, y = _episode_batch(omniglot)
    params = tiny.init(torch.Generator().manual_seed(1))
    adam = AdamState.zeros(list(params.values()))
    # warm the moments so the carried state matters
    params, adam, _ = reptile_step(tiny, params, adam, x, y, lr=1e-3, beta2=0.999, epsilon=0.5, carry="parallel")
    kwargs = dict(lr=1e-3, beta2=0.999, epsilon=0.5)
    loop_p, loop_s, loop_loss = reptile_step(tiny, params, adam.clone(), x, y, carry="parallel", **kwargs)
    vmap_p, vmap_s, vmap_loss = reptile_step_batched(tiny, params, adam.clone(), x, y, **kwargs)
    for k in params:
        assert torch.allclose(loop_p[k], vmap_p[k], atol=1e-5, rtol=0), k
        assert not torch.equal(loop_p[k], params[k]), k  # every parameter actually moved
    for a, b in zip(loop_s.exp_avg_sq, vmap_s.exp_avg_sq):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-12)
    assert torch.allclose(loop_loss, vmap_loss, atol=1e-5)


def test_sequential_carry_passes_moments_between_episodes(omniglot, tiny):
    x, y = _episode_batch(omniglot)
    params = tiny.init(torch.Generator().manual_seed(1))
    adam = AdamState.zeros(list(params.values()))
    _, seq, _ = reptile_step(tiny, params, adam.clone(), x, y, lr=1e-3, beta2=0.999, epsilon=1.0, carry="sequential")
    _, par, _ = reptile_step(tiny, params, adam.clone(), x, y, lr=1e-3, beta2=0.999, epsilon=1.0, carry="parallel")
    assert float(seq.step[0]) == 3 * 4 and float(par.step[0]) == 4


def test_reptile_with_one_episode_and_epsilon_one_is_plain_adam(omniglot, tiny):
    # In float64: BatchNorm makes some gradient coordinates zero up to round-off, and Adam (which
    # divides by |g| + eps) would turn float32 round-off there into steps that depend on how the
    # convolution sums are ordered (e.g. on the thread count). In float64 that round-off is far below eps.
    x, y = _episode_batch(omniglot, episodes=1, steps=3)
    x = x.double()
    params = {k: v.double() for k, v in tiny.init(torch.Generator().manual_seed(2)).items()}
    new, _, _ = reptile_step(tiny, params, AdamState.zeros(list(params.values())), x, y, lr=1e-3, beta2=0.999, epsilon=1.0)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(ref.values(), lr=1e-3, betas=(0.0, 0.999))
    for s in range(3):
        opt.zero_grad()
        F.cross_entropy(tiny(ref, x[0, s]), y[0, s]).backward()
        opt.step()
    for k in params:
        assert torch.allclose(new[k], ref[k], atol=1e-9, rtol=0), k


def test_maml_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, image_size=16, ways=2, filters=2)
    params = {k: v.double() for k, v in model.init(torch.Generator().manual_seed(0)).items()}
    sx, qx = torch.rand(4, 1, 16, 16, dtype=torch.double), torch.rand(4, 1, 16, 16, dtype=torch.double)
    sy, qy = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])
    kwargs = dict(steps=2, lr=0.4)
    grads = task_meta_gradient(model, params, (sx, sy), (qx, qy), **kwargs)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def loss_at(t: float) -> float:
        from fedmeta.meta.maml import task_meta_loss

        shifted = {k: (v + t * direction[k]).requires_grad_() for k, v in params.items()}
        return float(task_meta_loss(model, shifted, (sx, sy), (qx, qy), first_order=False, **kwargs).detach())

    h = 1e-6  # central differences in float64; larger steps cross ReLU/max-pool kinks
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)
    assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(numeric))
    first = task_meta_gradient(model, params, (sx, sy), (qx, qy), first_order=True, **kwargs)
    assert any(not torch.allclose(first[k], grads[k]) for k in params)  # second order is not first order


def test_non_transductive_prediction_sees_one_query_at_a_time(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    support, queries = torch.rand(10, 1, 28, 28), torch.rand(4, 1, 28, 28)
    batched = predict(tiny, params, support, queries, transductive=False)
    one_by_one = torch.stack([tiny(params, torch.cat([support, q[None]]))[-1].argmax() for q in queries])
    assert torch.equal(batched, one_by_one)


def test_short_reptile_run_beats_chance(omniglot):
    """100 Reptile steps on real Omniglot: far above the 20% of guessing."""
    train = omniglot.pool(torch.arange(0, 600), rotations=True)
    test = omniglot.pool(torch.arange(1200, 1623), rotations=False)
    model = Conv4(1, 28, 5, filters=32)
    learner = Reptile(model, MetaConfig(shots=10, inner_steps=5, meta_lr=1.0, meta_lr_final=0.0))
    gen = torch.Generator().manual_seed(0)
    params = model.init(gen)
    state = learner.init_state(params)
    for it in range(100):
        params, state, _ = learner.train_step(params, state, learner.sample(train, gen), train.images, gen, it / 100)
    acc = meta_test(learner, params, test, EvalConfig(steps=20), shots=5, episodes=40, lr=1e-3, gen=gen)
    assert acc.mean > 0.6, acc


def test_short_maml_run_beats_chance(omniglot):
    gen = torch.Generator().manual_seed(0)
    learner, params, test = brief_fomaml(omniglot, 150, gen)
    acc = meta_test(learner, params, test, EvalConfig(steps=3, transductive=True), shots=1, episodes=40, lr=0.4, gen=gen)
    assert acc.mean > 0.5, acc


def test_adam_step_handles_gradients_laid_out_unlike_their_parameters():
    from fedmeta.meta.adam import adam_step_

    param, grad = torch.randn(8, 8, 3, 3), torch.randn(8, 8, 3, 3)
    results = []
    for g in (grad, grad.contiguous(memory_format=torch.channels_last)):
        p = param.clone()
        adam_step_([p], [g], AdamState.zeros([p]), lr=1e-3, beta1=0.0, beta2=0.999)
        results.append(p)
    assert torch.equal(results[0], results[1])


def test_users_batched_reptile_equals_each_users_loop(omniglot, tiny):
    """Three users' outer steps as one vmapped computation: each user's weights, moments and loss
    as its own ``reptile_step`` gives them, for both ways of carrying Adam's moments."""
    batches = [_episode_batch(omniglot, seed=s) for s in range(3)]
    starts = [tiny.init(torch.Generator().manual_seed(s)) for s in range(3)]
    kwargs = dict(lr=1e-3, beta2=0.999, epsilon=0.5)
    for carry in ("sequential", "parallel"):
        states = []
        for p, (x, y) in zip(starts, batches):  # warm each user's moments differently, so they matter
            states.append(reptile_step(tiny, p, AdamState.zeros(list(p.values())), x, y, carry=carry, **kwargs)[1])
        stacked = {k: torch.stack([p[k] for p in starts]) for k in starts[0]}
        state = AdamState(*(
            [torch.stack([getattr(s, part)[i] for s in states]) for i in range(len(states[0].exp_avg))]
            for part in ("exp_avg", "exp_avg_sq")), [t.clone() for t in states[0].step])
        x, y = (torch.stack(t) for t in zip(*batches))
        got_p, got_s, got_loss = reptile_step_users(tiny, stacked, state, x, y, carry=carry, **kwargs)
        for u, (p, s, (xu, yu)) in enumerate(zip(starts, states, batches)):
            want_p, want_s, want_loss = reptile_step(tiny, p, s.clone(), xu, yu, carry=carry, **kwargs)
            for k in p:
                torch.testing.assert_close(got_p[k][u], want_p[k], rtol=0, atol=1e-5)
                assert not torch.equal(got_p[k][u], p[k]), (carry, k)
            for a, b in zip(got_s.exp_avg_sq, want_s.exp_avg_sq):
                torch.testing.assert_close(a[u], b, rtol=1e-4, atol=1e-12)
            assert float(got_s.step[0]) == float(want_s.step[0])
            torch.testing.assert_close(got_loss[u], want_loss, rtol=0, atol=1e-5)


def test_the_trunk_runs_one_channel_images_channels_last():
    """``torch.cat`` of one-channel images gives NCHW strides that ``contiguous(channels_last)``
    leaves alone; ``channels_last`` sets NHWC strides (a view), so the convolutions write NHWC maps."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 8, 8, generator=gen)  # the strides torch.cat returns
    assert images.contiguous(memory_format=torch.channels_last).stride() == (64, 64, 8, 1)
    nhwc = channels_last(images)
    assert nhwc.stride() == (64, 1, 8, 1) and nhwc.data_ptr() == images.data_ptr() and torch.equal(nhwc, images)
    maps = F.conv2d(nhwc, torch.rand(16, 1, 3, 3, generator=gen), padding=1)
    assert maps.stride(1) == 1
    colour = torch.rand(4, 3, 8, 8, generator=gen)
    assert channels_last(colour).stride(1) == 1 and torch.equal(channels_last(colour), colour)
