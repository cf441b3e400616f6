"""The command line: ``fedglmm fit``, ``fedglmm summarize``, ``fedglmm demo``, ``fedglmm site log`` and
``fedglmm --version``.

Output contract:

* stdout carries the result only: the printed summary, or the JSON of the fit with ``--json -``;
* stderr carries progress (``round 3: evaluate``, only when stderr is a terminal and ``--quiet`` is not
  given), notes, and errors;
* every error is ONE line ``error: <message>`` on stderr and nothing is printed as a fit.  Exit codes:
  0 success, 1 a data problem (:class:`~fedglmm.errors.FedGLMMError`: unreadable file, bad values, sites
  that disagree, no convergence), 2 a usage problem (unknown option, missing argument, unknown family or
  link, a formula that does not parse), 3 an internal error (``--debug`` shows its traceback).
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Callable, Iterator, List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x ships its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException, UsageError

from . import __version__
from .errors import FedGLMMError

DEMO_FORMULA = "use ~ urban + age + I(age**2) + livch + (1 | district)"
DEMO_FAMILY = "binomial"
DEMO_SITE_COLUMN = "region"
DEMO_FILE = "contraception.csv"

EXIT_DATA, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3

_state = {"debug": False}


# --- error handling: one line, fixed exit codes -------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_error(message: str) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)


class _FedGLMMGroup(TyperGroup):
    """Runs the command group and turns every exception into one ``error:`` line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _state["debug"] = False
        try:
            rv = super().main(args=args, prog_name=prog_name or "fedglmm", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except UsageError as e:
            code = EXIT_USAGE
            _print_error(_usage_message(e))
        except ClickException as e:
            code = e.exit_code or EXIT_DATA
            _print_error(e.format_message())
        except typer.Abort:
            code = 130
            _print_error("aborted")
        except FedGLMMError as e:
            code = EXIT_DATA
            _print_error(str(e))
        except Exception as e:  # noqa: BLE001 - the contract: never a traceback
            if _state["debug"]:
                raise
            code = EXIT_INTERNAL
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            _print_error(f"internal error: {detail} (run with --debug for the traceback)")
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_message(e: UsageError) -> str:
    msg = _one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command_path:
        msg = f"{msg} (see '{ctx.command_path} --help')"
    return msg


app = typer.Typer(
    cls=_FedGLMMGroup,
    name="fedglmm",
    help="Fit generalized linear mixed models (lme4-style) federated over sites that share sums, never rows.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedglmm {__version__}")
        raise typer.Exit()


DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an internal error.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
JsonOption = Annotated[Optional[str], typer.Option(
    "--json", metavar="OUT", help="Also write the fit as JSON to OUT; '-' writes the JSON to stdout "
                                  "instead of the summary.")]


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: DebugOption = False,
) -> None:
    _state["debug"] = _state["debug"] or debug
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# --- fit --------------------------------------------------------------------------------------------

@app.command(no_args_is_help=False)
def fit(
    ctx: typer.Context,
    data: Annotated[Optional[List[Path]], typer.Argument(
        metavar="[DATA...]", show_default=False,
        help="Data files, one per site (.csv, .csv.gz, .tsv, .parquet; the site id is the file name), "
             "or one file split by --site-column. Not with --summaries.")] = None,
    formula: Annotated[str, typer.Option(
        "--formula", "-f", show_default=False,
        help="lme4-style formula, e.g. 'use ~ urban + age + (1 | district)'.")] = ...,
    family: Annotated[str, typer.Option("--family", help="gaussian, binomial or poisson.")] = "gaussian",
    link: Annotated[Optional[str], typer.Option(
        "--link", show_default=False,
        help="Link function (binomial: logit, probit, cloglog). Default: the family's canonical link.")] = None,
    nagq: Annotated[int, typer.Option(
        "--nagq", min=1, help="1: Laplace approximation; K > 1: adaptive Gauss-Hermite with K nodes.")] = 1,
    reml: Annotated[bool, typer.Option(
        "--reml/--ml", help="REML or maximum likelihood (gaussian models; others are always ML).")] = True,
    site_column: Annotated[Optional[str], typer.Option(
        "--site-column", "-s", show_default=False,
        help="Column of the (single) data file naming each row's site.")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="hybrid (the default: one round of summaries, then exact Newton rounds; the pooled "
                         "fit in few rounds), iterative (exact Newton rounds from site totals), or oneshot "
                         "(one round; exact for gaussian, pseudo-data otherwise).")] = "hybrid",
    moments: Annotated[Optional[int], typer.Option(
        "--moments", min=2, max=4, show_default=False,
        help="Order K of the per-group moments for one-shot binomial/poisson fits (default 4; hybrid: 2).")] = None,
    min_group: Annotated[int, typer.Option(
        "--min-group", min=1, help="Smallest group whose own summaries a site sends (one-shot, hybrid).")] = 10,
    summaries: Annotated[Optional[List[Path]], typer.Option(
        "--summaries", show_default=False,
        help="Fit from the sites' summary files (written by 'fedglmm summarize') instead of data.")] = None,
    curvature: Annotated[str, typer.Option(
        "--curvature", help="probit/cloglog only: 'observed' (exact Laplace, as glmmTMB) or 'expected' "
                            "(Fisher weights, as lme4's glmer).")] = "observed",
    penalty: Annotated[float, typer.Option(
        "--penalty", min=0.0, help="λ of an L2 penalty λ‖β‖² on the fixed effects but the intercept "
                                   "(binomial, poisson).")] = 0.0,
    site_config: Annotated[Optional[Path], typer.Option(
        "--site-config", show_default=False,
        help="A site.toml whose disclosure rules (and audit log) every site applies; its min_group replaces "
             "--min-group.")] = None,
    federation: Annotated[Optional[str], typer.Option(
        "--federation", metavar="HOST:PORT", show_default=False,
        help="Fit over the sites connected to the coordinator's SuperLink at HOST:PORT (run on the "
             "coordinator: 127.0.0.1:PORT) instead of data files.")] = None,
    sites_expected: Annotated[Optional[int], typer.Option(
        "--sites", min=1, show_default=False,
        help="With --federation: wait for exactly N sites (default: the sites connected, at least one).")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="With --federation: seconds a site may take per round (and to connect).")] = 60.0,
    root_certificates: Annotated[Optional[Path], typer.Option(
        "--root-certificates", show_default=False,
        help="With --federation: the federation's CA certificate (ca.pem).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="With --federation: no TLS (loopback addresses only).")] = False,
    json_out: JsonOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Fit a GLMM federated over sites and print an lme4-style summary."""
    if curvature not in ("observed", "expected"):
        raise UsageError(f"--curvature must be 'observed' or 'expected', not '{curvature}'", ctx=ctx)
    if method not in ("hybrid", "iterative", "oneshot"):
        raise UsageError(f"--method must be hybrid, iterative or oneshot, not '{method}'", ctx=ctx)
    _state["debug"] = _state["debug"] or debug
    _check_model_options(ctx, formula, family, link)
    _check_json_target(ctx, json_out)
    data = list(data or [])
    if federation is not None:
        if data or summaries or site_column is not None or site_config is not None:
            raise UsageError("--federation fits over the connected sites, under their own rules: give no data "
                             "files, --summaries, --site-column or --site-config", ctx=ctx)
        res = _run_fit(formula, None, family=family, link=link, nagq=nagq, reml=reml, quiet=quiet,
                       curvature=curvature, method=method, moments=moments, penalty=penalty,
                       federation=dict(address=federation, root_certificates=root_certificates,
                                       insecure=insecure, sites=sites_expected, timeout=timeout))
        _emit(res, json_out, quiet)
        return
    if sites_expected is not None or root_certificates is not None or insecure:
        raise UsageError("--sites, --root-certificates and --insecure go with --federation", ctx=ctx)
    if summaries and site_config is not None:
        raise UsageError("--site-config applies to sites fitted from data files; summaries were made under "
                         "each site's own rules ('fedglmm summarize --site-config')", ctx=ctx)
    if summaries:
        # '--summaries a.json b.json': the option takes the first file, the rest arrive as arguments
        from .api import fit_summaries

        res = fit_summaries(list(summaries) + data, formula, family=family, link=link, nagq=nagq, reml=reml,
                            curvature=curvature)
        _emit(res, json_out, quiet)
        return
    if not data:
        raise UsageError("no data files given (or use --summaries)", ctx=ctx)
    if site_column is not None and len(data) > 1:
        raise UsageError(f"--site-column splits one file into sites, but {len(data)} files were given and "
                         "each file is already a site: give one file or drop --site-column", ctx=ctx)
    from .io import load_sites
    from .siteconfig import SiteConfig

    config = SiteConfig.load(site_config) if site_config is not None else None
    sites = load_sites(data, site_column)
    res = _run_fit(formula, sites, family=family, link=link, nagq=nagq, reml=reml, quiet=quiet,
                   curvature=curvature, method=method, moments=moments, min_group=min_group, penalty=penalty,
                   site_config=config)
    _emit(res, json_out, quiet)


@app.command()
def summarize(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(metavar="DATA", show_default=False, help="This site's data file.")],
    formula: Annotated[str, typer.Option("--formula", "-f", show_default=False, help="lme4-style formula.")],
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False,
                                         help="Where to write the site's summaries (JSON).")],
    family: Annotated[str, typer.Option("--family", help="gaussian, binomial or poisson.")] = "gaussian",
    link: Annotated[Optional[str], typer.Option("--link", show_default=False, help="Link function.")] = None,
    site_id: Annotated[Optional[str], typer.Option(
        "--site-id", show_default=False, help="This site's name (default: the file name).")] = None,
    moments: Annotated[int, typer.Option(
        "--moments", min=2, max=4, help="Order K of the per-group moments (binomial/poisson).")] = 4,
    min_group: Annotated[int, typer.Option(
        "--min-group", min=1, help="Smallest group whose own summaries may leave the site.")] = 10,
    site_config: Annotated[Optional[Path], typer.Option(
        "--site-config", show_default=False,
        help="This site's site.toml: its rules are applied (its min_group replaces --min-group) and the "
             "message is recorded in its audit log.")] = None,
    debug: DebugOption = False,
) -> None:
    """Write this site's one-shot message as readable JSON, for the data steward to review and send."""
    _state["debug"] = _state["debug"] or debug
    _check_model_options(ctx, formula, family, link)
    import json

    from .io import read_table
    from .methods.oneshot import summarize as make_summary, to_jsonable

    frame = read_table(data)
    if site_config is not None:
        from . import protocol
        from .errors import SiteRefusal
        from .site import Site
        from .siteconfig import SiteConfig

        # through the site itself: the same rules and the same audit line as a networked request
        site = Site(site_id or data.stem, frame, config=SiteConfig.load(site_config))
        req = protocol.request("oneshot", formula=formula, family=family, link=link, order=moments)
        msg = protocol.decode(site.handle(protocol.encode(req)))
        if "error" in msg:
            raise SiteRefusal(msg["error"])
    else:
        msg = make_summary(frame, formula, family, link, site_id or data.stem, order=moments, min_group=min_group)
    try:
        output.write_text(json.dumps(to_jsonable(msg), indent=1) + "\n")
    except OSError as e:
        raise ClickException(f"cannot write '{output}': {e.strerror or e}") from None
    what = msg["refused"] or (f"{len(msg['groups']['levels'])} groups of {msg['n']} rows")
    typer.echo(f"wrote {output}: site '{msg['site']}', {what}", err=True)


def _check_model_options(ctx, formula: str, family: str, link: str | None) -> None:
    """Family, link and formula are checked before any file is read; a problem is a usage error."""
    from .families import get_family
    from .formula import parse_formula

    for check in (lambda: get_family(family, link), lambda: parse_formula(formula)):
        try:
            check()
        except FedGLMMError as e:
            raise UsageError(str(e), ctx=ctx) from None


def _check_json_target(ctx, json_out: str | None) -> None:
    if json_out is None or json_out == "-":
        return
    target = Path(json_out)
    if target.is_dir():
        raise UsageError(f"--json '{json_out}' is a folder; give a file name", ctx=ctx)
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --json '{json_out}': folder '{parent}' does not exist", ctx=ctx)


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


def _run_fit(formula, sites, *, family, link, nagq, reml, quiet, label="fitting", curvature="observed",
             method="hybrid", moments=None, min_group=10, penalty=0.0, site_config=None, federation=None):
    from .api import fit as api_fit

    if federation is not None:                     # the sites are across the network
        from .deploy.cli import fit_federated

        def api_fit(formula, _sites, *, min_group, site_config, **options):  # noqa: F811 - the sites' own
            where = {k: v for k, v in federation.items() if k != "address"}
            return fit_federated(federation["address"], formula, **where, **options)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _progress(quiet, label) as on_round:
            res = api_fit(formula, sites, family=family, link=link, nagq=nagq, reml=reml, on_round=on_round,
                          curvature=curvature, method=method, moments=moments, min_group=min_group,
                          penalty=penalty, site_config=site_config)
    if not quiet:
        shown = set()
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                continue
            text = _one_line(str(w.message))
            if text not in shown:
                shown.add(text)
                typer.echo(f"warning: {text}", err=True)
    return res


def _emit(res, json_out: str | None, quiet: bool, note: str | None = None) -> None:
    """Write the JSON first (a failed write prints no fit), then the summary and the note."""
    if json_out is not None and json_out != "-":
        try:
            res.to_json(json_out)
        except OSError as e:
            raise ClickException(f"cannot write --json '{json_out}': {e.strerror or e}") from None
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


# --- demo -------------------------------------------------------------------------------------------

@app.command()
def demo(ctx: typer.Context, json_out: JsonOption = None, quiet: QuietOption = False, debug: DebugOption = False) -> None:
    """Fit the bundled contraception data split over 4 regional sites (binomial, Laplace)."""
    _state["debug"] = _state["debug"] or debug
    _check_json_target(ctx, json_out)
    from .io import load_sites

    with resources.as_file(resources.files("fedglmm") / "data" / DEMO_FILE) as path:
        sites = load_sites([path], DEMO_SITE_COLUMN)
    res = _run_fit(DEMO_FORMULA, sites, family=DEMO_FAMILY, link=None, nagq=1, reml=False, quiet=quiet,
                   label="demo")
    ngroups = sum(res.ngroups.values())
    note = (f"demo: fitted the Bangladesh contraception survey ({res.nobs} women, {ngroups} districts) "
            f"federated over {res.nsites} sites split by '{DEMO_SITE_COLUMN}' ({', '.join(res.site_ids)}): "
            f"{res.rounds} rounds, {res.bytes_to_sites:,} bytes sent to the sites and "
            f"{res.bytes_from_sites:,} bytes back; no row left its site.")
    _emit(res, json_out, quiet, note=note)


# --- site ------------------------------------------------------------------------------------------

site_app = typer.Typer(
    name="site",
    help="A site's side: serve its data to a coordinator under its rules (site.toml), and read its audit log.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(site_app, name="site")

from .deploy.cli import certs, coordinator_app, site_start  # noqa: E402 - deployment across machines

app.add_typer(coordinator_app, name="coordinator")
app.command("certs")(certs)
site_app.command("start")(site_start)


@site_app.callback(invoke_without_command=True)
def _site_root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@site_app.command("log")
def site_log(
    path: Annotated[Path, typer.Argument(metavar="PATH", show_default=False,
                                         help="The site's audit log (JSON lines).")],
    json_lines: Annotated[bool, typer.Option("--json", help="Print the raw JSON lines.")] = False,
    debug: DebugOption = False,
) -> None:
    """Show a site's audit log: each request, its size, and the fields sent or the reason refused."""
    _state["debug"] = _state["debug"] or debug
    import json

    from .audit import read_log

    entries = read_log(path)
    if json_lines:
        for entry in entries:
            typer.echo(json.dumps(entry, separators=(",", ":"), ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"audit log {path}: {len(entries)} request{'s' if len(entries) != 1 else ''}",
                  title_justify="left")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("site", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("bytes in/out", justify="right", no_wrap=True)
    table.add_column("sent", overflow="fold", ratio=1)
    for e in entries:
        if "refused" in e:
            what = f"[bold red]REFUSED[/]: {_escape(e['refused'])}"
        else:
            what = _escape(_fields_text(e.get("sent") or []))
        when = str(e.get("time", "")).replace("T", " ")[:19]
        table.add_row(_escape(when), _escape(str(e.get("site", ""))),
                      _escape(str(e.get("kind", ""))),
                      f"{e.get('request_bytes', '?')}/{e.get('reply_bytes', '?')}", what)
    Console(soft_wrap=False, highlight=False).print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fields_text(fields: list) -> str:
    """The fields sent, compactly: ``xtx[6×6]``; a table of names as ``columns{9}``; a list of replies
    per point as ``points[3]{value, grad[7], hess[7×7]}`` (the fields of its first item)."""
    import re

    def one(name: str, shape) -> str:
        return f"{name}[{'×'.join(map(str, shape))}]" if shape else name

    groups: dict[str, list] = {}
    for f in fields:
        name = str(f.get("name", ""))
        top = re.split(r"[.\[]", name, maxsplit=1)[0]
        groups.setdefault(top, []).append((name[len(top):], f.get("shape") or []))
    parts = []
    for top, items in groups.items():
        if len(items) == 1 and items[0][0] == "":
            parts.append(one(top, items[0][1]))
        elif items[0][0].startswith("["):
            count = len({rest.split("]", 1)[0] for rest, _ in items})
            first = items[0][0].split("]", 1)[0] + "]"
            inner = [one(rest[len(first):].lstrip("."), shape) for rest, shape in items if rest.startswith(first)]
            parts.append(f"{top}[{count}]{{{', '.join(inner)}}}")
        elif all(not shape for _, shape in items):
            parts.append(f"{top}{{{len(items)}}}")
        else:
            parts.append(f"{top}{{{', '.join(one(rest.lstrip('.'), shape) for rest, shape in items)}}}")
    return ", ".join(parts)


def main() -> None:
    """The ``fedglmm`` console script."""
    typer.main.get_command(app).main(prog_name="fedglmm")


if __name__ == "__main__":
    main()
