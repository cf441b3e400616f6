"""The L2-penalty path of seed 001: fit λ = 0, 1, …, 10 and choose λ by AIC or BIC on validation data.

Each λ is an ordinary federated fit (:func:`fedglmm.fit` with ``penalty=λ``) on the training rows.  The
validation rows stay at their sites too: after a set-up round, one ``evaluate`` round carries every λ's
estimate as a point, and each site returns its validation log-likelihood at each (the same Laplace /
AGHQ approximation, with the random effects integrated out).  The criterion is −2ℓ_validation + 2k
(AIC) or + k log n_validation (BIC), with k the number of parameters; the λ with the smallest value is
chosen.  The seed selects on the validation log-likelihood through a softmax instead, which is not a
likelihood; this follows the criterion it names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .api import fit, make_sites, split_sites
from .errors import InputError
from .model.families import get_family
from .protocol import request
from .results import FitResult
from .transport import InProcessTransport


@dataclass
class PathResult:
    best: FitResult
    table: pd.DataFrame          # one row per λ: train logLik, validation logLik, AIC, BIC
    fits: dict                   # λ -> FitResult
    criterion: str

    @property
    def penalty(self) -> float:
        return float(self.table.loc[self.table[self.criterion.upper()].idxmin(), "lambda"])


def train_validation(data, site: str | None = None, fraction: float = 0.3, seed: int = 0):
    """Split every site's rows at random into training and validation parts (the seed's 7:3)."""
    frames = split_sites(data, site)
    rng = np.random.default_rng(seed)
    train, valid = {}, {}
    for sid, frame in frames.items():
        mask = rng.random(len(frame)) < fraction
        train[sid], valid[sid] = frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)
    return train, valid


def validation_loglik(results: list[FitResult], validation: dict, nagq: int = 1) -> np.ndarray:
    """Each fit's log-likelihood on the validation rows, computed by the sites in two rounds."""
    ref = results[0]
    fam = ref.family
    from .coordinator.rounds import schema_payload

    transport = InProcessTransport(make_sites(validation))
    setup = request("setup", formula=ref.formula, family=fam.name, link=fam.link, nagq=nagq, reml=False,
                    curvature="observed",
                    schema=schema_payload(ref.schema))            # levels and transforms' state of the fit
    replies = transport.broadcast(setup)
    first = next(iter(replies.values()))
    if list(first["x_names"]) != list(ref.fixef.index):
        raise InputError("the validation data give other design columns than the training data")
    p, q = len(ref.fixef), len(first["z_names"])
    points = np.array([np.r_[r.fixef.to_numpy(), r.theta] for r in results])
    rep = transport.broadcast(request("evaluate", points=points, transform=np.eye(p), zscale=np.ones(q)))
    return np.array([sum(float(r["points"][i]["value"]) for r in rep.values()) for i in range(len(points))])


def fit_path(formula: str, data=None, *, validation=None, site: str | None = None, family: str = "binomial",
             lambdas=tuple(range(11)), criterion: str = "bic", fraction: float = 0.3, seed: int = 0,
             **kwargs) -> PathResult:
    """Fit every λ on the training data and choose by AIC or BIC on the validation data.

    ``validation`` (same forms as ``data``) gives validation rows; otherwise each site's rows are split
    at random, ``fraction`` of them for validation (the seed's 7:3).
    """
    if criterion.lower() not in ("aic", "bic"):
        raise InputError(f"criterion must be 'aic' or 'bic', not '{criterion}'")
    fam = get_family(family, kwargs.get("link"))
    if fam.name == "gaussian":
        raise InputError("the penalty path is available for binomial and poisson models")
    if validation is None:
        train, valid = train_validation(data, site, fraction, seed)
    else:
        train, valid = split_sites(data, site), split_sites(validation, site)
    lambdas = [float(v) for v in lambdas]
    fits = {lam: fit(formula, train, family=family, penalty=lam, **kwargs) for lam in lambdas}
    results = [fits[lam] for lam in lambdas]
    ll_val = validation_loglik(results, valid, kwargs.get("nagq", 1))
    n_val = sum(len(v) for v in valid.values())
    k = np.array([r.n_params for r in results])
    table = pd.DataFrame({"lambda": lambdas, "loglik_train": [r.loglik for r in results],
                          "loglik_validation": ll_val, "AIC": -2 * ll_val + 2 * k,
                          "BIC": -2 * ll_val + k * np.log(n_val)})
    best = fits[lambdas[int(np.argmin(table[criterion.upper()]))]]
    return PathResult(best=best, table=table, fits=fits, criterion=criterion.lower())
