"""fedglmm.io: reading CSV / TSV / Parquet files and turning files into sites."""
from __future__ import annotations

import builtins
import gzip
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from fedglmm.errors import InputError
from fedglmm.io import PARQUET_HINT, load_sites, read_table, site_ids

BUNDLED = resources.files("fedglmm") / "data" / "contraception.csv"


@pytest.fixture(scope="module")
def contra() -> pd.DataFrame:
    with resources.as_file(BUNDLED) as p:
        return pd.read_csv(p)


def _one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


# --- reading ----------------------------------------------------------------------------------------

def test_bundled_data(contra):
    assert contra.shape == (1934, 7)
    assert list(contra.columns) == ["woman", "district", "use", "livch", "age", "urban", "region"]
    assert contra["district"].nunique() == 60
    # every district lies in one region: the demo's groups never span sites
    assert (contra.groupby("district")["region"].nunique() == 1).all()
    assert sorted(contra["region"].unique()) == ["east", "north", "south", "west"]


def test_read_csv_types_like_read_csv_in_r():
    with resources.as_file(BUNDLED) as p:
        df = read_table(p)
    # quoted "1", "2" become numbers (as R's read.csv), other text stays text, never categorical
    assert pd.api.types.is_integer_dtype(df["district"])
    assert pd.api.types.is_integer_dtype(df["woman"])
    assert pd.api.types.is_float_dtype(df["age"])
    for col in ("livch", "urban", "region"):
        assert pd.api.types.is_string_dtype(df[col]) and not isinstance(df[col].dtype, pd.CategoricalDtype)
    assert set(df["livch"]) == {"0", "1", "2", "3+"}


@pytest.mark.parametrize("name", ["x.csv", "x.csv.gz", "x.tsv", "x.tsv.gz", "x.parquet", "x.pq", "X.CSV"])
def test_formats_round_trip(tmp_path, contra, name):
    part = contra.iloc[:50].copy()
    path = tmp_path / name
    low = name.lower()
    if low.endswith((".parquet", ".pq")):
        part.to_parquet(path, index=False)
    else:
        part.to_csv(path, index=False, sep="\t" if ".tsv" in low else ",")
    got = read_table(path)
    assert list(got.columns) == list(part.columns)
    assert len(got) == 50
    np.testing.assert_allclose(got["age"].to_numpy(), part["age"].to_numpy())
    assert got["livch"].tolist() == part["livch"].tolist()
    assert got["district"].tolist() == part["district"].tolist()
    assert pd.api.types.is_integer_dtype(got["district"])


def test_parquet_with_index_keeps_it_as_columns(tmp_path, contra):
    path = tmp_path / "x.parquet"
    contra.iloc[:10].set_index("woman").to_parquet(path)
    got = read_table(path)
    assert "woman" in got.columns and len(got) == 10


def test_parquet_unnamed_index_is_dropped(tmp_path, contra):
    path = tmp_path / "x.parquet"
    contra.iloc[100:110].to_parquet(path)          # index 100..109, no name
    got = read_table(path)
    assert list(got.columns) == list(contra.columns)
    assert got.index.tolist() == list(range(1, 11)) and got.index.name == "row"   # rows of the file, for messages


def test_parquet_needs_pyarrow(tmp_path, contra, monkeypatch):
    path = tmp_path / "x.parquet"
    contra.iloc[:10].to_parquet(path)
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(InputError) as e:
        read_table(path)
    assert str(e.value) == PARQUET_HINT
    assert "pip install 'fedglmm[parquet]'" in PARQUET_HINT


# --- reading errors: one line naming the file ---------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        read_table(tmp_path / "nope.csv")
    _one_line_error(e, "nope.csv", "not found")


@pytest.mark.parametrize("content", [b"", b"\n\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "x.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_table(path)
    assert str(e.value).startswith(f"file '{path}' is empty")


def test_header_only_is_empty(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n")
    with pytest.raises(InputError) as e:
        read_table(path)
    assert str(e.value).startswith(f"file '{path}' is empty")


def test_empty_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    pd.DataFrame({"a": pd.Series([], dtype=float)}).to_parquet(path)
    with pytest.raises(InputError) as e:
        read_table(path)
    assert str(e.value).startswith(f"file '{path}' is empty")


@pytest.mark.parametrize("name", ["x.xlsx", "x.json", "x", "x.csv.bz2", "x.txt"])
def test_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as e:
        read_table(path)
    _one_line_error(e, name, "unknown file type", ".csv")


@pytest.mark.parametrize("name, content, fragment", [
    ("ragged.csv", b"a,b\n1,2\n3,4,5,6\n", "cannot read"),
    ("binary.csv", bytes(range(256)) * 20, "cannot read"),
    ("notgzip.csv.gz", b"a,b\n1,2\n", "cannot read"),
    ("text.parquet", b"a,b\n1,2\n", "cannot read"),
    ("truncated.csv.gz", gzip.compress(b"a,b\n1,2\n" * 1000, mtime=0)[:40], "cannot read"),
])
def test_garbled_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_table(path)
    _one_line_error(e, name, fragment)


def test_truncated_parquet(tmp_path, contra):
    path = tmp_path / "x.parquet"
    contra.to_parquet(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError) as e:
        read_table(path)
    _one_line_error(e, "x.parquet", "cannot read")


def test_folder_is_not_a_file(tmp_path):
    path = tmp_path / "dir.csv"
    path.mkdir()
    with pytest.raises(InputError) as e:
        read_table(path)
    _one_line_error(e, "dir.csv", "folder")


def test_wrong_separator_hint(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("a;b;c\n1;2;3\n4;5;6\n")
    with pytest.raises(InputError) as e:
        read_table(path)
    _one_line_error(e, "semi.csv", "';'")


def test_single_column_is_fine(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("y\n1\n2\n")
    assert read_table(path)["y"].tolist() == [1, 2]


# --- sites ------------------------------------------------------------------------------------------

def test_site_ids():
    assert site_ids(["a/north.csv", "b/south.csv.gz", "east.parquet"]) == ["north", "south", "east"]
    assert site_ids(["a/x.csv", "b/x.csv"]) == ["a/x", "b/x"]
    assert site_ids(["a/x.csv", "a/x.parquet", "y.csv"]) == ["a/x#1", "a/x#2", "y"]


def _write_regions(tmp_path, contra, kinds=("csv", "parquet", "tsv", "csv.gz")):
    paths = []
    for (region, part), kind in zip(contra.groupby("region"), kinds):
        path = tmp_path / f"{region}.{kind}"
        if kind == "parquet":
            part.to_parquet(path, index=False)
        else:
            part.to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
        paths.append(path)
    return paths


def test_load_sites_one_file_per_site(tmp_path, contra):
    paths = _write_regions(tmp_path, contra)
    sites = load_sites(paths)
    assert list(sites) == ["east", "north", "south", "west"]
    assert sum(len(f) for f in sites.values()) == len(contra)
    assert set(sites["north"]["region"]) == {"north"}


def test_load_sites_site_column(contra):
    with resources.as_file(BUNDLED) as p:
        sites = load_sites([p], site_column="region")
    assert list(sites) == ["east", "north", "south", "west"]
    assert {k: len(v) for k, v in sites.items()} == {"east": 465, "north": 578, "south": 413, "west": 478}


def test_load_sites_single_file_is_one_site(tmp_path, contra):
    path = tmp_path / "all.csv"
    contra.to_csv(path, index=False)
    sites = load_sites(str(path))
    assert list(sites) == ["all"] and len(sites["all"]) == len(contra)


def test_load_sites_same_stem_in_two_folders(tmp_path, contra):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    contra.iloc[:10].to_csv(tmp_path / "a" / "data.csv", index=False)
    contra.iloc[10:20].to_csv(tmp_path / "b" / "data.csv", index=False)
    sites = load_sites([tmp_path / "a" / "data.csv", tmp_path / "b" / "data.csv"])
    assert list(sites) == ["a/data", "b/data"]


def test_load_sites_errors(tmp_path, contra):
    paths = _write_regions(tmp_path, contra)
    with pytest.raises(InputError) as e:
        load_sites(paths, site_column="region")
    _one_line_error(e, "site column", "4 files")
    with pytest.raises(InputError) as e:
        load_sites([paths[0], paths[1], paths[0]])
    _one_line_error(e, "given twice")
    with pytest.raises(InputError) as e:
        load_sites([])
    _one_line_error(e, "no data files")
    with pytest.raises(InputError) as e:
        load_sites([paths[0]], site_column="hospital")
    _one_line_error(e, paths[0].name, "site column 'hospital' not found")
    with pytest.raises(InputError) as e:      # unknown types are reported before reading anything
        load_sites([tmp_path / "missing.csv", tmp_path / "x.xlsx"])
    _one_line_error(e, "x.xlsx", "unknown file type")


# --- large files: pyarrow's reader gives pandas' frame; only the model's columns --------------------

def test_arrow_reader_gives_pandas_frame(tmp_path, monkeypatch):
    """Above the size threshold a plain file goes through pyarrow: the same columns, types, values and
    line numbers as pandas (missing-value and boolean spellings, dates kept as text); a file with quotes
    or blank lines, a gzipped one, or a garbled one goes to pandas."""
    import fedglmm.io as fio

    text = ("a,b,c,d,e,f,g,h\n1,2.5,x,2020-01-01,true,NA,,None\n2,3.5,y,2020-01-02,FALSE,3,,n/a\n"
            "3,1e3,z,2020-01-03,True,,5,<NA>\n4,0.1,NA,2021-12-31 10:00:00,false,7,6,q\n")
    plain, packed, quoted = tmp_path / "t.csv", tmp_path / "t.csv.gz", tmp_path / "q.csv"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    quoted.write_text(text.replace("x,", '"x",'))
    monkeypatch.setattr(fio, "ARROW_BYTES", 10**9)
    expected = {p: read_table(p) for p in (plain, packed, quoted)}       # pandas
    monkeypatch.setattr(fio, "ARROW_BYTES", 0)
    assert fio._read_arrow(plain, ",", None, "t.csv", None) is not None      # the arrow path is taken
    assert fio._read_arrow(packed, ",", None, "t.csv.gz", None) is None
    assert fio._read_arrow(quoted, ",", None, "q.csv", None) is None
    blank = tmp_path / "b.csv"
    blank.write_text(text.replace("\n2,", "\n\n2,"))
    assert fio._read_arrow(blank, ",", None, "b.csv", None) is None
    for path in (plain, packed, quoted):
        got = read_table(path)
        pd.testing.assert_frame_equal(got, expected[path])
        assert got.attrs == expected[path].attrs
    assert read_table(plain, columns=["g", "a"]).columns.tolist() == ["a", "g"]
    assert read_table(plain, columns=["a", "nope"]).shape == (4, 8)       # a missing column: the whole file
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n1,2,3,4\n")
    with pytest.raises(InputError) as e:
        read_table(bad)
    _one_line_error(e, "bad.csv")


def test_parquet_reads_used_columns(tmp_path):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"y": [0, 1, 1], "x": [0.5, 1.5, 2.5], "g": ["a", "b", "a"], "other": [1, 2, 3]})
    path = tmp_path / "s.parquet"
    df.to_parquet(path)
    from fedglmm.io import used_columns

    cols = used_columns("y ~ log(x) + (1 | g)", "site")
    assert cols == ["y", "x", "g", "site"]
    assert read_table(path, columns=cols[:3]).columns.tolist() == ["y", "x", "g"]
    assert read_table(path, columns=cols).columns.tolist() == ["y", "x", "g", "other"]   # no 'site' column
    sites = load_sites([path], None, columns=["g", "y", "x"])
    assert list(sites["s"].columns) == ["y", "x", "g"]
