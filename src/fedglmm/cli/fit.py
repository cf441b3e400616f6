"""``fedglmm fit``, ``fedglmm summarize`` and ``fedglmm demo``: a fit from data files, summary files or a
federation, printed as an lme4-style summary or written as JSON."""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Callable, Iterator, List, Optional

import typer

from ..model.options import MIN_GROUP
from .app import ClickException, DebugOption, JsonOption, QuietOption, UsageError, app, check_json_target, \
    imports_loaded, one_line, set_debug

DEMO_FORMULA = "use ~ urban + age + I(age**2) + livch + (1 | district)"
DEMO_FAMILY = "binomial"
DEMO_SITE_COLUMN = "region"
DEMO_FILE = "contraception.csv"

DataArg = Annotated[Optional[List[Path]], typer.Argument(
    metavar="[DATA...]", show_default=False,
    help="Data files, one per site (.csv, .csv.gz, .tsv, .parquet; the site id is the file name), "
         "or one file split by --site-column. Not with --summaries.")]
FormulaOpt = Annotated[str, typer.Option(
    "--formula", "-f", show_default=False, help="lme4-style formula, e.g. 'use ~ urban + age + (1 | district)'.")]
FamilyOpt = Annotated[str, typer.Option(
    "--family", help="gaussian, binomial, poisson, negative_binomial (nbinom2) or gamma (Gamma).")]
LinkOpt = Annotated[Optional[str], typer.Option(
    "--link", show_default=False,
    help="Link function (binomial: logit, probit, cloglog; gamma: inverse, log, identity). Default: logit for "
         "binomial, log for poisson and negative_binomial, inverse for gamma (R's).")]
NagqOpt = Annotated[int, typer.Option(
    "--nagq", min=1, help="1: Laplace approximation; K > 1: adaptive Gauss-Hermite with K nodes.")]
RemlOpt = Annotated[bool, typer.Option(
    "--reml/--ml", help="REML or maximum likelihood (gaussian models; others are always ML).")]
SiteColumnOpt = Annotated[Optional[str], typer.Option(
    "--site-column", "-s", show_default=False, help="Column of the (single) data file naming each row's site.")]
MethodOpt = Annotated[str, typer.Option(
    "--method", help="hybrid (the default: one round of summaries, then exact Newton rounds; the pooled fit in "
                     "few rounds), iterative (exact Newton rounds from site totals), or oneshot (one round; exact "
                     "for gaussian, pseudo-data otherwise).")]
MomentsOpt = Annotated[Optional[int], typer.Option(
    "--moments", min=2, max=4, show_default=False,
    help="Order K of the per-group moments for one-shot binomial/poisson fits (default 4; hybrid: 2).")]
MinGroupOpt = Annotated[int, typer.Option(
    "--min-group", min=1, help="Smallest group whose own summaries a site sends (one-shot, hybrid).")]
SummariesOpt = Annotated[Optional[List[Path]], typer.Option(
    "--summaries", show_default=False,
    help="Fit from the sites' summary files (written by 'fedglmm summarize') instead of data.")]
CurvatureOpt = Annotated[str, typer.Option(
    "--curvature", help="probit/cloglog only: 'observed' (exact Laplace, as glmmTMB) or 'expected' "
                        "(Fisher weights, as lme4's glmer).")]
PenaltyOpt = Annotated[float, typer.Option(
    "--penalty", min=0.0, help="λ of an L2 penalty λ‖β‖² on the fixed effects but the intercept (binomial, "
                               "poisson).")]
SiteConfigOpt = Annotated[Optional[Path], typer.Option(
    "--site-config", show_default=False,
    help="A site.toml whose disclosure rules (and audit log) every site applies; its min_group replaces "
         "--min-group.")]
FederationOpt = Annotated[Optional[str], typer.Option(
    "--federation", metavar="HOST:PORT", show_default=False,
    help="Fit over the sites connected to the coordinator's SuperLink at HOST:PORT (run on the coordinator: "
         "127.0.0.1:PORT) instead of data files.")]
SitesOpt = Annotated[Optional[int], typer.Option(
    "--sites", min=1, show_default=False,
    help="With --federation: wait for exactly N sites (default: the sites connected, at least one).")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, help="With --federation: seconds a site may take per round (and to connect).")]
RootCertOpt = Annotated[Optional[Path], typer.Option(
    "--root-certificates", show_default=False, help="With --federation: the federation's CA certificate (ca.pem).")]
DdfOpt = Annotated[str, typer.Option(
    "--ddf", help="Gaussian models: t-tests with 'satterthwaite' degrees of freedom (as lmerTest), or 'none' "
                  "for z-tests.")]
CiOpt = Annotated[str, typer.Option(
    "--ci", help="'profile' adds profile-likelihood intervals for the fixed effects, random-effect SDs and "
                 "correlations and sigma (a few more rounds); 'wald' (the default) adds none.")]
DiagnosticsOpt = Annotated[bool, typer.Option(
    "--diagnostics", help="One more round: binned residual aggregates from every site (uniformity and dispersion "
                          "tests, scaled residuals in the summary).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the diagnostics' randomised residuals.")]
PlotsOpt = Annotated[Optional[Path], typer.Option(
    "--plots", metavar="DIR", show_default=False,
    help="Write the figures (caterpillar, forest, residuals with --diagnostics, convergence) as PNG files into "
         "DIR (needs matplotlib: pip install 'fedglmm[plot]').")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="With --federation: no TLS (loopback addresses only).")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    "--weights", metavar="COL", show_default=False,
    help="Column of prior weights (finite, ≥ 0): gaussian, precision weights (as lmer); binomial, the trials of a "
         "proportion outcome (as cbind); poisson, negative_binomial, gamma, each row's log-likelihood weight "
         "(as glmmTMB).")]
OffsetOpt = Annotated[Optional[str], typer.Option(
    "--offset", metavar="COL", show_default=False,
    help="Column added to the linear predictor, as offset(COL) in the formula.")]
NaActionOpt = Annotated[str, typer.Option(
    "--na-action", help="Rows with a missing value in a column the model uses: 'omit' (each site drops them "
                        "and the fit counts them, as lme4) or 'fail' (stop with the first one).")]
SepOpt = Annotated[Optional[str], typer.Option(
    "--sep", show_default=False, help="Field separator of the text files, e.g. ';' or '\\t' (default: ',' for "
                                      ".csv, a tab for .tsv).")]
EncodingOpt = Annotated[Optional[str], typer.Option(
    "--encoding", show_default=False, help="Text encoding of the files, e.g. latin-1 or cp1252 (default: UTF-8).")]


def _reading(ctx, sep, encoding):
    """--sep and --encoding, checked before any file is read: a wrong one is a usage error."""
    from ..errors import InputError
    from ..io import check_encoding, check_sep

    try:
        return check_sep(sep), check_encoding(encoding)
    except InputError as e:
        raise UsageError(str(e), ctx=ctx) from None


def _option(ctx, check, value):
    """A checked option; a wrong value is a usage error."""
    from ..model.options import OptionError

    try:
        return check(value)
    except OptionError as e:
        raise UsageError(str(e), ctx=ctx) from None


SecureOpt = Annotated[Optional[bool], typer.Option(
    "--secure-aggregation/--no-secure-aggregation", show_default=False,
    help="Mask every site's sums so the coordinator sees each round's sums only as totals over sites (same "
         "results). Default: on with --federation and 3 or more sites (methods hybrid and iterative), off "
         "in-process, where the sites share the coordinator's process.")]
AllowNonconvergenceOpt = Annotated[bool, typer.Option(
    "--allow-nonconvergence",
    help="Print a fit that did not converge (estimates that run off under separation, a variance growing "
         "without bound) and exit 0; without it such a fit is an error (exit 1; --json still records it with "
         "converged false).")]


def _request(ctx, formula, family, link, **options):
    """The validated fit request; an option that is wrong whatever the data is a usage error."""
    from ..model.options import OptionError, fit_request

    try:
        return fit_request(formula, family, link, **options)
    except OptionError as e:
        raise UsageError(str(e), ctx=ctx) from None


@app.command(no_args_is_help=False)
def fit(ctx: typer.Context, data: DataArg = None, formula: FormulaOpt = ..., family: FamilyOpt = "gaussian",
        link: LinkOpt = None, nagq: NagqOpt = 1, reml: RemlOpt = True, site_column: SiteColumnOpt = None,
        method: MethodOpt = "hybrid", moments: MomentsOpt = None, min_group: MinGroupOpt = MIN_GROUP,
        summaries: SummariesOpt = None, curvature: CurvatureOpt = "observed", penalty: PenaltyOpt = 0.0,
        site_config: SiteConfigOpt = None, federation: FederationOpt = None, sites_expected: SitesOpt = None,
        timeout: TimeoutOpt = 60.0, root_certificates: RootCertOpt = None, insecure: InsecureOpt = False,
        na_action: NaActionOpt = "omit", sep: SepOpt = None, encoding: EncodingOpt = None,
        weights: WeightsOpt = None, offset: OffsetOpt = None, ddf: DdfOpt = "satterthwaite", ci: CiOpt = "wald",
        diagnostics: DiagnosticsOpt = False, seed: SeedOpt = 0, plots: PlotsOpt = None,
        secure_aggregation: SecureOpt = None, allow_nonconvergence: AllowNonconvergenceOpt = False,
        json_out: JsonOption = None, quiet: QuietOption = False, debug: DebugOption = False) -> None:
    """Fit a GLMM federated over sites and print an lme4-style summary."""
    set_debug(debug)
    req = _request(ctx, formula, family, link, nagq=nagq, reml=reml, method=method, curvature=curvature,
                   moments=moments, penalty=penalty, na_action=na_action, weights=weights, offset=offset)
    from ..model.options import analysis_request

    analysis = _option(ctx, lambda _: analysis_request(ddf, ci, 0.95, diagnostics, seed), None)
    sep, encoding = _reading(ctx, sep, encoding)
    check_json_target(ctx, json_out)
    check_plots_target(ctx, plots)
    emit = lambda res, **kw: _emit(res, json_out, quiet, plots=plots, allow=allow_nonconvergence, **kw)  # noqa: E731
    data = list(data or [])
    if federation is not None:
        if data or summaries or site_column is not None or site_config is not None:
            raise UsageError("--federation fits over the connected sites, under their own rules: give no data "
                             "files, --summaries, --site-column or --site-config", ctx=ctx)
        where = dict(address=federation, root_certificates=root_certificates, insecure=insecure,
                     sites=sites_expected, timeout=timeout, secure_aggregation=secure_aggregation)
        emit(_run_fit(req, None, quiet=quiet, federation=where, analysis=analysis))
        return
    if sites_expected is not None or root_certificates is not None or insecure:
        raise UsageError("--sites, --root-certificates and --insecure go with --federation", ctx=ctx)
    if summaries and site_config is not None:
        raise UsageError("--site-config applies to sites fitted from data files; summaries were made under "
                         "each site's own rules ('fedglmm summarize --site-config')", ctx=ctx)
    if summaries and secure_aggregation:
        raise UsageError("--secure-aggregation applies to rounds of sums, not to one-shot summary files", ctx=ctx)
    if summaries:
        # '--summaries a.json b.json': the option takes the first file, the rest arrive as arguments
        from ..api import fit_summaries

        imports_loaded()
        if analysis.ci != "wald" or analysis.diagnostics:
            raise UsageError("--ci profile and --diagnostics need rounds at the sites; summary files have none",
                             ctx=ctx)
        res = fit_summaries(list(summaries) + data, formula, family=family, link=link, nagq=nagq, reml=reml,
                            curvature=curvature, weights=weights, offset=offset)
        res.ddf = analysis.ddf
        emit(res)
        return
    if not data:
        raise UsageError("no data files given (or use --summaries)", ctx=ctx)
    if site_column is not None and len(data) > 1:
        raise UsageError(f"--site-column splits one file into sites, but {len(data)} files were given and "
                         "each file is already a site: give one file or drop --site-column", ctx=ctx)
    from ..io import load_sites, used_columns
    from ..site import SiteConfig

    config = SiteConfig.load(site_config) if site_config is not None else None
    # only the columns the model uses are read (Parquet by column; text files parsed for those columns only;
    # every column for a formula with '.')
    sites = load_sites(data, site_column, sep=sep, encoding=encoding,
                       columns=used_columns(formula, site_column, weights, offset))
    from ..model.options import expand_request

    req = expand_request(req, next(iter(sites.values())).columns, site_column)     # y ~ .
    emit(_run_fit(req, sites, quiet=quiet, min_group=min_group, site_config=config, analysis=analysis,
                  secure_aggregation=bool(secure_aggregation)))


@app.command()
def summarize(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(metavar="DATA", show_default=False, help="This site's data file.")],
    formula: Annotated[str, typer.Option("--formula", "-f", show_default=False, help="lme4-style formula.")],
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False,
                                         help="Where to write the site's summaries (JSON).")],
    family: FamilyOpt = "gaussian",
    link: Annotated[Optional[str], typer.Option("--link", show_default=False, help="Link function.")] = None,
    site_id: Annotated[Optional[str], typer.Option(
        "--site-id", show_default=False, help="This site's name (default: the file name).")] = None,
    moments: Annotated[int, typer.Option(
        "--moments", min=2, max=4, help="Order K of the per-group moments (binomial/poisson).")] = 4,
    min_group: Annotated[int, typer.Option(
        "--min-group", min=1, help="Smallest group whose own summaries may leave the site.")] = MIN_GROUP,
    site_config: Annotated[Optional[Path], typer.Option(
        "--site-config", show_default=False,
        help="This site's site.toml: its rules are applied (its min_group replaces --min-group) and the "
             "message is recorded in its audit log.")] = None,
    na_action: NaActionOpt = "omit", sep: SepOpt = None, encoding: EncodingOpt = None,
    weights: WeightsOpt = None, offset: OffsetOpt = None, debug: DebugOption = False,
) -> None:
    """Write this site's one-shot message as readable JSON, for the data steward to review and send."""
    set_debug(debug)
    req = _request(ctx, formula, family, link, method="oneshot", moments=moments, na_action=na_action,
                   weights=weights, offset=offset)
    sep, encoding = _reading(ctx, sep, encoding)
    import json

    from .. import protocol
    from ..errors import SiteRefusal
    from ..io import read_table
    from ..model.frame import na_payload
    from ..site import Site, SiteConfig
    from ..site.summaries import to_jsonable

    frame = read_table(data, sep, encoding)
    from ..model.options import expand_request

    req = expand_request(req, frame.columns)                                        # y ~ .
    # through the site itself: the same rows (incomplete ones omitted), the same rules and, with a
    # site.toml, the same audit line as a networked request
    config = SiteConfig.load(site_config) if site_config is not None else None
    site = Site(site_id or data.stem, frame, min_group=min_group, config=config)
    request = protocol.request("oneshot", formula=req.formula, family=family, link=link, order=moments,
                               **na_payload(req.na_action), **req.spec.columns_payload)
    msg = protocol.decode(site.handle(protocol.encode(request)))
    if "error" in msg:
        raise SiteRefusal(msg["error"])
    try:
        output.write_text(json.dumps(to_jsonable(msg), indent=1) + "\n")
    except OSError as e:
        raise ClickException(f"cannot write '{output}': {e.strerror or e}") from None
    what = msg["refused"] or (f"{len(msg['groups']['levels'])} groups of {msg['n']} rows")
    typer.echo(f"wrote {output}: site '{msg['site']}', {what}", err=True)


@contextmanager
def _progress(quiet: bool, label: str) -> Iterator[Optional[Callable[[int, str], None]]]:
    """An ``on_round`` callback showing "round k: kind" on stderr, or None when silent."""
    if quiet or not _stderr_is_terminal():
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"{label}: starting") as status:
        def on_round(number: int, kind: str) -> None:
            status.update(f"{label}: round {number}: {kind}")

        yield on_round


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _run_fit(req, sites, *, quiet, label="fitting", min_group=MIN_GROUP, site_config=None, federation=None,
             analysis=None, secure_aggregation=False):
    """The fit (in-process sites, or the federation at ``federation["address"]``) and its post-fit rounds."""
    def work(on_round):
        if federation is not None:                     # the sites are across the network
            from ..deploy.cli import fit_federated

            imports_loaded()
            return fit_federated(federation.pop("address"), req, on_round=on_round, analysis=analysis,
                                 **federation)
        from ..api import fit_request_on_data

        imports_loaded()
        return fit_request_on_data(req, sites, min_group=min_group, site_config=site_config, on_round=on_round,
                                   analysis=analysis, secure_aggregation=secure_aggregation)

    return with_warnings(work, quiet, label)


def with_warnings(work, quiet: bool, label: str):
    """``work(on_round)`` with progress on a terminal, and its warnings shown once each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _progress(quiet, label) as on_round:
            res = work(on_round)
    if not quiet:
        shown = set()
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                continue
            text = one_line(str(w.message))
            if text not in shown:
                shown.add(text)
                typer.echo(f"warning: {text}", err=True)
    return res


def check_plots_target(ctx, plots: Path | None) -> None:
    if plots is None:
        return
    if plots.exists() and not plots.is_dir():
        raise UsageError(f"--plots '{plots}' is a file; give a folder", ctx=ctx)
    if not plots.parent.is_dir():
        raise UsageError(f"cannot write --plots '{plots}': folder '{plots.parent}' does not exist", ctx=ctx)


def _emit(res, json_out: str | None, quiet: bool, note: str | None = None, plots: Path | None = None,
          allow: bool = False) -> None:
    """Write the JSON and the figures first (a failed write prints no fit), then the summary and the note.
    A fit that did not converge is an error unless ``allow``: its JSON (converged false) is still written
    to a file, but nothing is presented as a fit."""
    if json_out is not None and json_out != "-":
        try:
            res.to_json(json_out)
        except OSError as e:
            raise ClickException(f"cannot write --json '{json_out}': {e.strerror or e}") from None
    if plots is not None:
        from ..plots import save_all

        written = save_all(res, plots)
        if not quiet:
            typer.echo(f"wrote {len(written)} figure(s) to {plots}: {', '.join(p.name for p in written)}", err=True)
    if not res.converged and not allow:
        from ..errors import ConvergenceError

        why = next((m for m in res.messages if m.startswith("not converged")), "the fit did not converge")
        raise ConvergenceError(f"{why} (--allow-nonconvergence prints the estimates anyway)")
    if json_out == "-":
        typer.echo(res.to_json())
        if note and not quiet:
            typer.echo(note, err=True)
        return
    typer.echo(res.summary())
    if note:
        typer.echo("")
        typer.echo(note)
    if json_out is not None and not quiet:
        typer.echo(f"wrote {json_out}", err=True)


@app.command()
def demo(ctx: typer.Context, json_out: JsonOption = None, quiet: QuietOption = False, debug: DebugOption = False) -> None:
    """Fit the bundled contraception data split over 4 regional sites (binomial, Laplace)."""
    set_debug(debug)
    check_json_target(ctx, json_out)
    from ..io import load_sites
    from ..model.options import fit_request

    req = fit_request(DEMO_FORMULA, DEMO_FAMILY, None, nagq=1, reml=False)
    with resources.as_file(resources.files("fedglmm") / "data" / DEMO_FILE) as path:
        sites = load_sites([path], DEMO_SITE_COLUMN)
    res = _run_fit(req, sites, quiet=quiet, label="demo")
    ngroups = sum(res.ngroups.values())
    note = (f"demo: fitted the Bangladesh contraception survey ({res.nobs} women, {ngroups} districts) "
            f"federated over {res.nsites} sites split by '{DEMO_SITE_COLUMN}' ({', '.join(res.site_ids)}): "
            f"{res.rounds} rounds, {res.bytes_to_sites:,} bytes sent to the sites and "
            f"{res.bytes_from_sites:,} bytes back; no row left its site.")
    _emit(res, json_out, quiet, note=note)
