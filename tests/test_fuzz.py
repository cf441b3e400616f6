"""Property-based fuzzing (hypothesis) of what faces the network: the protocol decoder and every request
handler of a site.  Random bytes, mutated real requests, forged headers with oversized shapes, NaN and
infinite values, wrong kinds and wrong types: the decoder raises only ProtocolError, and a site always
answers -- a valid reply or one line ``{"error": ...}``, never a traceback.  Bounded in time: a fixed
number of examples, derandomised so CI sees the same cases every run."""
from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fedglmm  # noqa: E402
from fedglmm import protocol  # noqa: E402
from fedglmm.protocol import MAGIC, VERSION, ProtocolError  # noqa: E402
from fedglmm.site import Site, SiteConfig  # noqa: E402
from fedglmm.transport import InProcessTransport  # noqa: E402
from recording import Recorder  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _frame(seed=5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{i}" for i in range(8)], 12)
    x = rng.normal(size=len(g))
    return pd.DataFrame({"y": rng.binomial(1, 0.4, len(g)), "x": x, "f": np.array(["a", "b"])[np.arange(len(g)) % 2],
                         "g": g})


FRAME = _frame()


def _recorded() -> list[dict]:
    """Real requests of every kind: an iterative fit, a hybrid fit and a gaussian one."""
    out = []
    for formula, family, method in (("y ~ x + f + (1 | g)", "binomial", "iterative"),
                                    ("y ~ x + (x | g)", "binomial", "hybrid"),
                                    ("x ~ f + (1 | g)", "gaussian", "iterative")):
        rec = Recorder(Site("A", FRAME, config=SiteConfig(min_group=1)))
        fedglmm.fit_on(InProcessTransport({"A": rec}), formula, family=family, method=method)
        out += [protocol.decode(data) for data, _ in rec.calls]
    return out


RECORDED = _recorded()


def _answer(site: Site, data: bytes, session=None) -> dict:
    out = site.handle(data, session=session)          # must not raise
    reply = protocol.decode(out)                       # and must be a message
    if "error" in reply:
        msg = reply["error"]
        assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg, msg
        assert set(reply) == {"error"}
    return reply


def _sites():
    return [Site("A", FRAME, config=SiteConfig()), Site("A", FRAME)]


# --- values hypothesis draws ------------------------------------------------------------------------

finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 0.0]))
def _array(shape, fill, dtype):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, fill).astype(dtype)


arrays = st.builds(
    _array, st.lists(st.integers(0, 4), max_size=3).map(tuple), finite_or_not,
    st.sampled_from(["float64", "float64", "int64", "bool"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), finite_or_not,
                    st.text(max_size=30), st.sampled_from(["binomial", "gaussian", "poisson", "logit", "y ~ x",
                                                           "y ~ x + (1 | g)", "observed", "setup", ""]))
values = st.recursive(st.one_of(scalars, arrays),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
kinds = st.one_of(st.sampled_from(protocol.KINDS), st.sampled_from(["exec", "", "KEYS"]), scalars)


# --- the decoder -------------------------------------------------------------------------------------

@settings(max_examples=300, **SETTINGS)
@given(st.binary(max_size=600))
def test_random_bytes_never_decode_to_anything_but_a_refusal(data):
    for blob in (data, MAGIC + bytes([VERSION]) + data):
        try:
            assert isinstance(protocol.decode(blob), dict)
        except ProtocolError:
            pass


@settings(max_examples=300, **SETTINGS)
@given(st.sampled_from(range(len(RECORDED))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                        min_size=1, max_size=6))
def test_mutated_requests_decode_or_are_refused(i, edits):
    data = bytearray(protocol.encode(RECORDED[i]))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    try:
        protocol.decode(bytes(data))
    except ProtocolError:
        pass


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.floats(), st.text(max_size=3), st.booleans()),
                max_size=40),
       st.sampled_from(["float64", "int64", "uint64", "bool", "object", "<f8", 7, None]),
       st.integers(0, 3))
def test_forged_array_headers_are_refused_quickly(shape, dtype, index):
    header = json.dumps({"kind": "evaluate", "points": {"__array__": index, "dtype": dtype, "shape": shape}}).encode()
    blob = MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"\0" * 64
    try:
        protocol.decode(blob)
    except ProtocolError:
        pass


def test_deeply_nested_headers_are_refused():
    header = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(ProtocolError):
        protocol.decode(MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header)


# --- the site's handlers -----------------------------------------------------------------------------

@settings(max_examples=150, **SETTINGS)
@given(st.binary(max_size=400), st.sampled_from(range(len(RECORDED))),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_site_answers_random_and_mutated_bytes_with_one_line(data, i, edits):
    blob = bytearray(protocol.encode(RECORDED[i]))
    for pos, byte in edits:
        blob[pos % len(blob)] = byte
    for site in _sites():
        _answer(site, data)
        _answer(site, bytes(blob))


@settings(max_examples=250, **SETTINGS)
@given(st.sampled_from(range(len(RECORDED))), st.dictionaries(st.text(max_size=12).filter(lambda k: k != "kind")
                                                               | st.sampled_from(["points", "point", "transform",
                                                                                  "zscale", "schema", "formula",
                                                                                  "nagq", "order", "setup",
                                                                                  "family", "sigma", "local",
                                                                                  "beta_internal", "secagg"]),
                                                               values, min_size=1, max_size=3),
       kinds, st.booleans())
def test_every_handler_refuses_hostile_fields_with_one_line(i, changes, kind, keep_kind):
    """A real request (after the set-up it needs) with fields replaced by hostile values: wrong types,
    NaN/inf, oversized or empty shapes, unknown kinds."""
    req = dict(RECORDED[i], **changes)
    if not keep_kind:
        req["kind"] = kind
    for site in _sites():
        setup = next(r for r in RECORDED[:i + 1][::-1] if r["kind"] == "setup") \
            if RECORDED[i]["kind"] in ("evaluate", "finalize") and any(r["kind"] == "setup" for r in RECORDED[:i]) \
            else None
        if setup is not None:
            _answer(site, protocol.encode(setup))
        try:
            data = protocol.encode(req)
        except ProtocolError:
            return
        _answer(site, data)
        _answer(site, data, session="another run")


def test_huge_quadrature_and_moment_orders_are_refused_before_any_work():
    site = Site("A", FRAME)
    setup = next(r for r in RECORDED if r["kind"] == "setup")
    for bad in ({"nagq": 10**9}, {"nagq": 60}, {"nagq": True}, {"curvature": "none"}):
        reply = _answer(site, protocol.encode(dict(setup, **bad)))
        assert "refused a malformed request" in reply["error"]
    oneshot = next(r for r in RECORDED if r["kind"] == "oneshot")
    for bad in ({"order": 100}, {"local": {"nagq": 10**6}}, {"local": "x"}):
        reply = _answer(site, protocol.encode(dict(oneshot, **bad)))
        assert "refused a malformed request" in reply["error"]
