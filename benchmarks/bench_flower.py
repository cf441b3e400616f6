#!/usr/bin/env python3
"""Per-round latency of fits over a Flower federation on this machine's loopback (TLS and SuperNode
keys on), next to the same fits in-process.

usage (from anywhere; needs ``pip install 'fedglmm[flower]'``):
    python3 benchmarks/bench_flower.py [--sites 3] [--repeat 3] [--json OUT]

It writes certificates with ``fedglmm certs`` into a temporary folder, starts ``fedglmm coordinator
start`` and one ``fedglmm site start`` per site (the bundled contraception data split by region; at
most 4 sites), each in its own process group (all killed at the end), and fits each model --repeat
times over the federation with ``fedglmm.fit_on`` and in-process with ``fedglmm.fit`` (plain and secure fits
alternate, so that a change in the machine's load hits both).

Each model is fitted twice over the federation: ``plain`` (the sites' sums in the clear) and ``secure``
(secure aggregation, the default for 3+ sites: pairwise-masked sums on the exact fixed-point ring).
Columns: rounds; ``fed s``, the median wall time of the fit over the federation (from the first round's
request to the last reply; the connection and identification round before it are shown once as
``connect s``); ``s/round`` = fed s / rounds; ``overhead`` = the secure fit's s/round over the plain
fit's, minus one (the hybrid's secure fit has one round more, its masked set-up round, so the per-round
figure is the fair one); ``in-proc s``, the median in-process fit time; ``bytes to/from``, the request
and reply bytes summed over sites (the same as in-process).  All site processes, the SuperLink and the
analyst share this machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

import fedglmm

MODELS = [
    ("binomial, random intercept", "use ~ urban + age + livch + (1 | district)", "binomial"),
    ("binomial, random slope", "use ~ urban + age + (urban | district)", "binomial"),
    ("binomial, AGHQ 7 nodes", "use ~ urban + age + (1 | district)", "binomial", 7),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "fedglmm.cli", *map(str, args)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3, help="number of sites (2..4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    if not 2 <= args.sites <= 4:
        ap.error("--sites must be 2, 3 or 4")
    try:
        import flwr  # noqa: F401
    except ImportError:
        sys.exit("bench_flower.py needs Flower: pip install 'fedglmm[flower]'")
    from fedglmm.transport.flower_run import federation

    data = pd.read_csv(Path(fedglmm.__file__).parent / "data" / "contraception.csv")
    regions = sorted(data["region"].unique())[: args.sites]
    procs = []
    with tempfile.TemporaryDirectory(prefix="fedglmm-bench-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp / "flwr"))
        frames = {}
        for r in regions:
            frames[r] = data[data["region"] == r].drop(columns="region").reset_index(drop=True)
            frames[r].to_csv(tmp / f"{r}.csv", index=False)
        certs = tmp / "certs"
        subprocess.run(_cli("certs", certs, *[a for r in regions for a in ("--site", r)]), check=True,
                       env=env, capture_output=True)
        port = _free_port()

        def start(name, cmd):
            log = open(tmp / f"{name}.log", "wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))

        try:
            start("coordinator", _cli("coordinator", "start", "--address", f"127.0.0.1:{port}", "--certificates",
                                      certs, "--auth-keys", certs / "authorized_keys.csv"))
            deadline = time.monotonic() + 60
            while "authorised" not in (tmp / "coordinator.log").read_text(errors="replace"):
                if time.monotonic() > deadline:
                    sys.exit("the coordinator did not start:\n" + (tmp / "coordinator.log").read_text())
                time.sleep(0.2)
            for r in regions:
                start(r, _cli("site", "start", "--data", tmp / f"{r}.csv", "--site-id", r, "--superlink",
                              f"localhost:{port}", "--root-certificates", certs / "ca.pem", "--auth-key",
                              certs / f"{r}.key", "--port", _free_port()))
            rows = []
            for name, formula, family, *rest in MODELS:
                nagq = rest[0] if rest else 1
                times = {m: {"fed": [], "local": [], "connect": []} for m in (False, True)}
                rounds = {}
                for _ in range(args.repeat):
                    for secure in (False, True):       # alternated, so that load drifts hit both alike
                        t0 = time.perf_counter()
                        with federation(f"127.0.0.1:{port}", root_certificates=certs / "ca.pem",
                                        sites=len(regions), timeout=60, connect_timeout=60) as tr:
                            tr.connect()
                            t1 = time.perf_counter()
                            res = fedglmm.fit_on(tr, formula, family=family, nagq=nagq, secure_aggregation=secure)
                            times[secure]["fed"].append(time.perf_counter() - t1)
                        times[secure]["connect"].append(t1 - t0)
                        ref = fedglmm.fit(formula, frames, family=family, nagq=nagq, secure_aggregation=secure)
                        times[secure]["local"].append(ref.seconds)
                        assert abs(res.loglik - ref.loglik) < 1e-8, (res.loglik, ref.loglik)
                        rounds[secure] = (tr.rounds, tr.bytes_to_sites, tr.bytes_from_sites)
                for secure in (False, True):
                    t = times[secure]
                    fed = statistics.median(t["fed"])
                    n, b_to, b_from = rounds[secure]
                    rows.append(dict(model=name, mode="secure" if secure else "plain", sites=len(regions),
                                     rounds=n, connect_s=statistics.median(t["connect"]), fed_s=fed,
                                     s_per_round=fed / n, inproc_s=statistics.median(t["local"]),
                                     bytes_to=b_to, bytes_from=b_from))
                    if secure:
                        rows[-1]["overhead"] = rows[-1]["s_per_round"] / rows[-2]["s_per_round"] - 1.0
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    print(f"fits over Flower on 127.0.0.1 (TLS, SuperNode keys), {len(regions)} sites, "
          f"median of {args.repeat}; {os.cpu_count()} CPU cores shared by all processes")
    head = f"{'model':<28} {'mode':<6} {'rounds':>6} {'connect s':>9} {'fed s':>7} {'s/round':>8} " \
           f"{'overhead':>8} {'in-proc s':>9} {'bytes to/from':>17}"
    print(head)
    print("-" * len(head))
    for r in rows:
        over = f"{100 * r['overhead']:+7.1f}%" if "overhead" in r else ""
        print(f"{r['model']:<28} {r['mode']:<6} {r['rounds']:>6} {r['connect_s']:>9.2f} {r['fed_s']:>7.2f} "
              f"{r['s_per_round']:>8.3f} {over:>8} {r['inproc_s']:>9.3f} {r['bytes_to']:>8}/{r['bytes_from']:<8}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
