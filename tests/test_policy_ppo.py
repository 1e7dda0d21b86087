"""GAE, the PPO loss and the demonstration schedule against hand-computed values."""

import math

import pytest

torch = pytest.importorskip("torch")

from policy.ppo import compute_gae, demo_share, immediate_advantage, ppo_policy_loss, value_loss  # noqa: E402


def test_gae_hand_computed():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    d = torch.zeros(3, 1)
    adv, ret = compute_gae(r, v, d, torch.tensor([0.3]), gamma=0.9, lam=0.8)
    # delta2 = 2 + .9*.3 - .1 = 2.17; delta1 = -0.11; delta0 = 0.68; A_t = delta_t + .72 A_{t+1}
    assert adv[:, 0].tolist() == pytest.approx([1.725728, 1.4524, 2.17], abs=1e-6)
    assert ret[:, 0].tolist() == pytest.approx([2.225728, 1.6524, 2.27], abs=1e-6)


def test_gae_stops_at_episode_end():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    adv, _ = compute_gae(r, v, d, torch.tensor([0.3]), gamma=0.9, lam=0.8)
    assert adv[:, 0].tolist() == pytest.approx([0.68 + 0.72 * -0.2, -0.2, 2.17], abs=1e-6)


def test_ppo_clipped_loss_hand_computed():
    old = torch.log(torch.tensor([0.4, 0.4, 0.4]))
    new = torch.log(torch.tensor([0.6, 0.2, 0.4]))  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([1.0, -2.0, 3.0])
    # min(1.5*1, 1.2*1) = 1.2; min(0.5*-2, 0.8*-2) = -1.6; 3
    assert float(ppo_policy_loss(new, old, adv, 0.2)) == pytest.approx(-(1.2 - 1.6 + 3.0) / 3, abs=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0])
    assert float(ppo_policy_loss(new, old, adv, 0.2, weight=w)) == pytest.approx(-(1.2 + 3.0) / 2, abs=1e-6)
    assert float(value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))) == pytest.approx(1.25)


def test_demo_share_decays():
    assert demo_share(0, 0.5, 0.9) == 0.5
    assert demo_share(2, 0.5, 0.9) == pytest.approx(0.405)
    assert demo_share(100, 0.5, 0.9, floor=0.01) == 0.01
    assert math.isclose(demo_share(1, 1.0, 0.5), 0.5)


def test_immediate_advantage_hand_computed():
    import numpy as np

    q = np.array([[-5.0, -7.0, -6.0], [-np.inf, -8.0, -np.inf]])
    pi = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    adv = immediate_advantage(q, pi, np.array([1, 1]))
    # row 0: -7 - (0.5*-5 + 0.25*-7 + 0.25*-6) = -7 + 5.75; row 1: only B is available
    assert np.allclose(adv, [-1.25, 0.0])
    assert np.allclose(immediate_advantage(q, pi, np.array([0, 1])), [0.75, 0.0])
