#!/usr/bin/env python3
"""Where the rounds of fits with levels shared by sites go: the default method's rounds by kind (the one-shot
round, the Newton rounds' evaluations, the final rounds) on ``stress_shared.py``'s draws.

usage: python3 benchmarks/shared_round_kinds.py [--fits 60] [--seed 0] [--crossed | --wide]

Per fit: its rounds and their kinds in order (``one``, ``eva``, ``fin``); last, the totals by kind and how many
final rounds repeated one (a final round whose value or third derivatives were not yet settled, or whose last step
took a round of its own: README, "Levels shared by sites").  The draws are ``stress_shared.py``'s (its docstring);
only the default method is fitted.  60 one-factor fits take about a minute and a half on a 2-core machine.
"""
from __future__ import annotations

import collections
import warnings

import fedglmm
from stress_shared import draw_arguments


def main() -> None:
    a, drawn = draw_arguments(__doc__.split("\n\n")[0])
    warnings.simplefilter("ignore")
    total, fits, repeats = collections.Counter(), 0, 0
    for i in range(a.seed, a.seed + a.fits):
        family, formula, *_, sites = drawn(i)
        kinds: list[str] = []
        try:
            res = fedglmm.fit(formula, sites, family=family, on_round=lambda _, kind: kinds.append(kind))
        except fedglmm.FedGLMMError as e:
            print(f"{i:4d} ERR {str(e).splitlines()[0][:100]}", flush=True)
            continue
        total.update(kinds)
        fits += 1
        repeats += max(kinds.count("finalize") - 1, 0)
        print(f"{i:4d} {res.rounds:3d}  {' '.join(k[:3] for k in kinds)}", flush=True)
    print(f"{fits} fits, {sum(total.values())} rounds: " + ", ".join(f"{k} {n}" for k, n in sorted(total.items()))
          + f"; final rounds that repeated one: {repeats}")


if __name__ == "__main__":
    main()
