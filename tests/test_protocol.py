"""The wire format: a pickle-free container of JSON and raw little-endian array buffers."""
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedglmm.protocol import MAGIC, VERSION, ProtocolError, decode, encode, request


def arrays():
    """Arrays of every allowed kind and many shapes (incl. 0-d, empty, non-contiguous, big-endian)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    return {
        "f0d": np.array(3.25),
        "f1": np.array([1.5, -2.0, np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308]),
        "f2": base,
        "f3": rng.normal(size=(2, 3, 4)),
        "f_empty": np.zeros(0),
        "f_empty2": np.zeros((3, 0)),
        "f_empty3": np.zeros((0, 2, 5)),
        "f_transposed": base.T,                     # not C-contiguous
        "f_strided": base[::2, ::3],
        "f_big_endian": np.arange(5, dtype=">f8") / 3,
        "f32": np.array([0.1, 2.5], dtype=np.float32),
        "i0d": np.array(-7, dtype=np.int64),
        "i1": np.array([0, -1, 2**62, -(2**63), 2**63 - 1], dtype=np.int64),
        "i2": np.arange(12, dtype=np.int64).reshape(3, 4),
        "i32": np.array([1, -2, 3], dtype=np.int32),
        "i_empty": np.zeros((0,), dtype=np.int64),
        "b0d": np.array(True),
        "b1": np.array([True, False, True]),
        "b2": np.eye(3, dtype=bool),
        "b_empty": np.zeros((2, 0), dtype=bool),
    }


def message():
    return {
        "kind": "evaluate",
        "phi": np.array([0.1, -0.2, 0.3]),
        "arrays": arrays(),
        "nested": {"deeper": {"deepest": [np.arange(3), {"x": np.ones((2, 2))}, None, "text"]},
                   "list": [1, 2.5, True, False, None, "a", [], {}]},
        "text": "grüße — ✓ \"quoted\" \\ back\nslash",
        "empty": "",
        "none": None,
        "nan": float("nan"),
        "inf": float("inf"),
        "neg_inf": -float("inf"),
        "int": 12345678901234567,
        "float": 0.1,
        "bool": True,
        "np_scalars": [np.float64(2.5), np.int64(-3), np.bool_(True), np.float32(0.5)],
        "tuple": (1, "two", 3.0),
        7: "integer key",
    }


def same(a, b, path="msg"):
    """Deep equality: NaN equals NaN, arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert b.shape == a.shape, path
        assert b.dtype == {"f": np.float64, "i": np.int64, "u": np.int64, "b": np.bool_}[a.dtype.kind], path
        assert b.flags.c_contiguous and b.flags.writeable, path
        assert np.array_equal(a.astype(b.dtype), b, equal_nan=a.dtype.kind == "f"), path
        if a.dtype.kind == "f":
            assert np.array_equal(np.signbit(a), np.signbit(b)), path        # −0.0 stays −0.0
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(b) == {str(k) for k in a}, path
        for k, v in a.items():
            same(v, b[str(k)], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
        return
    if isinstance(a, (np.floating, np.integer, np.bool_)):
        a = a.item()
    if isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
        return
    assert type(b) is type(a) and b == a, (path, a, b)


def test_round_trip():
    msg = message()
    data = encode(msg)
    assert isinstance(data, bytes)
    same(msg, decode(data))
    assert encode(decode(data)) == data          # a fixed point: decoding loses nothing encode keeps


@pytest.mark.parametrize("name", list(arrays()))
def test_round_trip_each_array_alone(name):
    a = arrays()[name]
    out = decode(encode({"a": a}))["a"]
    same(a, out)


def test_round_trip_top_level_kinds():
    for msg in ({}, {"a": None}, {"a": []}, {"a": {}}, {"a": np.zeros(0)}, request("describe", formula="y ~ x")):
        same(msg, decode(encode(msg)))


def test_layout_is_header_then_raw_buffers():
    """Exactly: magic, version, header length, JSON header, the arrays' little-endian bytes. Nothing else."""
    msg = {"x": np.array([1.0, 2.0]), "n": np.array([[3, 4]], dtype=np.int64), "b": np.array([True]),
           "s": "text"}
    data = encode(msg)
    assert data[:4] == MAGIC == b"FGLM" and data[4] == VERSION
    (hlen,) = struct.unpack("<I", data[5:9])
    header = json.loads(data[9:9 + hlen].decode("utf-8"))
    assert header["s"] == "text"
    assert header["x"] == {"__array__": 0, "dtype": "float64", "shape": [2]}
    body = data[9 + hlen:]
    assert body == np.array([1.0, 2.0], "<f8").tobytes() + np.array([3, 4], "<i8").tobytes() + b"\x01"
    assert len(data) == 9 + hlen + 16 + 16 + 1


def test_bytes_are_never_a_pickle():
    data = encode(message())
    assert data.startswith(MAGIC)
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert bytes([0x80, proto]) not in data[:64]
    assert b"\x80\x04" not in data and b"\x80\x05" not in data
    with pytest.raises(Exception):
        pickle.loads(data)


@pytest.mark.parametrize("proto", list(range(0, pickle.HIGHEST_PROTOCOL + 1)))
def test_decode_refuses_a_pickle(proto):
    with pytest.raises(ProtocolError):
        decode(pickle.dumps({"kind": "evaluate", "phi": np.zeros(3)}, protocol=proto))


def test_decode_refuses_a_pickle_after_the_magic():
    """Even with a valid prefix, array bytes are only ever read as numbers."""
    payload = pickle.dumps(np.zeros(2), protocol=4)
    pad = (-len(payload)) % 8
    header = json.dumps({"a": {"__array__": 0, "dtype": "float64", "shape": [(len(payload) + pad) // 8]}}).encode()
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + payload + b"\0" * pad
    out = decode(data)["a"]
    assert out.dtype == np.float64 and out.nbytes == len(payload) + pad


@pytest.mark.parametrize("bad", [
    np.array(["a", "b"]),                          # text
    np.array([1 + 2j]),                            # complex
    np.array([b"x"]),                              # bytes
    np.array([np.datetime64("2024-01-01")]),       # datetime
])
def test_other_array_dtypes_refused(bad):
    with pytest.raises(ProtocolError):
        encode({"a": bad})


def test_object_arrays_refused():
    with pytest.raises(ProtocolError):
        encode({"a": np.array([1, "x", None], dtype=object)})
    with pytest.raises(ProtocolError):
        encode({"nested": [{"a": np.array([np.zeros(2), np.ones(3)], dtype=object)}]})
    with pytest.raises(ProtocolError):
        encode({"a": np.array([1.0, 2.0], dtype=object)})        # even holding only numbers


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", 1 + 2j, np.complex128(1j), lambda: 0])
def test_other_python_values_refused(value):
    with pytest.raises(ProtocolError):
        encode({"a": value})


def test_decode_refuses_a_forged_object_dtype():
    header = json.dumps({"a": {"__array__": 0, "dtype": "object", "shape": [1]}}).encode()
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"\0" * 8
    with pytest.raises(ProtocolError):
        decode(data)


def test_truncated_array_bytes_refused():
    data = encode({"x": np.arange(10.0), "y": np.ones((2, 2), dtype=np.int64), "z": np.array([True, False])})
    (hlen,) = struct.unpack("<I", data[5:9])
    for cut in range(9 + hlen, len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])
    for cut in range(0, 9):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


def test_truncated_header_refused():
    data = encode({"x": np.arange(3.0), "text": "grüße"})
    (hlen,) = struct.unpack("<I", data[5:9])
    for cut in range(9, 9 + hlen):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


def test_truncated_bytes_never_decode():
    """Whatever the exception type, no prefix of a message decodes to something."""
    data = encode({"x": np.arange(3.0), "text": "grüße", "n": 5})
    for cut in range(len(data)):
        with pytest.raises((ProtocolError, ValueError)):
            decode(data[:cut])


def test_not_a_message_refused():
    for data in (b"", b"FGL", b"PK\x03\x04" + b"\0" * 20, b'{"kind": "evaluate"}', b"\x00" * 16):
        with pytest.raises(ProtocolError):
            decode(data)
    wrong_version = bytearray(encode({"a": 1}))
    wrong_version[4] = VERSION + 1
    with pytest.raises(ProtocolError, match="version"):
        decode(bytes(wrong_version))


def test_unknown_request_kind_refused():
    assert request("evaluate", phi=[1.0]) == {"kind": "evaluate", "phi": [1.0]}
    with pytest.raises(ProtocolError):
        request("exec", code="print(1)")


@pytest.mark.parametrize("header", [
    {"a": {"__array__": 0, "dtype": "float64", "shape": [-1]}},
    {"a": {"__array__": 3, "dtype": "float64", "shape": [1]}},
    [1, 2, 3],
])
def test_malformed_headers_refused(header):
    raw = json.dumps(header).encode()
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", len(raw)) + raw + b"\0" * 8
    with pytest.raises(ProtocolError):
        decode(data)


def test_a_site_answers_garbage_with_a_one_line_error():
    import pandas as pd

    from fedglmm.site import Site

    site = Site("A", pd.DataFrame({"y": [1.0, 2.0]}))
    for data in (b"garbage", MAGIC + bytes([VERSION]) + struct.pack("<I", 2) + b"{}",
                 encode({"kind": "evaluate"})):
        reply = decode(site.handle(data))
        assert set(reply) == {"error"} and "\n" not in reply["error"] and "site 'A'" in reply["error"]
