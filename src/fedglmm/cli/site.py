"""``fedglmm site ...`` (a site's side: ``site start`` serves its data, ``site predict`` writes its fitted
values to its own disk, ``site log`` shows its audit log),
and the deployment commands ``fedglmm coordinator ...`` and ``fedglmm certs``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DebugOption, UsageError, app, set_debug

site_app = typer.Typer(
    name="site",
    help="A site's side: serve its data to a coordinator under its rules (site.toml), and read its audit log.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(site_app, name="site")

from ..deploy.cli import certs, coordinator_app, site_start  # noqa: E402 - deployment across machines

app.add_typer(coordinator_app, name="coordinator")
app.command("certs")(certs)
site_app.command("start")(site_start)


@site_app.callback(invoke_without_command=True)
def _site_root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@site_app.command("predict")
def site_predict(
    fit_json: Annotated[Path, typer.Option("--fit", show_default=False,
                                           help="The fit's JSON (fedglmm fit --json), as the coordinator wrote it.")],
    data: Annotated[Path, typer.Option("--data", show_default=False, help="This site's data file.")],
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False,
                                         help="Where to write the fitted values (CSV), on this site's disk.")],
    type_: Annotated[str, typer.Option("--type", help="response (the fitted mean, as R's fitted()) or link.")]
    = "response",
    conditional: Annotated[bool, typer.Option(
        "--conditional/--population", help="With each group's conditional mode (default), or population-level.")]
    = True,
    sep: Annotated[Optional[str], typer.Option("--sep", show_default=False, help="Field separator of the data file.")]
    = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", show_default=False,
                                                 help="Text encoding of the data file (default UTF-8).")] = None,
    debug: DebugOption = False,
) -> None:
    """Write this site's fitted values, from a fit's JSON and the site's own data, to this site's disk.

    Nothing is sent anywhere: the values are computed here, from the fixed effects, the conditional modes
    and the agreed coding in the fit's JSON, one line per row of the data file (its line number and the
    value; NaN for a row lacking a value the model uses)."""
    set_debug(debug)
    import json

    from ..errors import InputError
    from ..io import read_table
    from ..prediction import TYPES, site_fitted

    if type_ not in TYPES:
        raise UsageError(f"--type must be 'response' or 'link', not '{type_}'")
    try:
        fit = json.loads(fit_json.read_text())
    except OSError as e:
        raise InputError(f"cannot read the fit '{fit_json}': {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"the fit '{fit_json}' is not JSON ({' '.join(str(e).split())[:120]})") from None
    frame = read_table(data, sep, encoding)
    table = site_fitted(fit, frame, type=type_, conditional=conditional, source=f"'{fit_json}'")
    try:
        table.to_csv(output, index=False)
    except OSError as e:
        raise InputError(f"cannot write '{output}': {e.strerror or e}") from None
    missing = int(table.iloc[:, 1].isna().sum())
    typer.echo(f"wrote {output}: {len(table)} fitted values ({type_} scale) for '{data}'"
               + (f", {missing} NaN for rows lacking a value" if missing else ""), err=True)


@site_app.command("log")
def site_log(
    path: Annotated[Path, typer.Argument(metavar="PATH", show_default=False,
                                         help="The site's audit log (JSON lines).")],
    json_lines: Annotated[bool, typer.Option("--json", help="Print the raw JSON lines.")] = False,
    debug: DebugOption = False,
) -> None:
    """Show a site's audit log: each request, its size, and the fields sent or the reason refused."""
    set_debug(debug)
    import json

    from ..site.audit import read_log

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
