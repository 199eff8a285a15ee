"""Refine and Con against hand computations."""

import math

import torch

from revision.refine import con_cost, con_count, refine_cost


def test_refine_matches_hand_computation():
    # Two prototypes, two antitypes in 2-D. d[j][s] = squared distances:
    # p0 = (0, 0): to q0 = (0, 0) 0, to q1 = (1, 1) 2;  p1 = (3, 0): to q0 9, to q1 5.
    p = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    eps = 1e-4
    # max over antitypes of log((d + 1) / (d + eps)): p0 -> d = 0, p1 -> d = 5 (the nearer one)
    expected = (math.log(1 / eps) + math.log(6 / (5 + eps))) / (-math.log(eps))
    assert math.isclose(float(refine_cost(p, q, eps)), expected, rel_tol=1e-6)
    # A coinciding pair scores exactly 1.
    assert math.isclose(float(refine_cost(p[:1], q[:1], eps)), 1.0, rel_tol=1e-6)


def test_refine_accepts_protopnet_shapes_and_no_antitypes():
    p = torch.rand(4, 3, 1, 1)
    assert float(refine_cost(p, torch.empty(0, 3))) == 0.0
    assert math.isclose(float(refine_cost(p, p[1].view(1, 3))), float(refine_cost(p.view(4, 3), p[1].view(1, 3))))


def test_refine_gradient_pushes_prototype_away_from_antitype():
    p = torch.tensor([[0.5, 0.5]], requires_grad=True)
    q = torch.tensor([[0.4, 0.5]])
    refine_cost(p, q).backward()
    # descending the gradient moves p further from q (along +x)
    assert p.grad[0, 0] < 0 and abs(float(p.grad[0, 1])) < 1e-9


def test_con_hinge_and_count_by_hand():
    p = torch.tensor([[0.5, 1.25, -0.5], [0.0, 1.0, 2.0]], requires_grad=True)
    # outside [0, 1]: 1.25 (by 0.25), -0.5 (by 0.5), 2.0 (by 1.0); the faces 0 and 1 are inside
    assert math.isclose(float(con_cost(p).detach()), 1.75)
    assert con_count(p) == 3
    con_cost(p).backward()
    assert p.grad.tolist() == [[0.0, 1.0, -1.0], [0.0, 0.0, 1.0]]
