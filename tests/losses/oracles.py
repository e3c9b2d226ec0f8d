"""Independent float64 oracles for every loss, in plain Python ``math`` on lists of floats.

Written from the papers' / TRL's formulas in their textbook form (1 − σ rather than σ(−·),
p·log(p/q) for a KL, t^(α−1) for a ratio t), one pair at a time. Valid for moderate inputs
(|β·margin| ≲ 30) where nothing overflows; the extreme-value tests in ``test_variants`` cover the
rest. ``ORACLES`` must name exactly the registered losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Pairs:
    """A batch of pairs as Python floats (summed log-probs and token counts ≥ 1)."""

    pc: list[float]  # log π_θ(y_w)
    pr: list[float]  # log π_θ(y_l)
    rc: list[float]  # log π_ref(y_w)
    rr: list[float]  # log π_ref(y_l)
    lc: list[float]  # |y_w|
    lr: list[float]  # |y_l|
    m: list[float] | None = None  # per-pair margin from the data (ODPO's offset before α)
    s: list[float] | None = None  # per-pair soft label p = P(y_w ≻ y_l) from the data


@dataclass(frozen=True)
class Params:
    beta: float
    eps: float = 0.0  # label_smoothing
    tau: float = 0.05  # discopop_tau
    gamma: float = 0.5  # simpo_gamma
    delta: float = 0.0  # bco_delta
    f: str = "reverse_kl"
    alpha: float = 0.5
    odpo_alpha: float = 1.0
    dpop_lambda: float = 50.0

    def hyper_parameters(self) -> dict[str, float]:
        """The values above under the names ``dpo_loss`` takes (the registry's declarations)."""
        return {"label_smoothing": self.eps, "discopop_tau": self.tau, "simpo_gamma": self.gamma,
                "bco_delta": self.delta, "odpo_alpha": self.odpo_alpha,
                "dpop_lambda": self.dpop_lambda}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def log_sigmoid(z: float) -> float:
    return math.log(sigmoid(z))


def score(u: float, f: str, alpha: float) -> float:
    """f'(t) at t = π_θ/π_ref = exp(u), dropping the constants TRL 1.x drops."""
    t = math.exp(u)
    if f == "reverse_kl":
        return math.log(t)
    if f == "forward_kl":
        return 1.0 - 1.0 / t
    if f == "js_divergence":
        return math.log(2.0 * t / (1.0 + t))
    if f == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return math.log(t)
        return (t ** (alpha - 1.0) - 1.0) / (alpha - 1.0)
    raise ValueError(f)


def _cdpo(z: float, eps: float) -> float:
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def _per_pair(p: Pairs):
    return zip(p.pc, p.pr, p.rc, p.rr, p.lc, p.lr, strict=True)


def _margins(p: Pairs, q: Params, per_token: bool = False) -> list[float]:
    out = []
    for pc, pr, rc, rr, lc, lr in _per_pair(p):
        sc, sr = score(pc - rc, q.f, q.alpha), score(pr - rr, q.f, q.alpha)
        out.append(sc / lc - sr / lr if per_token else sc - sr)
    return out


def oracle_sigmoid(p, q):
    return [_cdpo(q.beta * h, q.eps) for h in _margins(p, q)]


def oracle_hinge(p, q):
    return [max(0.0, 1.0 - q.beta * h) for h in _margins(p, q)]


def oracle_ipo(p, q):
    return [(h - 1.0 / (2.0 * q.beta)) ** 2 for h in _margins(p, q, per_token=True)]


def oracle_exo_pair(p, q):
    out = []
    for h in _margins(p, q):
        qw = sigmoid(q.beta * h)
        out.append(qw * math.log(qw / (1.0 - q.eps)) + (1.0 - qw) * math.log((1.0 - qw) / q.eps))
    return out


def oracle_nca_pair(p, q):
    out = []
    for pc, pr, rc, rr, _, _ in _per_pair(p):
        a, b = q.beta * (pc - rc), q.beta * (pr - rr)
        out.append(-log_sigmoid(a) - 0.5 * log_sigmoid(-a) - 0.5 * log_sigmoid(-b))
    return out


def oracle_robust(p, q):
    e = q.eps
    return [((1 - e) * -log_sigmoid(q.beta * h) - e * -log_sigmoid(-q.beta * h)) / (1 - 2 * e)
            for h in _margins(p, q)]


def oracle_bco_pair(p, q):
    return [-log_sigmoid(q.beta * (pc - rc) - q.delta) - log_sigmoid(q.delta - q.beta * (pr - rr))
            for pc, pr, rc, rr, _, _ in _per_pair(p)]


def oracle_sppo_hard(p, q):
    return [(pc - rc - 0.5 / q.beta) ** 2 + (pr - rr + 0.5 / q.beta) ** 2
            for pc, pr, rc, rr, _, _ in _per_pair(p)]


def oracle_aot(p, q):
    policy = sorted(a - b for a, b in zip(p.pc, p.pr, strict=True))
    ref = sorted(a - b for a, b in zip(p.rc, p.rr, strict=True))
    return [_cdpo(q.beta * (a - b), q.eps) for a, b in zip(policy, ref, strict=True)]


def oracle_aot_unpaired(p, q):
    chosen = sorted(a - b for a, b in zip(p.pc, p.rc, strict=True))
    rejected = sorted(a - b for a, b in zip(p.pr, p.rr, strict=True))
    return [_cdpo(q.beta * (a - b), q.eps) for a, b in zip(chosen, rejected, strict=True)]


def oracle_apo_zero(p, q):
    return [1.0 - sigmoid(q.beta * (pc - rc)) + sigmoid(q.beta * (pr - rr))
            for pc, pr, rc, rr, _, _ in _per_pair(p)]


def oracle_apo_down(p, q):
    return [sigmoid(q.beta * (pc - rc)) + 1.0 - sigmoid(q.beta * ((pc - rc) - (pr - rr)))
            for pc, pr, rc, rr, _, _ in _per_pair(p)]


def oracle_discopop(p, q):
    out = []
    for h in _margins(p, q):
        z = q.beta * h
        m = sigmoid(z / q.tau)
        out.append(-log_sigmoid(z) * (1.0 - m) + math.exp(-z) * m)
    return out


def oracle_sft(p, q):
    nll = -math.fsum(p.pc) / math.fsum(p.lc)
    return [nll] * len(p.pc)


def oracle_sigmoid_norm(p, q):
    return [-log_sigmoid(q.beta * h) for h in _margins(p, q, per_token=True)]


def oracle_simpo(p, q):
    return [_cdpo(q.beta * (pc / lc - pr / lr) - q.gamma, q.eps)
            for pc, pr, _, _, lc, lr in _per_pair(p)]


def oracle_odpo(p, q):
    return [-log_sigmoid(q.beta * h - q.odpo_alpha * m) for h, m in zip(_margins(p, q), p.m,
                                                                        strict=True)]


def oracle_sigmoid_soft(p, q):
    """Cross-entropy to the soft label: −p log σ(βh) − (1 − p) log σ(−βh)."""
    return [-s * log_sigmoid(q.beta * h) - (1.0 - s) * log_sigmoid(-q.beta * h)
            for h, s in zip(_margins(p, q), p.s, strict=True)]


def oracle_dpop(p, q):
    """Pal et al. eq. 3: −log σ(β(h − λ·max(0, log(π_ref(y_w)/π_θ(y_w)))))."""
    return [-log_sigmoid(q.beta * ((pc - rc) - (pr - rr) - q.dpop_lambda * max(0.0, rc - pc)))
            for pc, pr, rc, rr, _, _ in _per_pair(p)]


ORACLES = {name.removeprefix("oracle_"): fn for name, fn in list(globals().items())
           if name.startswith("oracle_")}
