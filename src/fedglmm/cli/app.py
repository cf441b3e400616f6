"""The ``fedglmm`` command group: one error line and a fixed exit code for every failure, ``--version``,
and the options several commands share."""
from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x ships its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException, UsageError

from .. import __version__
from ..errors import FedGLMMError

EXIT_DATA, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3

_state = {"debug": False}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_error(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)


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
    msg = one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command_path:
        msg = f"{msg} (see '{ctx.command_path} --help')"
    return msg


def set_debug(debug: bool) -> None:
    _state["debug"] = _state["debug"] or debug


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
    set_debug(debug)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def check_json_target(ctx, json_out: str | None) -> None:
    if json_out is None or json_out == "-":
        return
    target = Path(json_out)
    if target.is_dir():
        raise UsageError(f"--json '{json_out}' is a folder; give a file name", ctx=ctx)
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --json '{json_out}': folder '{parent}' does not exist", ctx=ctx)


#: Commands that call :func:`imports_loaded` before their work, so the console script may pause the collector.
PAUSE_GC = ("fit", "demo")


def imports_loaded() -> None:
    """A command's imports are in (numpy, pandas, scipy, formulaic, the fit's modules): if the console script
    paused the garbage collector for them, the objects they made are frozen out of its later passes (they
    live as long as the process) and it runs again."""
    if _state.get("gc_paused"):
        _state["gc_paused"] = False
        gc.freeze()
        gc.enable()


def main() -> None:
    """The ``fedglmm`` console script.

    A fit's imports allocate about a million objects that live as long as the process, and the cyclic
    garbage collector's passes over them while they load, and its full pass during the fit, cost the small
    fit of ``fedglmm demo`` about 0.09 s of its 1 s.  So for the commands of :data:`PAUSE_GC` the collector
    is paused until :func:`imports_loaded`; a one-process command line only (the test suite's in-process
    calls of :data:`app` never pause it)."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in PAUSE_GC and gc.isenabled():
        gc.disable()
        _state["gc_paused"] = True
    try:
        typer.main.get_command(app).main(prog_name="fedglmm")
    finally:
        if _state.pop("gc_paused", False):
            gc.enable()
