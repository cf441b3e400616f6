"""``fedglmm anova``: fit several nested models over the same sites and compare them as lme4's
``anova()`` does (likelihood-ratio tests, AIC, BIC; REML fits refitted by ML first)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, List

import typer

from ..model.options import MIN_GROUP
from .app import ClickException, DebugOption, JsonOption, QuietOption, UsageError, app, check_json_target, set_debug
from .fit import (DataArg, FamilyOpt, FederationOpt, InsecureOpt, LinkOpt, MethodOpt, MinGroupOpt, NagqOpt, RemlOpt,
                  RootCertOpt, SiteColumnOpt, SiteConfigOpt, SitesOpt, TimeoutOpt, _request, with_warnings)

FormulasOpt = Annotated[List[str], typer.Option(
    "--formula", "-f", show_default=False, help="A model's formula; give two or more (-f F0 -f F1 ...).")]


@app.command()
def anova(ctx: typer.Context, data: DataArg = None, formula: FormulasOpt = ..., family: FamilyOpt = "gaussian",
          link: LinkOpt = None, nagq: NagqOpt = 1, reml: RemlOpt = True, site_column: SiteColumnOpt = None,
          method: MethodOpt = "hybrid", min_group: MinGroupOpt = MIN_GROUP, site_config: SiteConfigOpt = None,
          federation: FederationOpt = None, sites_expected: SitesOpt = None, timeout: TimeoutOpt = 60.0,
          root_certificates: RootCertOpt = None, insecure: InsecureOpt = False, json_out: JsonOption = None,
          quiet: QuietOption = False, debug: DebugOption = False) -> None:
    """Compare nested models fitted over the same sites: lme4's anova() table (npar, AIC, BIC, logLik,
    deviance, Chisq, Df, Pr(>Chisq))."""
    set_debug(debug)
    if len(formula) < 2:
        raise UsageError("anova compares at least two models: give -f F0 -f F1 ...", ctx=ctx)
    reqs = [_request(ctx, f, family, link, nagq=nagq, reml=reml, method=method) for f in formula]
    check_json_target(ctx, json_out)
    data = list(data or [])
    if federation is not None:
        if data or site_column is not None or site_config is not None:
            raise UsageError("--federation compares models over the connected sites: give no data files, "
                             "--site-column or --site-config", ctx=ctx)
        from ..deploy.cli import with_federation

        where = dict(root_certificates=root_certificates, insecure=insecure, sites=sites_expected, timeout=timeout)
        table = with_warnings(lambda on_round: with_federation(
            federation, lambda t: _compare(t, reqs), on_round=on_round, **where), quiet, "comparing")
    else:
        if not data:
            raise UsageError("no data files given", ctx=ctx)
        if site_column is not None and len(data) > 1:
            raise UsageError("--site-column splits one file into sites; give one file or drop --site-column",
                             ctx=ctx)
        from ..api import as_site_config, make_sites
        from ..io import load_sites
        from ..transport import InProcessTransport

        config = as_site_config(site_config)
        frames = load_sites(data, site_column)
        table = with_warnings(lambda on_round: _compare(InProcessTransport(
            make_sites(frames, None, min_group, config), on_round=on_round), reqs), quiet, "comparing")
    _emit(table, json_out, quiet)


def _compare(transport, reqs):
    """Each model fitted over the same sites (each counting its own rounds), then compared."""
    from ..comparison import anova as compare
    from ..api import run
    from ..transport.scoped import Scoped

    fits = [run(Scoped(transport), r) for r in reqs]
    return compare(*fits)


def _emit(table, json_out, quiet):
    from ..comparison import format_anova

    if json_out is not None:
        text = json.dumps(_jsonable(table), indent=2, allow_nan=False)
        if json_out == "-":
            typer.echo(text)
            return
        try:
            Path(json_out).write_text(text + "\n")
        except OSError as e:
            raise ClickException(f"cannot write --json '{json_out}': {e.strerror or e}") from None
    typer.echo(format_anova(table))
    if json_out is not None and not quiet:
        typer.echo(f"wrote {json_out}", err=True)


def _jsonable(table) -> dict:
    def val(v):
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    rows = []
    for name, r in table.iterrows():
        rows.append({"model": str(name), **{k: val(None if str(r[k]) in ("<NA>", "nan") else
                                                   (int(r[k]) if k in ("npar", "Df") else float(r[k])))
                                            for k in table.columns}})
    return {"models": table.attrs.get("formulas", {}), "table": rows, "notes": table.attrs.get("notes", []),
            "rounds": table.attrs.get("rounds")}
