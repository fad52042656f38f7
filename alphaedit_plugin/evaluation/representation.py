"""Hidden-representation shift (AlphaEdit RQ3, Appendix C.3).

On a fixed set of factual prompts, the hidden state at the last prompt token
of one layer (default: the last block) is read before and after editing.
AlphaEdit's claim is that its edits leave these representations where they
were, while unconstrained edits drift them.

Figures (``shift_figures``), on the two point sets A (before) and B (after):

- ``relative_shift``: mean over prompts of ‖b_i − a_i‖ / ‖a_i‖, with a 95% confidence interval
  (mean ± 1.96 · sd / √n, normal approximation) in ``relative_shift_ci95``;
- ``hausdorff``: the Hausdorff distance max(sup_a inf_b ‖a−b‖, sup_b inf_a ‖a−b‖), in the full
  hidden space and in the 2-D projection;
- ``overlap``: the Bhattacharyya coefficient of Gaussians fitted to A and B in the 2-D
  projection (1 = the same distribution, 0 = disjoint), and ``inside_ellipse``: the share of
  B's points inside A's 95% confidence ellipse;
- the 2-D projection is PCA fitted on A (so every method is drawn in the same frame);
  the plot shows the points and each set's 95% confidence ellipse.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..architectures import num_layers, templates_for
from ..tracing import capture_outputs, encode

CHI2_2DOF_95 = 5.991464547107979  # -2 ln(0.05): the 95% quantile of chi-square with 2 degrees of freedom


@torch.no_grad()
def hidden_states(model, tok, prompts: Sequence[str], layer: Optional[int] = None) -> np.ndarray:
    """(n, d) hidden states at each prompt's last token, output of block ``layer`` (default: the last)."""
    layer = num_layers(model) - 1 if layer is None else layer
    name = templates_for(model, None).layer_module_tmp.format(layer)
    device = next(model.parameters()).device
    rows = []
    with capture_outputs(model, [name]) as captured:
        for prompt in prompts:
            model(input_ids=torch.tensor([encode(tok, prompt)], device=device))
            rows.append(captured[name][0, -1].float().cpu().numpy())
    return np.stack(rows)


def pca_2d(fit_on: np.ndarray):
    """A function projecting points onto the two leading principal axes of ``fit_on``."""
    mean = fit_on.mean(axis=0)
    _, _, vt = np.linalg.svd(fit_on - mean, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:
        axes = np.vstack([axes, np.zeros_like(axes[:1])])
    return lambda x: (x - mean) @ axes.T


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(max(distances.min(axis=1).max(), distances.min(axis=0).max()))


def _gaussian(x: np.ndarray, ridge: float = 1e-9):
    mean = x.mean(axis=0)
    cov = np.cov(x.T) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return mean, cov + ridge * np.eye(x.shape[1])


def bhattacharyya_coefficient(a: np.ndarray, b: np.ndarray) -> float:
    ma, ca = _gaussian(a)
    mb, cb = _gaussian(b)
    c = (ca + cb) / 2
    diff = ma - mb
    distance = diff @ np.linalg.solve(c, diff) / 8 + 0.5 * math.log(
        np.linalg.det(c) / math.sqrt(np.linalg.det(ca) * np.linalg.det(cb)))
    return float(math.exp(-distance))


def inside_ellipse(reference: np.ndarray, points: np.ndarray) -> float:
    mean, cov = _gaussian(reference)
    inv = np.linalg.inv(cov)
    d2 = np.einsum("ij,jk,ik->i", points - mean, inv, points - mean)
    return float((d2 <= CHI2_2DOF_95).mean())


def ellipse(points: np.ndarray, count: int = 100) -> np.ndarray:
    """The 95% confidence ellipse of a 2-D point set, as ``count`` boundary points."""
    mean, cov = _gaussian(points)
    values, vectors = np.linalg.eigh(cov)
    angles = np.linspace(0, 2 * np.pi, count)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return mean + (circle * np.sqrt(CHI2_2DOF_95 * np.clip(values, 0, None))) @ vectors.T


def shift_figures(before: np.ndarray, after: np.ndarray) -> Dict[str, object]:
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} must hold the same prompts")
    relative = np.linalg.norm(after - before, axis=1) / np.maximum(np.linalg.norm(before, axis=1), 1e-12)
    n = len(relative)
    half = 1.96 * relative.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    project = pca_2d(before)
    a2, b2 = project(before), project(after)
    return {
        "prompts": n,
        "relative_shift": float(relative.mean()),
        "relative_shift_ci95": [float(relative.mean() - half), float(relative.mean() + half)],
        "hausdorff": hausdorff(before, after),
        "hausdorff_2d": hausdorff(a2, b2),
        "overlap": bhattacharyya_coefficient(a2, b2) if n > 2 else None,
        "inside_ellipse": inside_ellipse(a2, b2) if n > 2 else None,
    }


def plot_projection(before: np.ndarray, afters: Dict[str, np.ndarray], path, title: str = "") -> bool:
    """Scatter of the 2-D projection with 95% ellipses, before and after each method; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    project = pca_2d(before)
    fig, ax = plt.subplots(figsize=(6, 5))
    sets = {"before editing": before, **{f"after {name}": x for name, x in afters.items()}}
    for label, points in sets.items():
        p2 = project(points)
        dots = ax.scatter(p2[:, 0], p2[:, 1], s=12, alpha=0.6, label=label)
        if len(p2) > 2:
            e = ellipse(p2)
            ax.plot(e[:, 0], e[:, 1], color=dots.get_facecolor()[0][:3], linewidth=1)
    ax.set_xlabel("PC 1 (fitted before editing)")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "Hidden representations of factual prompts (95% ellipses)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
