"""The one-shot method: every site sends one message, once (:mod:`fedglmm.site.summaries`), and the
coordinator fits from the messages alone (:mod:`fedglmm.coordinator.virtual`): exactly for gaussian
models (per-group sufficient statistics), from pseudo-data with the shared moments otherwise."""
from __future__ import annotations

import time

from ..coordinator.assemble import assemble, shared_note
from ..coordinator.messages import merge_messages
from ..coordinator.rounds import pooled_transforms
from ..coordinator.schema import check_outcome
from ..coordinator.shared_blocks import ONE_SHOT_NOTE, merge_shared_levels
from ..coordinator.shared_rounds import shared_setup
from ..likelihood.setup import make_setup
from ..coordinator.rounds import setup_request
from ..coordinator.session import Link, Session
from ..coordinator.virtual import fit_stand_ins, stand_ins
from ..errors import FedGLMMError
from ..model.frame import na_payload
from ..model.options import FitRequest
from ..protocol import request
from ..results import FitResult, RunStats


def fit_from_messages(messages: dict, req: FitRequest, rounds: int = 0, bytes_to: int = 0, bytes_from: int = 0,
                      seed: int = 0, transforms: dict | None = None) -> FitResult:
    """The one-shot fit from the sites' messages (the method ``oneshot`` and ``fit --summaries``)."""
    t0 = time.perf_counter()
    merged = merge_messages(messages, req.formula, req.family, transforms, req.spec)
    totals = make_setup(merged.setup, req.family.ndisp)
    check_outcome(totals, req.spec, req.family)
    if merged.refused:
        raise FedGLMMError(merged.refused[0])
    shared = merge_shared_levels(merged)          # gaussian, one factor: exact by level
    if merged.schema.shared and shared is None:
        f, levels = next(iter(merged.schema.shared.items()))
        raise FedGLMMError(f"group '{f}' level '{next(iter(levels))}' is present at several sites: the one-shot "
                           "method needs each group at one site (method='hybrid' or 'iterative' fits shared levels)")
    parts, diagnostics = stand_ins(shared or merged, messages, req.options, seed)
    schema, setup, est = fit_stand_ins(parts, req.spec, req.family, req.options, merged.schema.transforms)
    # (follow-up rounds evaluate the shared levels as such: the set-up of the sites' own totals with them)
    internals = (schema, setup if shared is None else shared_setup(totals, merged.schema), est)
    fit = assemble(req.formula, req.family, req.options, req.spec, schema, setup, est)
    if req.family.name == "gaussian":
        fit.method = f"one-shot {fit.method} (exact, from per-group sufficient statistics)"
        fit.messages += [shared_note(internals[1], ONE_SHOT_NOTE)] if shared is not None else []
    else:
        err = max(d["max_rel_error"] for d in diagnostics.values())
        order = messages[next(iter(messages))]["order"]
        fit.method = f"one-shot {fit.method} on pseudo-data (moments up to order {order})"
        fit.messages.append(f"pseudo-data match the shared moments to {err:.1e} (largest relative error); "
                            "the log-likelihood is that of the pseudo-data")
    run = RunStats(rounds, bytes_to, bytes_from, time.perf_counter() - t0, tuple(messages))
    res = FitResult.build(fit, run)
    # no line to the sites (summary files); fit_oneshot gives it its transport
    res.session = Session(Link(None), req.formula, req.family, req.options, req.spec, *internals)
    return res


def fit_oneshot(transport, req: FitRequest, seed: int = 0) -> FitResult:
    """One round: every site sends its one message; the coordinator fits from them."""
    fam = req.family
    transforms = pooled_transforms(transport, req.formula, req.spec, fam, req.na_action)    # center(x), ...: a round
    replies = transport.broadcast(request("oneshot", formula=req.formula, family=fam.name, link=fam.link,
                                          order=req.moments, **na_payload(req.na_action),
                                          **({"transforms": transforms} if transforms else {}),
                                          **req.spec.columns_payload))
    res = fit_from_messages(replies, req, transport.rounds, transport.bytes_to_sites, transport.bytes_from_sites,
                            seed, transforms)
    res.session.link = Link(transport, setup=setup_request(req.formula, fam, req.options, res.session.schema,
                                                           req.na_action, req.spec.columns_payload))
    return res
