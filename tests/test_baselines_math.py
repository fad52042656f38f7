"""Pure math of the baselines: MEMIT's closed form, the projected solve, PRUNE's restraint, RECT's mask."""

import math

import pytest
import torch

from alphaedit_plugin.constrained_solve import (SolveTerms, memit_terms, project_rows, solve_with_terms,
                                                with_projection)
from alphaedit_plugin.methods.prune import restrain_singular_values, restraint
from alphaedit_plugin.methods.rect import relative_change_mask, sparsify_by_relative_change
from alphaedit_plugin.null_space_projector import null_space_projector


def _problem(seed=0, d_in=24, d_out=10, n=3, m=12):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d_in, m, generator=g, dtype=torch.float64)  # rank m < d_in: an exact null space
    k1 = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    c0 = k0 @ k0.T / m + 1e-3 * torch.eye(d_in, dtype=torch.float64)  # full rank for MEMIT
    p = null_space_projector(k0 @ k0.T / m, threshold=1e-8).matrix.to(torch.float64)
    return k0, k1, r, c0, p


def test_memit_update_is_the_memit_closed_form():
    _, k1, r, c0, _ = _problem()
    lam = 15000.0
    expected = r @ k1.T @ torch.linalg.inv(lam * c0 + k1 @ k1.T)  # MEMIT Eq. 14, written independently
    got = solve_with_terms(k1.float(), r.float(), memit_terms(lam), second_moment=c0)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_projected_update_lies_in_null_space_for_any_preservation_term():
    k0, k1, r, c0, p = _problem(1)
    kp = torch.randn(24, 5, dtype=torch.float64)
    for keep in (False, True):
        terms = with_projection(memit_terms(15000.0), ridge=10.0, keep_mom2_prior=keep)
        delta = solve_with_terms(k1, r, terms, projector=p, earlier_keys_kkt_sum=kp @ kp.T, second_moment=c0).double()
        assert torch.linalg.norm(delta @ k0) / torch.linalg.norm(delta) < 1e-6
        assert torch.allclose(delta @ p, delta, atol=1e-6)


def test_projected_update_closed_form():
    _, k1, r, c0, p = _problem(2)
    kp = torch.randn(24, 4, dtype=torch.float64)
    b = 3.0 * c0
    eye = torch.eye(24, dtype=torch.float64)
    expected = r @ k1.T @ p @ torch.linalg.inv((b + kp @ kp.T + k1 @ k1.T) @ p + 10.0 * eye)
    terms = with_projection(memit_terms(3.0), ridge=10.0, keep_mom2_prior=True)
    got = solve_with_terms(k1, r, terms, projector=p, earlier_keys_kkt_sum=kp @ kp.T, second_moment=c0)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_alphaedit_terms_are_memits_with_the_one_line():
    """MEMIT has λ·C0 and no P; the projected twin drops λ·C0 (or keeps it), carries Kp Kpᵀ and has a ridge."""
    assert memit_terms(7.0) == SolveTerms(projection=False, mom2_prior_weight=7.0, earlier_keys=False, ridge=0.0)
    assert with_projection(memit_terms(7.0), ridge=10.0) == SolveTerms(True, None, True, 10.0)
    assert with_projection(memit_terms(7.0), ridge=10.0, keep_mom2_prior=True) == SolveTerms(True, 7.0, True, 10.0)


def test_solve_names_a_missing_term():
    k1, r = torch.randn(6, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="projector"):
        solve_with_terms(k1, r, with_projection(memit_terms(1.0), ridge=1.0), earlier_keys_kkt_sum=torch.eye(6))
    with pytest.raises(ValueError, match="second_moment"):
        solve_with_terms(k1, r, memit_terms(1.0))


def test_project_rows_refuses_a_projector_of_another_size():
    with pytest.raises(ValueError, match="does not fit"):
        project_rows(torch.zeros(4, 6), torch.eye(5))


# ---- PRUNE ---------------------------------------------------------------
def test_restraint_function():
    bar = 2.0
    sigma = torch.tensor([0.5, 2.0, 5.0, 50.0], dtype=torch.float64)
    out = restraint(sigma, bar)
    assert out[0] == 0.5 and out[1] == pytest.approx(2.0)
    assert out[2] == pytest.approx(math.log(5.0) - math.log(2.0) + 2.0)
    assert out[3] == pytest.approx(math.log(50.0) - math.log(2.0) + 2.0)
    assert torch.all(out <= sigma + 1e-12)
    base2 = restraint(sigma, bar, base=2.0)
    assert base2[3] == pytest.approx(math.log2(50.0) - 1.0 + 2.0)


def test_restrain_singular_values_changes_only_the_large_ones():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(8, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    s = torch.tensor([40.0, 9.0, 1.5, 0.2], dtype=torch.float64)
    total = u @ torch.diag(s) @ v.T
    restrained = restrain_singular_values(total, sigma_bar=3.0)
    got = torch.linalg.svdvals(restrained)
    expected = torch.sort(restraint(s, 3.0), descending=True).values
    assert torch.allclose(got[:4], expected, atol=1e-9)
    assert got.max() < 3.0 + math.log(40.0 / 3.0) + 1e-9
    # the singular directions are kept: same row and column spaces
    assert torch.allclose(restrained @ v @ v.T, restrained, atol=1e-9)
    assert torch.allclose(u @ u.T @ restrained, restrained, atol=1e-9)
    small = u @ torch.diag(torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=torch.float64)) @ v.T
    assert torch.equal(restrain_singular_values(small, sigma_bar=3.0), small)


def test_restraint_keeps_null_space_membership():
    k0, _, _, _, p = _problem(4)
    total = 100.0 * torch.randn(10, 24, dtype=torch.float64) @ p
    restrained = restrain_singular_values(total, sigma_bar=1.0)
    assert torch.linalg.svdvals(restrained)[0] < torch.linalg.svdvals(total)[0]
    assert torch.linalg.norm(restrained @ k0) / torch.linalg.norm(restrained) < 1e-9


# ---- RECT ----------------------------------------------------------------
def test_rect_keeps_the_top_fraction_by_relative_change():
    weight = torch.tensor([[1.0, 10.0, 0.5, 2.0], [4.0, 1.0, 1.0, 8.0]])
    delta = torch.tensor([[0.5, 1.0, 0.1, 0.1], [0.4, -0.3, 0.0, 4.0]])
    # relative change [[.5, .1, .2, .05], [.1, .3, 0, .5]]; ceil(0.4 · 8) = 4 entries kept
    mask = relative_change_mask(delta, weight, 0.4)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]
    sparse = sparsify_by_relative_change(delta, weight, 0.4)
    kept = (delta.abs() / weight.abs())[mask]
    dropped = (delta.abs() / weight.abs())[~mask]
    assert kept.min() >= dropped.max()
    assert torch.equal(sparse[mask], delta[mask]) and torch.all(sparse[~mask] == 0)


def test_rect_fraction_one_keeps_everything_and_zero_weights_rank_first():
    weight = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    delta = torch.tensor([[1e-6, 0.5], [0.2, 0.1]])
    assert torch.equal(sparsify_by_relative_change(delta, weight, 1.0), delta)
    assert relative_change_mask(delta, weight, 0.25)[0, 0]
