"""The lecture's figures, each drawn from computation (``dpokit figures --out DIR``).

Every function returns a ``matplotlib.figure.Figure`` (no pyplot, no global backend state);
:func:`write_figures` saves them all as PNGs, each through a temporary file and a rename.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from dpokit.atomic import atomic_path
from dpokit.errors import DpokitError
from dpokit.lecture.outcomes import WORKED_EXAMPLE, WORKED_EXAMPLE_PROMPT, Outcome, solve
from dpokit.lecture.partition import (
    GPT2_VOCAB_SIZE,
    EstimateRow,
    builtin_space,
    measure_scoring_rate,
    monte_carlo_study,
)
from dpokit.theory import gaussian_kl

GREEN, RED, BLUE, GREY = "#2ca02c", "#d62728", "#1f77b4", "#7f7f7f"


def _normal_pdf(y: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((y - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _numerical_kl(mu_p: float, sigma_p: float, mu_q: float, sigma_q: float) -> float:
    """∫ p log(p/q) dy by the trapezoid rule on a wide grid (an independent check)."""
    y = np.linspace(min(mu_p, mu_q) - 12 * max(sigma_p, sigma_q),
                    max(mu_p, mu_q) + 12 * max(sigma_p, sigma_q), 20001)
    log_p = -0.5 * ((y - mu_p) / sigma_p) ** 2 - math.log(sigma_p * math.sqrt(2 * math.pi))
    log_q = -0.5 * ((y - mu_q) / sigma_q) ** 2 - math.log(sigma_q * math.sqrt(2 * math.pi))
    return float(np.trapezoid(np.exp(log_p) * (log_p - log_q), y))


def gaussian_kl_figure(ref_means: Sequence[float] = (-4.0, -3.0, -2.0, -1.0, 0.0),
                       sigma: float = 1.0) -> Figure:
    """π* = N(0, σ²) in green, π_ref = N(μ, σ²) in red moving from −4 onto it; KL → 0."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    y = np.linspace(-7.5, 4.0, 600)
    variance = f"{sigma**2:g}"
    left.plot(y, _normal_pdf(y, 0.0, sigma), color=GREEN, lw=2.5, label=f"π* = N(0, {variance})")
    for i, mu in enumerate(ref_means):
        kl = float(gaussian_kl(mu, sigma, 0.0, sigma))
        alpha = 0.35 + 0.65 * (i + 1) / len(ref_means)
        left.plot(y, _normal_pdf(y, mu, sigma), color=RED, alpha=alpha, lw=1.6,
                  ls="--" if mu == 0.0 else "-",
                  label=f"π_ref = N({mu:g}, {variance}): KL = {kl:.3g}")
    left.set(title="π_ref moves onto π*", xlabel="y", ylabel="density")
    left.legend(fontsize=8, loc="upper left")

    means = np.linspace(-4.0, 1.0, 201)
    closed = gaussian_kl(torch.tensor(means), sigma, 0.0, sigma).numpy()
    right.plot(means, closed, color=BLUE, lw=2, label="closed form")
    check = np.linspace(-4.0, 1.0, 11)
    right.plot(check, [_numerical_kl(m, sigma, 0.0, sigma) for m in check], "o", color=RED,
               ms=5, label="numerical integration")
    right.axvline(0.0, color=GREEN, lw=1, ls=":")
    right.set(title="KL(π_ref ‖ π*) reaches 0 only when the curves coincide",
              xlabel="mean of π_ref (π* fixed at 0)", ylabel="KL (nats)")
    right.legend(fontsize=8)
    return fig


def _bumpy(w: np.ndarray) -> np.ndarray:
    """A smooth test function with one global maximum in view."""
    return np.exp(-0.5 * (w - 1.0) ** 2) + 0.35 * np.exp(-2.0 * (w + 1.6) ** 2)


def argmax_argmin_figure() -> Figure:
    """Negating f turns its argmax into the argmin of −f, at the same ŵ."""
    w = np.linspace(-4, 4, 801)
    f = _bumpy(w)
    w_hat = w[np.argmax(f)]
    w_min = w[np.argmin(-f)]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    left.plot(w, f, color=BLUE, lw=2)
    left.plot([w_hat], [f.max()], "o", color=RED, ms=8, label=f"ŵ = argmax f = {w_hat:.2f}")
    left.set(title="maximise f(w)", xlabel="w", ylabel="f(w)")
    right.plot(w, -f, color=BLUE, lw=2)
    right.plot([w_min], [(-f).min()], "o", color=RED, ms=8,
               label=f"argmin (−f) = {w_min:.2f}")
    right.set(title="minimise −f(w): same location", xlabel="w", ylabel="−f(w)")
    for ax in (left, right):
        ax.axvline(w_hat, color=GREY, lw=1, ls=":")
        ax.legend(fontsize=8)
    return fig


def scale_shift_figure(scales: Sequence[float] = (0.5, 1.0, 2.0),
                       shifts: Sequence[float] = (0.0, 1.0, 2.0)) -> Figure:
    """c·g(w) (c > 0) and g(w) − c have their minimum at the same w as g."""
    w = np.linspace(-3, 4, 701)
    g = (w - 1.0) ** 2 / 2.0 + 0.4 * np.sin(2.0 * w)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    for ax, family, label in ((left, [c * g for c in scales], "c·g(w), c = {:g}"),
                              (right, [g - c for c in shifts], "g(w) − c, c = {:g}")):
        values = scales if ax is left else shifts
        for curve, c in zip(family, values, strict=True):
            i = int(np.argmin(curve))
            ax.plot(w, curve, lw=1.8, label=label.format(c) + f": argmin = {w[i]:.2f}")
            ax.plot([w[i]], [curve[i]], "o", color=RED, ms=6)
        ax.axvline(w[int(np.argmin(g))], color=GREY, lw=1, ls=":")
        ax.legend(fontsize=8)
    left.set(title="scaling by c > 0 keeps the minimiser", xlabel="w", ylabel="c·g(w)")
    right.set(title="subtracting a constant keeps the minimiser", xlabel="w", ylabel="g(w) − c")
    return fig


def worked_example_figure(outcomes: Sequence[Outcome] = WORKED_EXAMPLE,
                          betas: Sequence[float] = (0.5, 1.0, 2.0, 5.0, 20.0)) -> Figure:
    """Bars of π_ref, exp(r/β) (normalised) and π* for each outcome, one panel per β."""
    fig = Figure(figsize=(3.0 * len(betas) + 1, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(betas), sharey=True))
    x = np.arange(len(outcomes))
    ref = np.array([o.ref_prob for o in outcomes])
    rewards = np.array([o.reward for o in outcomes])
    for ax, beta in zip(axes, betas, strict=True):
        solution = solve(outcomes, beta)
        with np.errstate(over="ignore"):  # shifted first: r/β alone may overflow (inf − inf)
            weights = np.exp((rewards - rewards.max()) / beta)  # −inf → weight 0
        ax.bar(x - 0.27, ref, 0.27, color=RED, label="π_ref")
        ax.bar(x, weights / weights.sum(), 0.27, color=BLUE, label="exp(r/β) / Σ exp(r/β)")
        ax.bar(x + 0.27, solution.optimal_probs, 0.27, color=GREEN, label="π*")
        ax.set_xticks(x, [o.name for o in outcomes], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"β = {beta:g}: log Z = {solution.log_partition:.3g}", fontsize=10)
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Worked example '{WORKED_EXAMPLE_PROMPT} …': π* = π_ref·exp(r/β)/Z "
                 "moves from the reward's choice (small β) back to π_ref (large β)")
    return fig


def partition_growth_figure(rate: float, max_length: int = 8,
                            vocab_sizes: Sequence[int] = (2, 100, 32000, GPT2_VOCAB_SIZE, 128256),
                            ) -> Figure:
    """V^T on a log axis, with the time to enumerate at ``rate`` sequences/s on a second axis."""
    fig = Figure(figsize=(8.5, 5), layout="constrained")
    ax = fig.subplots()
    lengths = np.arange(1, max_length + 1)
    for v in vocab_sizes:
        ax.semilogy(lengths, [float(v) ** t for t in lengths], "o-", lw=1.6,
                    label=f"V = {v:,}" + (" (GPT-2)" if v == GPT2_VOCAB_SIZE else ""))
    for seconds, name in ((1.0, "1 second"), (365.25 * 86400, "1 year"),
                          (13.8e9 * 365.25 * 86400, "age of the universe")):
        ax.axhline(seconds * rate, color=GREY, lw=1, ls=":")
        ax.text(lengths[-1], seconds * rate * 1.8, f"enumeration takes {name}", fontsize=8,
                color=GREY, ha="right")
    ax.set(title="Terms in Z(x): V^T grows exponentially with the length T",
           xlabel="completion length T (tokens)", ylabel="number of sequences V^T")
    secondary = ax.secondary_yaxis("right", functions=(lambda n: n / rate, lambda s: s * rate))
    secondary.set_ylabel(f"seconds to enumerate at {rate:.3g} sequences/s (measured)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    return fig


def monte_carlo_figure(rows: Sequence[EstimateRow]) -> Figure:
    """RMSE of log Ẑ against n for each β: the estimate degrades as β shrinks."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for beta in sorted({r.beta for r in rows}, reverse=True):
        sel = [r for r in rows if r.beta == beta]
        ax.loglog([r.num_samples for r in sel], [max(r.rmse_log, 1e-12) for r in sel], "o-",
                  label=f"β = {beta:g}")
    ax.set(title="Monte-Carlo log Ẑ from π_ref samples: error grows as β shrinks",
           xlabel="samples n from π_ref", ylabel="RMSE of log Ẑ (vs exact log Z)")
    ax.legend(fontsize=8)
    return fig


FIGURES: dict[str, str] = {
    "gaussian_kl.png": "Two Gaussians: KL(π_ref ‖ π*) falls to 0 as π_ref moves from −4 onto π*",
    "argmax_argmin.png": "Negating a function turns its argmax into an argmin at the same point",
    "scale_shift.png": "Scaling by c > 0 or subtracting a constant leaves the minimiser in place",
    "worked_example_beta.png": "The worked example: π_ref, exp(r/β) and π* across a β sweep",
    "partition_growth.png": "V^T growth of the terms of Z on a log axis, with enumeration time",
    "monte_carlo_partition.png": "Monte-Carlo error of log Z against sample size for several β",
}


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` through a temporary sibling and a rename, so an
    interrupted run never leaves a truncated figure behind."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def write_figures(out_dir: str | Path, *, rate: float | None = None,
                  on_written: Callable[[Path], None] | None = None) -> list[Path]:
    """Compute and write every figure of :data:`FIGURES` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpokitError(f"cannot create output directory {out}: "
                          f"{error.strerror or error}") from None
    rate = rate or measure_scoring_rate()
    space = builtin_space()
    builders: dict[str, Callable[[], Figure]] = {
        "gaussian_kl.png": gaussian_kl_figure,
        "argmax_argmin.png": argmax_argmin_figure,
        "scale_shift.png": scale_shift_figure,
        "worked_example_beta.png": worked_example_figure,
        "partition_growth.png": lambda: partition_growth_figure(rate),
        "monte_carlo_partition.png": lambda: monte_carlo_figure(monte_carlo_study(
            space, betas=(5.0, 1.0, 0.3, 0.1), sample_sizes=(10, 100, 1000, 10000))),
    }
    written = []
    for name in FIGURES:
        path = out / name
        save_figure(builders[name](), path)
        written.append(path)
        if on_written:
            on_written(path)
    return written

