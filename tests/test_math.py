"""Pure math: the null-space projector (projector.py) and the constrained solve (solve.py)."""

import re

import numpy as np
import pytest
import torch

from alphaedit_plugin.null_space_projector import NullSpaceError, null_space_projector
from alphaedit_plugin.constrained_solve import constrained_update, preservation_ratio


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator(seed), dtype=torch.float64))
    return q


def moment_with_spectrum(eigenvalues, seed: int = 0):
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q = random_orthogonal(len(eigenvalues), seed)
    return q @ torch.diag(eigenvalues) @ q.T, q


def null_projector_of(keys: torch.Tensor) -> torch.Tensor:
    """I - U Uᵀ with U an orthonormal basis of the column span of ``keys`` (d, m): computed by SVD, independently."""
    u, s, _ = torch.linalg.svd(keys.double(), full_matrices=False)
    u = u[:, s > s.max() * 1e-10]
    return torch.eye(keys.shape[0], dtype=torch.float64) - u @ u.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------
# projector
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_is_symmetric_and_idempotent(seed, dtype):
    keys = torch.randn(200, 24, generator=generator(seed), dtype=torch.float64) @ torch.randn(
        24, 24, generator=generator(seed + 100), dtype=torch.float64)
    moment = (keys.T @ keys / keys.shape[0]).to(dtype)
    threshold = float(torch.linalg.eigvalsh(moment.double()).median())
    projector = null_space_projector(moment, threshold)
    p = projector.matrix.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert projector.matrix.dtype == dtype
    assert 0 < projector.rank < 24
    assert (p - p.T).abs().max() < tol
    assert (p @ p - p).abs().max() < tol
    assert abs(float(torch.trace(p)) - projector.rank) < 1e-3


@pytest.mark.parametrize("n_keys", [1, 7, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_annihilates_the_preserved_keys(n_keys, dtype):
    d = 32
    k0 = torch.randn(d, n_keys, generator=generator(n_keys), dtype=torch.float64) * 3
    moment = (k0 @ k0.T / n_keys).to(dtype)
    projector = null_space_projector(moment, 1e-4)
    p = projector.matrix.double()
    assert projector.rank == d - n_keys
    assert (p @ k0).norm() <= 1e-5 * k0.norm()
    # ... and leaves whatever is orthogonal to them alone.
    outside = null_projector_of(k0) @ torch.randn(d, 5, generator=generator(99), dtype=torch.float64)
    assert (p @ outside - outside).norm() <= 1e-5 * outside.norm()


@pytest.mark.parametrize("threshold", [1e-5, 3e-3, 0.5, 7.0, 1e3])
def test_rank_is_the_count_of_eigenvalues_below_threshold(threshold):
    eigenvalues = torch.logspace(-6, 2, 20, dtype=torch.float64)
    moment, q = moment_with_spectrum(eigenvalues, seed=3)
    projector = null_space_projector(moment, threshold)
    below = eigenvalues < threshold
    assert projector.rank == int(below.sum())
    assert torch.allclose(projector.eigenvalues.double(), eigenvalues, rtol=1e-8, atol=1e-12)
    p = projector.matrix.double()
    assert torch.allclose(p @ q[:, below], q[:, below], atol=1e-10)  # null directions kept
    assert torch.allclose(p @ q[:, ~below], torch.zeros_like(q[:, ~below]), atol=1e-10)  # the rest removed


@pytest.mark.parametrize("threshold", [1e-3, 0.3])
def test_threshold_below_every_eigenvalue_is_refused(threshold):
    eigenvalues = torch.linspace(0.4321, 5.0, 16, dtype=torch.float64)
    moment, _ = moment_with_spectrum(eigenvalues, seed=4)
    with pytest.raises(NullSpaceError) as caught:
        null_space_projector(moment, threshold, name="layer 7")
    message = str(caught.value)
    assert "layer 7" in message and "threshold" in message
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", message)]
    assert any(abs(x - 0.4321) <= 1e-3 for x in numbers), f"smallest eigenvalue 0.4321 not named in: {message}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_moment_is_refused(bad):
    moment, _ = moment_with_spectrum(torch.linspace(0.0, 1.0, 8), seed=5)
    moment[2, 3] = bad
    with pytest.raises(NullSpaceError, match="NaN or inf"):
        null_space_projector(moment, 0.5, name="layer 2")


def test_non_square_moment_is_refused():
    with pytest.raises(ValueError, match="square"):
        null_space_projector(torch.zeros(4, 5), 0.1)


# ---------------------------------------------------------------------------
# constrained solve
# ---------------------------------------------------------------------------

D_IN, D_OUT = 24, 10


def problem(seed: int, n_new: int = 3, n_preserved: int = 12, n_previous: int = 4):
    g = generator(seed)
    k0 = torch.randn(D_IN, n_preserved, generator=g, dtype=torch.float64)
    k1 = torch.randn(D_IN, n_new, generator=g, dtype=torch.float64)
    kp = torch.randn(D_IN, n_previous, generator=g, dtype=torch.float64)
    r = torch.randn(D_OUT, n_new, generator=g, dtype=torch.float64)
    return k0, k1, kp, r


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_previous", [False, True])
def test_update_leaves_preserved_keys_alone(seed, with_previous):
    k0, k1, kp, r = problem(seed)
    p = null_projector_of(k0)
    delta = constrained_update(k1.float(), r.float(), p.float(), (kp @ kp.T).float() if with_previous else None,
                               l2=0.5).double()
    assert delta.shape == (D_OUT, D_IN)
    assert delta.norm() > 1e-2  # a real update ...
    assert (delta @ k0).norm() <= 1e-5 * delta.norm() * k0.norm()  # ... that is invisible on K0
    assert rel(delta @ p, delta) < 1e-5  # its rows lie in the null space


@pytest.mark.parametrize("l2", [1e-2, 1.0, 10.0])
def test_without_projector_it_is_the_ridge_solution(l2):
    _, k1, _, r = problem(10 + int(l2 * 10))
    expected = r @ k1.T @ torch.linalg.inv(k1 @ k1.T + l2 * torch.eye(D_IN, dtype=torch.float64))
    delta = constrained_update(k1.float(), r.float(), None, None, l2=l2)
    assert rel(delta, expected) < 1e-5


def test_identity_projector_is_no_projection():
    _, k1, kp, r = problem(20)
    cov = (kp @ kp.T).float()
    expected = r @ k1.T @ torch.linalg.inv(kp @ kp.T + k1 @ k1.T + 0.3 * torch.eye(D_IN, dtype=torch.float64))
    without = constrained_update(k1.float(), r.float(), None, cov, l2=0.3)
    identity = constrained_update(k1.float(), r.float(), torch.eye(D_IN), cov, l2=0.3)
    assert rel(without, expected) < 1e-5
    assert rel(identity, expected) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("l2", [1e-2, 1.0, 10.0])
def test_matches_the_papers_formula(seed, l2):
    """Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹ (AlphaEdit Eq. 14 with the L2 term), explicit inverse in float64."""
    k0, k1, kp, r = problem(seed, n_new=1 + seed, n_preserved=6 + 3 * seed, n_previous=2 * seed)
    p = null_projector_of(k0)
    eye = torch.eye(D_IN, dtype=torch.float64)
    expected = r @ k1.T @ p @ torch.linalg.inv(kp @ kp.T @ p + k1 @ k1.T @ p + l2 * eye)
    delta = constrained_update(k1.float(), r.float(), p.float(), (kp @ kp.T).float(), l2=l2)
    assert rel(delta, expected) < 1e-4


def test_no_previous_keys_equals_zero_previous_keys():
    k0, k1, _, r = problem(30)
    p = null_projector_of(k0).float()
    a = constrained_update(k1.float(), r.float(), p, None, l2=0.7)
    b = constrained_update(k1.float(), r.float(), p, torch.zeros(D_IN, D_IN), l2=0.7)
    assert rel(a, b) < 1e-6


def test_new_keys_inside_the_null_space_are_fitted_exactly():
    """With K1 in the null space and λ → 0 the update maps K1 onto R: Δ K1 = R K1ᵀK1 (K1ᵀK1 + λ)⁻¹ → R."""
    k0, k1, _, r = problem(40)
    p = null_projector_of(k0)
    k1 = p @ k1
    delta = constrained_update(k1.float(), r.float(), p.float(), None, l2=1e-6).double()
    assert rel(delta @ k1, r) < 1e-3
    assert (delta @ k0).norm() <= 1e-5 * delta.norm() * k0.norm()


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="share n"):
        constrained_update(torch.zeros(D_IN, 3), torch.zeros(D_OUT, 2), None, None, l2=1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_preservation_ratio_is_the_relative_output_change(seed):
    g = generator(seed)
    delta, weight = torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g)
    keys = torch.randn(50, D_IN, generator=g)
    d, w, k = delta.double().numpy(), weight.double().numpy(), keys.double().numpy()
    expected = np.linalg.norm(d @ k.T) / np.linalg.norm(w @ k.T)
    assert preservation_ratio(delta, weight, keys) == pytest.approx(expected, rel=1e-10)
    assert preservation_ratio(2 * delta, weight, keys) == pytest.approx(2 * expected, rel=1e-10)
    assert preservation_ratio(torch.zeros_like(delta), weight, keys) == 0.0
