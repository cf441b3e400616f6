"""Command-line side of a deployment: ``fedglmm coordinator start``, ``fedglmm site start``,
``fedglmm certs`` and the ``--federation`` path of ``fedglmm fit``.

Errors follow :mod:`fedglmm.cli`: one line ``error: ...`` and exit code 1 (data, files, federation) or 2
(usage).  Flower is imported only when a command needs it.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import FedGLMMError, InputError

coordinator_app = typer.Typer(
    name="coordinator",
    help="The coordinator's side: run the SuperLink the sites connect to.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedGLMMError("this command needs Flower: pip install 'fedglmm[flower]'") from None


def _cert_files(folder: Path) -> tuple[Path, Path, Path]:
    files = tuple(folder / n for n in ("ca.pem", "server.pem", "server.key"))
    for f in files:
        if not f.is_file():
            raise InputError(f"--certificates '{folder}' has no {f.name} (write them with 'fedglmm certs')")
    return files


def superlink_args(host: str, port: int, certificates: Path | None, auth: bool) -> list[str]:
    """``flower-superlink`` options for a coordinator: process isolation, TLS, SuperNode authentication."""
    args = ["--isolation", "process", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if certificates is None:
        args.append("--insecure")
    else:
        ca, cert, key = _cert_files(certificates)
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        if auth:
            args.append("--enable-supernode-auth")
    return args


def register_keys(local: str, keys, ca: Path | None, deadline: float, alive=lambda: True) -> None:
    """Authorise the sites' public keys at the SuperLink's Control API (on loopback)."""
    import httpx
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    client = ControlHttpClient.from_server_address(
        server_address=local, insecure=ca is None, root_certificates=None if ca is None else ca.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    try:
        pending = list(keys)
        while pending:
            name, key = pending[0]
            try:
                client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name))
            except httpx.TransportError:
                if not alive():
                    return                      # the SuperLink did not start: its exit code says why
                if time.monotonic() > deadline:
                    raise FedGLMMError(f"the SuperLink at {local} did not start") from None
                time.sleep(0.2)
                continue
            except httpx.HTTPStatusError as exc:      # already registered (a persistent database)
                typer.echo(f"note: site key '{name}' not registered: {exc.response.status_code}", err=True)
            pending.pop(0)
    finally:
        client.close()


def _stop_on_signal(signum, _frame):
    """SIGTERM ends ``coordinator start`` as Ctrl-C does: through its clean-up, which stops the SuperLink."""
    raise KeyboardInterrupt


@coordinator_app.command("start")
def coordinator_start(
    address: Annotated[str, typer.Option(
        "--address", help="Where the sites connect (the Fleet API): HOST:PORT. Submitting and driving a fit "
                          "is answered on this port only from this machine's loopback.")] = "0.0.0.0:9092",
    certificates: Annotated[Optional[Path], typer.Option(
        "--certificates", show_default=False,
        help="Folder with ca.pem, server.pem and server.key (written by 'fedglmm certs').")] = None,
    auth_keys: Annotated[Optional[Path], typer.Option(
        "--auth-keys", show_default=False,
        help="The sites' public keys (authorized_keys.csv from 'fedglmm certs'); only they may connect.")] = None,
    no_node_auth: Annotated[bool, typer.Option(
        "--no-node-auth", help="Let any site with the CA certificate connect (no SuperNode keys).")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="No TLS and no node authentication: loopback addresses only.")] = False,
) -> None:
    """Run the coordinator's SuperLink (Flower) with TLS and site authentication, until stopped."""
    from .node import check_insecure, flower_env, split_address

    host, port = split_address(address, "--address")
    if insecure:
        check_insecure(address, "--address")
        if certificates is not None or auth_keys is not None:
            raise InputError("--insecure runs without TLS: drop --certificates and --auth-keys")
    else:
        if certificates is None:
            raise InputError("give --certificates DIR (see 'fedglmm certs'), or --insecure on a loopback address")
        if auth_keys is None and not no_node_auth:
            raise InputError("give --auth-keys FILE with the sites' public keys (see 'fedglmm certs'), "
                             "or --no-node-auth")
    _need_flower()
    keys = None
    if auth_keys is not None and not no_node_auth:
        from .certs import read_public_keys

        keys = read_public_keys(auth_keys)
    args = superlink_args(host, port, None if insecure else certificates, auth=keys is not None)
    proc = subprocess.Popen([sys.executable, "-m", "fedglmm.deploy.superlink", *args], env=flower_env())
    # SIGTERM (a service manager, `kill`) stops the SuperLink too: it must not outlive us and keep the port
    previous = signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        if keys:
            register_keys(f"127.0.0.1:{port}", keys, None if insecure else certificates / "ca.pem",
                          time.monotonic() + 60, alive=lambda: proc.poll() is None)
            if proc.poll() is None:
                typer.echo(f"authorised {len(keys)} site key{'s' if len(keys) != 1 else ''}", err=True)
        if proc.poll() is None:
            typer.echo(f"coordinator: sites connect to {address}; fits run here with "
                       f"'fedglmm fit --federation 127.0.0.1:{port}'", err=True)
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code not in (0, -2, -15, 130):
        raise FedGLMMError(f"the SuperLink stopped with exit code {code}")


def site_start(
    data: Annotated[Path, typer.Option("--data", show_default=False, help="This site's data file.")],
    site_id: Annotated[str, typer.Option("--site-id", show_default=False, help="This site's name.")],
    superlink: Annotated[str, typer.Option(
        "--superlink", show_default=False, help="The coordinator's address, HOST:PORT.")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", show_default=False,
        help="The site's rules (site.toml). Default: the strict default rules.")] = None,
    audit: Annotated[Optional[Path], typer.Option(
        "--audit", show_default=False, help="Audit log (JSON lines). Default: the one in site.toml, if any.")] = None,
    root_certificates: Annotated[Optional[Path], typer.Option(
        "--root-certificates", show_default=False,
        help="The federation's CA certificate (ca.pem). Default: the system's trusted CAs.")] = None,
    auth_key: Annotated[Optional[Path], typer.Option(
        "--auth-key", show_default=False, help="This site's private key (S.key from 'fedglmm certs').")] = None,
    port: Annotated[int, typer.Option(
        "--port", min=1, max=65535, help="Local port of this site's SuperNode (on 127.0.0.1); one per site "
                                         "on a machine.")] = 9094,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="No TLS: only to a coordinator on a loopback address.")] = False,
    sep: Annotated[Optional[str], typer.Option(
        "--sep", show_default=False, help="Field separator of the data file (default: ',' for .csv, a tab for .tsv).")]
    = None,
    encoding: Annotated[Optional[str], typer.Option(
        "--encoding", show_default=False, help="Text encoding of the data file (default UTF-8).")] = None,
) -> None:
    """Serve this site's data to a coordinator: answers with sums, under the site's rules, until stopped."""
    from .node import check_insecure, make_site, run_site, split_address

    if not data.is_file():
        raise InputError(f"--data '{data}' is not a file")
    split_address(superlink, "--superlink")
    if insecure:
        check_insecure(superlink, "--superlink")
        if root_certificates is not None:
            raise InputError("--insecure runs without TLS: drop --root-certificates")
    for path, what in ((root_certificates, "--root-certificates"), (auth_key, "--auth-key"), (config, "--config")):
        if path is not None and not path.is_file():
            raise InputError(f"{what} '{path}' is not a file")
    _need_flower()
    site = make_site(data, site_id, config=config, audit=audit, sep=sep, encoding=encoding)
    typer.echo(f"site '{site_id}': {len(site.frame)} rows from {data}; connecting to {superlink}", err=True)
    code = run_site(site, superlink, root_certificates=root_certificates, insecure=insecure, auth_key=auth_key,
                    port=port)
    if code not in (0, -2, -15, 130):
        raise FedGLMMError(f"site '{site_id}': the SuperNode stopped with exit code {code}")


def certs(
    folder: Annotated[Path, typer.Argument(metavar="DIR", show_default=False, help="Where to write the files.")],
    host: Annotated[Optional[List[str]], typer.Option(
        "--host", show_default=False,
        help="A name or address the sites use for the coordinator (repeat; localhost and 127.0.0.1 are "
             "always included).")] = None,
    site: Annotated[Optional[List[str]], typer.Option(
        "--site", show_default=False, help="A site to make an authentication key pair for (repeat).")] = None,
) -> None:
    """Write a test CA, the coordinator's TLS certificate and the sites' authentication keys."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise FedGLMMError("'fedglmm certs' needs the cryptography package: pip install 'fedglmm[flower]'") from None
    from .certs import write_certs

    written = write_certs(folder, list(host or []), list(site or []))
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {folder}", err=True)
    typer.echo("keep ca.key offline, server.key on the coordinator, each S.key at site S only", err=True)


def fit_federated(address: str, req, *, root_certificates, insecure: bool, sites, timeout: float, on_round,
                  analysis=None, secure_aggregation: bool | None = None):
    """The fit of ``req`` (a validated :class:`~fedglmm.model.options.FitRequest`) over the federation at
    ``address`` (the coordinator's loopback SuperLink), and the post-fit rounds ``analysis`` asks for;
    ``secure_aggregation=None``: on for 3+ sites and a method with rounds of sums."""
    from ..api import run

    def work(transport):
        secure = secure_aggregation
        if secure is None:
            secure = req.method != "oneshot" and len(transport.site_ids) >= 3
        return run(transport, req, analysis, secure)

    return with_federation(address, work, root_certificates=root_certificates, insecure=insecure, sites=sites,
                           timeout=timeout, on_round=on_round)


def with_federation(address: str, work, *, root_certificates, insecure: bool, sites, timeout: float, on_round):
    """``work(transport)`` over the federation at ``address``; the fits it returns lose their line to the
    sites when the run ends (a fit, or a list or dict of fits)."""
    from ..transport.flower_run import federation
    from .node import check_insecure, split_address

    split_address(address, "--federation")
    if insecure:
        check_insecure(address, "--federation")
    with federation(address, root_certificates=root_certificates, insecure=insecure, sites=sites,
                    timeout=timeout, on_round=on_round) as transport:
        transport.connect()             # wait for the sites first: the fit's time is the fit's
        out = work(transport)
    fits = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
    for res in fits:
        session = getattr(res, "session", None)
        if session is not None and hasattr(session, "link"):
            session.link.closed = True
    return out
