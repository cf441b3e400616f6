"""Schema agreement and model matrices, on lme4's and mlmRev's datasets (tests/data/SOURCES.md).

Expected column names are the coefficients lme4 reports for these formulas (reference/lme4/*.json:
``urbanY``, ``livch3+``, ``I(age^2)``), written the way formulaic names them."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedglmm.model.design import build_design, describe_frame, new_data_matrices
from fedglmm.coordinator.schema import merge_schema
from fedglmm.errors import InputError, SchemaError
from fedglmm.model.formula import parse_formula

DATA = Path(__file__).parent / "data"
CONTRA = "use ~ urban + age + I(age**2) + livch + (1 | district)"
CONTRA_X = ["Intercept", "urban[T.Y]", "age", "I(age ** 2)", "livch[T.1]", "livch[T.2]", "livch[T.3+]"]


def read(name):
    return pd.read_csv(DATA / f"{name}.csv")


def fit_inputs(frames: dict, formula: str, family: str):
    """The whole flow: describe at each site, merge, build each site's design."""
    spec = parse_formula(formula)
    desc = {s: describe_frame(df, spec, s) for s, df in frames.items()}
    schema = merge_schema(desc, spec, family)
    return spec, schema, {s: build_design(spec, schema, df, family, s) for s, df in frames.items()}


def error(kind, fn, *args):
    with pytest.raises(kind) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- model matrices -------------------------------------------------------------------------------

def test_contraception_columns_match_lme4():
    df = read("contraception")
    _, schema, d = fit_inputs({"A": df}, CONTRA, "binomial")
    d = d["A"]
    assert d.x_names == CONTRA_X
    assert schema.levels == {"urban": ["N", "Y"], "livch": ["0", "1", "2", "3+"]}
    assert schema.kinds == {"use": "numeric", "urban": "categorical", "age": "numeric",
                            "livch": "categorical", "district": "numeric"}
    assert d.X.shape == (1934, 7) and d.Z.shape == (1934, 1) and d.z_names == ["Intercept"]
    assert d.group_levels == [str(i) for i in sorted(df.district.unique())]   # numeric order
    assert len(d.group_levels) == 60 and np.all(np.diff(d.group) >= 0)
    assert np.array_equal(d.starts, np.flatnonzero(np.r_[True, np.diff(d.group) != 0]))
    order = np.argsort(df.district.to_numpy(), kind="stable")
    assert np.array_equal(d.y, df.use.to_numpy()[order])
    assert np.allclose(d.X[:, 3], df.age.to_numpy()[order] ** 2)
    assert np.array_equal(d.X[:, 6], (df.livch.to_numpy()[order] == "3+").astype(float))
    assert np.all(d.trials == 1) and np.all(d.offset == 0) and d.group_name == "district"
    assert d.theta_mask.tolist() == [[True]]


def test_site_lacking_a_level_gets_all_columns():
    df = read("contraception")
    a, b = df[df.livch != "3+"], df[df.livch == "3+"]
    _, schema, d = fit_inputs({"A": a, "B": b}, "use ~ urban + livch + (1 | woman)", "binomial")
    assert d["A"].x_names == d["B"].x_names == ["Intercept", "urban[T.Y]", "livch[T.1]", "livch[T.2]",
                                                "livch[T.3+]"]
    assert np.all(d["A"].X[:, 4] == 0) and np.all(d["B"].X[:, 4] == 1)
    assert np.all(d["B"].X[:, 2:4] == 0)


def test_sites_stacked_equal_pooled_design():
    df = read("contraception")
    f = "use ~ urban + age + I(age**2) + livch + (urban | district)"
    sites = {"A": df[df.district <= 20], "B": df[(df.district > 20) & (df.district <= 45)],
             "C": df[(df.district > 45) & (df.livch != "3+")]}
    _, schema, parts = fit_inputs(sites, f, "binomial")
    _, pooled_schema, pooled = fit_inputs({"all": pd.concat(sites.values())}, f, "binomial")
    pooled = pooled["all"]
    assert schema == pooled_schema
    labels = np.concatenate([np.asarray(d.group_levels)[d.group] for d in parts.values()])
    code = {lab: i for i, lab in enumerate(pooled.group_levels)}
    order = np.argsort([code[x] for x in labels], kind="stable")
    for field in ("y", "trials", "offset", "X", "Z"):
        stacked = np.concatenate([getattr(d, field) for d in parts.values()])[order]
        assert np.array_equal(stacked, getattr(pooled, field)), field
    assert np.array_equal(labels[order], np.asarray(pooled.group_levels)[pooled.group])
    for d in parts.values():
        assert d.x_names == pooled.x_names and d.z_names == pooled.z_names == ["Intercept", "urban[T.Y]"]
        assert np.array_equal(d.theta_mask, pooled.theta_mask)


@pytest.mark.parametrize("f, mask, z_names", [
    ("Reaction ~ Days + (Days | Subject)", [[1, 0], [1, 1]], ["Intercept", "Days"]),
    ("Reaction ~ Days + (Days || Subject)", [[1, 0], [0, 1]], ["Intercept", "Days"]),
    ("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", [[1, 0], [0, 1]], ["Intercept", "Days"]),
    ("Reaction ~ Days + (1 | Subject)", [[1]], ["Intercept"]),
    ("Reaction ~ Days + (1 + Days + I(Days**2) | Subject)", np.tril(np.ones((3, 3))),
     ["Intercept", "Days", "I(Days ** 2)"]),
])
def test_sleepstudy_theta_mask(f, mask, z_names):
    df = read("sleepstudy")
    _, _, d = fit_inputs({"A": df}, f, "gaussian")
    d = d["A"]
    assert d.theta_mask.dtype == bool and d.theta_mask.tolist() == np.asarray(mask, bool).tolist()
    assert d.z_names == z_names
    assert d.group_levels == [str(s) for s in sorted(df.Subject.unique())]
    assert np.allclose(d.Z[:, 0], 1) and np.allclose(d.Z[:, -1], d.X[:, 1] ** (len(z_names) - 1))


def test_uncorrelated_factor_term_is_diagonal():
    df = read("contraception")
    _, _, d = fit_inputs({"A": df}, "use ~ urban + (urban || district)", "binomial")
    assert d["A"].z_names == ["Intercept", "urban[N]", "urban[Y]"]     # lme4: (1|g) + (0 + urban|g)
    assert d["A"].theta_mask.tolist() == np.eye(3, dtype=bool).tolist()


def test_cbpp_cbind_trials_and_string_group_order():
    df = read("cbpp")
    _, _, d = fit_inputs({"A": df}, "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial")
    d = d["A"]
    order = np.argsort(df.herd.to_numpy(), kind="stable")
    assert d.group_levels == sorted(df.herd.unique())                    # 'h1', 'h10', ..., 'h9'
    assert np.array_equal(d.y, df.incidence.to_numpy()[order])
    assert np.array_equal(d.trials, df["size"].to_numpy()[order])
    assert d.x_names == ["Intercept", "period"]                          # numeric, as in lme4/cbpp_la.json


def test_factor_of_a_numeric_column_gets_agreed_levels():
    df = read("cbpp")
    f = "cbind(incidence, size - incidence) ~ C(period) + (1 | herd)"
    first = df.herd.isin(["h1", "h2", "h3"])
    sites = {"A": df[first & (df.period <= 2)], "B": df[~first]}       # A has periods 1 and 2 only
    _, schema, d = fit_inputs(sites, f, "binomial")
    assert schema.levels == {"period": ["1", "2", "3", "4"]}
    assert d["A"].x_names == d["B"].x_names == ["Intercept", "C(period)[T.2]", "C(period)[T.3]", "C(period)[T.4]"]
    assert np.all(d["A"].X[:, 2:] == 0)


def test_offset_and_glm():
    df = pd.DataFrame({"y": [1, 0, 3, 2], "x": [0.5, 1.0, 1.5, 2.0], "t": [1.0, 2.0, 4.0, 0.5]})
    _, _, d = fit_inputs({"A": df}, "y ~ x + offset(log(t)) + offset(x/2)", "poisson")
    d = d["A"]
    assert np.allclose(d.offset, np.log(df.t) + df.x / 2) and d.x_names == ["Intercept", "x"]
    assert d.Z.shape == (4, 0) and d.theta_mask.shape == (0, 0) and d.group_name is None
    assert d.group.tolist() == [0, 0, 0, 0] and d.group_levels == ["."]
    assert np.array_equal(d.y, df.y) and list(d.starts) == [0]


def test_factor_outcome_for_binomial_first_level_is_failure():
    df = read("contraception").assign(use=lambda d: np.where(d.use == 1, "Y", "N"))
    _, schema, d = fit_inputs({"A": df}, CONTRA, "binomial")
    assert schema.levels["use"] == ["N", "Y"]
    order = np.argsort(df.district.to_numpy(), kind="stable")
    assert np.array_equal(d["A"].y, (df.use.to_numpy()[order] == "Y").astype(float))


def test_describe_is_json_and_labels_are_text():
    df = pd.DataFrame({"y": [0, 1, 1], "g": [3.0, 1.0, 12.0], "f": [True, False, True], "z": ["a", "b", "a"]})
    spec = parse_formula("y ~ f + (1 | g)")
    desc = describe_frame(df, spec, "A")
    assert json.loads(json.dumps(desc)) == desc
    assert desc["n"] == 3 and desc["groups"] == ["1", "3", "12"]
    assert desc["columns"] == {"y": "numeric", "g": "numeric", "f": "categorical", "z": "categorical"}
    assert desc["levels"] == {"f": ["False", "True"]}
    d = build_design(spec, merge_schema({"A": desc}, spec, "binomial"), df, "binomial", "A")
    assert d.x_names == ["Intercept", "f[T.True]"] and d.group.tolist() == [0, 1, 2]
    assert d.y.tolist() == [1, 0, 1]                                   # rows sorted by group 1, 3, 12


def test_new_data_matrices():
    df = read("contraception")
    spec, schema, d = fit_inputs({"A": df}, CONTRA, "binomial")
    new = df.drop(columns="use").iloc[[5, 0, 900]]
    X, Z, off, groups = new_data_matrices(spec, schema, new, need_group=True)
    assert X.shape == (3, 7) and Z.shape == (3, 1) and np.all(off == 0)
    assert list(groups["district"]) == [str(g) for g in new.district] and isinstance(groups["district"][0], str)
    assert np.allclose(X[:, 2], new.age)                                # rows in the given order
    X2, _, _, none = new_data_matrices(spec, schema, new.drop(columns="district").iloc[:1], need_group=False)
    assert none is None and np.array_equal(X2, X[:1])
    msg = error(InputError, new_data_matrices, spec, schema, new.drop(columns="district"), True)
    assert "grouping column 'district' not found" in msg
    msg = error(InputError, new_data_matrices, spec, schema, new.assign(livch="5"), False)
    assert "column 'livch' has level '5' in row 1" in msg


# --- errors: one line, naming the site and the column ---------------------------------------------

@pytest.fixture
def contra():
    return read("contraception")


def test_no_rows(contra):
    assert error(InputError, describe_frame, contra.iloc[:0], parse_formula(CONTRA), "A") == "site 'A': no rows"


def test_missing_column(contra):
    msg = error(InputError, describe_frame, contra, parse_formula("use ~ agee + (1|district)"), "A")
    assert msg == "site 'A': column 'agee' not found (columns: woman, district, use, livch, age, urban)"


def test_missing_values(contra):
    bad = contra.copy()
    bad.loc[[16, 20, 30], "age"] = np.nan
    msg = error(InputError, describe_frame, bad, parse_formula(CONTRA), "A")
    assert msg == "site 'A': column 'age' has 3 missing values (first in row 17)"
    assert "column 'age' has 3 missing" in error(InputError, build_design, parse_formula(CONTRA), None, bad,
                                                 "binomial", "A")


def test_non_finite_values(contra):
    bad = contra.assign(age=contra.age.where(contra.index != 4, np.inf))
    msg = error(InputError, describe_frame, bad, parse_formula(CONTRA), "B")
    assert msg == "site 'B': column 'age' has non-finite value inf in row 5"
    df = pd.DataFrame({"y": [1, 2], "t": [1.0, 0.0], "g": ["a", "b"]})
    spec = parse_formula("y ~ offset(log(t)) + (1 | g)")
    schema = merge_schema({"A": describe_frame(df, spec, "A")}, spec, "poisson")
    msg = error(InputError, build_design, spec, schema, df, "poisson", "A")
    assert msg == "site 'A': offset 'log(t)' has non-finite value -inf in row 2"


def test_column_sets_differ(contra):
    spec = parse_formula(CONTRA)
    a, b = describe_frame(contra, spec, "A"), describe_frame(contra.assign(x2=1.0), spec, "B")
    assert error(SchemaError, merge_schema, {"A": a, "B": b}, spec, "binomial") == (
        "site 'B' has columns that site 'A' lacks: x2")
    assert error(SchemaError, merge_schema, {"B": b, "A": a}, spec, "binomial") == (
        "site 'A' lacks columns that site 'B' has: x2")


def test_numeric_column_with_text_at_one_site(contra):
    spec = parse_formula(CONTRA)
    a, b = contra[contra.district <= 30], contra[contra.district > 30].copy()
    b["age"] = b.age.astype(object)
    b.iloc[4, b.columns.get_loc("age")] = "abc"
    # refused at the site itself, before anything about the column leaves it
    assert error(InputError, describe_frame, b, spec, "B") == (
        "site 'B': column 'age' has non-numeric value 'abc' in row 5 (the other values are numbers; "
        "write C(age) in the formula if it is a factor)")
    assert "abc" in describe_frame(b, parse_formula("use ~ urban + C(age) + (1 | district)"), "B")["levels"]["age"]
    b["age"] = np.where(b.age.astype(str) == "abc", "young", "old")
    desc = {"A": describe_frame(a, spec, "A"), "B": describe_frame(b, spec, "B")}
    assert error(SchemaError, merge_schema, desc, spec, "binomial") == (
        "column 'age' is numeric at site 'A' but holds text at site 'B'")


def test_typo_in_numeric_column_at_the_only_site(contra):
    spec = parse_formula("use ~ urban + age + (1 | district)")
    b = contra.copy()
    b["age"] = b.age.astype(object)
    b.iloc[9, b.columns.get_loc("age")] = "n/a?"
    assert "non-numeric value 'n/a?' in row 10" in error(InputError, describe_frame, b, spec, "only")


def test_factor_with_number_like_labels_is_kept(contra):
    """livch ('0', '1', '2', '3+') is a factor: its text labels are common, not a typo."""
    desc = describe_frame(contra, parse_formula(CONTRA), "A")
    assert desc["levels"]["livch"] == ["0", "1", "2", "3+"]


def test_factor_of_codes_at_a_site_where_its_text_label_is_rare(contra):
    """A site whose rows hold one '3+' among hundreds of '0'-'2' still has a factor of codes, not a typo: the
    share of a label at one site depends on the split (mlmRev's guImmun 'ord' split by community)."""
    rare = pd.concat([contra[contra.livch.astype(str) != "3+"], contra[contra.livch.astype(str) == "3+"].iloc[:1]])
    assert describe_frame(rare, parse_formula(CONTRA), "A")["levels"]["livch"] == ["0", "1", "2", "3+"]


def test_group_at_two_sites(contra):
    spec = parse_formula(CONTRA)
    desc = {"A": describe_frame(contra[contra.district <= 12], spec, "A"),
            "B": describe_frame(contra[contra.district >= 12], spec, "B")}
    assert error(SchemaError, merge_schema, desc, spec, "negative_binomial") == (
        "group 'district' level '12' is present at sites 'A' and 'B'; levels shared by sites are fitted for "
        "gaussian, binomial and poisson models (negative_binomial models need each group at one site)")


def test_group_column_may_differ_in_kind(contra):
    spec = parse_formula(CONTRA)
    a, b = contra[contra.district <= 12], contra[contra.district > 12]
    b = b.assign(district=b.district.astype(float).astype(str))       # '13.0' is not '13': still text
    desc = {"A": describe_frame(a, spec, "A"), "B": describe_frame(b, spec, "B")}
    assert merge_schema(desc, spec, "binomial").kinds["district"] == "categorical"


def test_outcome_not_numeric(contra):
    text = contra.assign(use=np.where(contra.use == 1, "Y", "N"))
    spec = parse_formula(CONTRA)
    assert error(SchemaError, merge_schema, {"A": describe_frame(text, spec, "A")}, spec, "poisson") == (
        "outcome 'use' is not numeric (only a binomial outcome may be a factor)")
    three = text.assign(use=np.where(text.index % 3 == 0, "maybe", text.use))
    msg = error(SchemaError, merge_schema, {"A": describe_frame(three, spec, "A")}, spec, "binomial")
    assert msg.startswith("binomial outcome 'use' must have two levels")
    schema = merge_schema({"A": describe_frame(contra, spec, "A")}, spec, "binomial")
    assert error(InputError, build_design, spec, schema, text, "binomial", "A") == (
        "site 'A': outcome 'use' is not numeric (value 'N' in row 1)")


def test_family_validation_names_the_site(contra):
    spec = parse_formula(CONTRA)
    bad = contra.assign(use=contra.use * 2)
    schema = merge_schema({"A": describe_frame(bad, spec, "A")}, spec, "binomial")
    msg = error(InputError, build_design, spec, schema, bad, "binomial", "A")
    assert msg.startswith("binomial outcome must be 0 or 1 at site 'A'")


def test_formulaic_errors_become_one_line(contra):
    spec = parse_formula("use ~ foo(age) + (1 | district)")
    schema = merge_schema({"A": describe_frame(contra, spec, "A")}, spec, "binomial")
    msg = error(InputError, build_design, spec, schema, contra, "binomial", "A")
    assert msg.startswith("site 'A': cannot evaluate 'foo(age)'") and "foo" in msg


def test_grouseticks_columns_match_lme4():
    df = read("grouseticks")
    _, _, d = fit_inputs({"A": df}, "TICKS ~ YEAR + HEIGHT + (1 | LOCATION)", "poisson")
    assert d["A"].x_names == ["Intercept", "YEAR", "HEIGHT"]          # lme4/grouseticks_la.json
    assert d["A"].group_levels == [str(v) for v in sorted(df.LOCATION.unique())]


def test_dotted_outcome_name():
    df = read("sleepstudy").rename(columns={"Reaction": "Reaction.time"})
    _, _, d = fit_inputs({"A": df}, "Reaction.time ~ Days + (1 | Subject)", "gaussian")
    order = np.argsort(df.Subject.to_numpy(), kind="stable")
    assert np.array_equal(d["A"].y, df["Reaction.time"].to_numpy()[order])


def test_description_holds_no_cell_values(contra):
    """Only counts, column kinds, factor levels and group labels leave a site in the describe round."""
    desc = describe_frame(contra, parse_formula(CONTRA), "A")
    assert set(desc) == {"n", "columns", "levels", "groups"}
    assert set(desc["levels"]) == {"urban", "livch"}


def test_offset_column_must_be_numeric():
    df = pd.DataFrame({"y": [1, 2], "t": ["a", "b"], "g": ["a", "b"]})
    spec = parse_formula("y ~ offset(log(t)) + (1 | g)")
    assert error(SchemaError, merge_schema, {"A": describe_frame(df, spec, "A")}, spec, "poisson") == (
        "column 't' is used as a number in 'log(t)' but is not numeric")


def test_duplicate_column_refused(contra):
    dup = pd.concat([contra, contra[["age"]]], axis=1)
    assert error(InputError, describe_frame, dup, parse_formula(CONTRA), "A") == (
        "site 'A': column 'age' appears more than once")


# --- several grouping factors ---------------------------------------------------------------------

HELDOUT = DATA / "heldout" / "multilevel"


def test_nested_factors_design():
    """(1 | batch/cask): factors batch and cask:batch, levels as lme4 labels them ('a:A' = cask a of
    batch A), each factor's Z columns and its own row codes."""
    df = pd.read_csv(HELDOUT / "pastes.csv")
    spec, _, d = fit_inputs({"A": df}, "strength ~ 1 + (1 | batch/cask)", "gaussian")
    d = d["A"]
    assert [f.name for f in d.factors] == ["batch", "cask:batch"]
    batch, cask = d.factors
    assert len(batch.levels) == 10 and len(cask.levels) == 30 and "a:A" in cask.levels
    assert batch.columns.tolist() == [0] and cask.columns.tolist() == [1]
    assert np.array_equal(d.theta_mask, np.eye(2, dtype=bool))
    # every row's codes point at its own labels
    rows = df.iloc[np.argsort(pd.factorize(df.batch, sort=True)[0], kind="stable")]
    assert [batch.levels[c] for c in batch.codes] == rows.batch.tolist()
    assert [cask.levels[c] for c in cask.codes] == (rows.cask + ":" + rows.batch).tolist()


def test_several_factors_slopes_columns():
    df = pd.read_csv(HELDOUT / "sim_gauss3.csv")
    _, _, d = fit_inputs({"A": df}, "y ~ time + (1 + time | patient) + (1 | hospital)", "gaussian")
    d = d["A"]
    assert d.z_names == ["Intercept", "time", "Intercept"]
    assert [f.columns.tolist() for f in d.factors] == [[0, 1], [2]]
    assert d.theta_mask.sum() == 4          # (1 + time | patient): 3, (1 | hospital): 1


def test_describe_lists_every_factor_and_schema_finds_shared_levels():
    df = pd.read_csv(HELDOUT / "pastes.csv")
    spec = parse_formula("strength ~ 1 + (1 | batch) + (1 | sample)")
    desc = describe_frame(df, spec, "A")
    assert set(desc["groups"]) == {"batch", "sample"} and len(desc["groups"]["sample"]) == 30
    a, b = df[df.batch <= "E"], df[df.batch > "E"]
    assert merge_schema({"A": describe_frame(a, spec, "A"), "B": describe_frame(b, spec, "B")}, spec,
                        "gaussian").shared == {}
    b = pd.concat([b, a.iloc[[0]]])            # sample 'A:a' (batch 'A') now at both sites
    schema = merge_schema({"A": describe_frame(a, spec, "A"), "B": describe_frame(b, spec, "B")}, spec, "gaussian")
    assert schema.shared == {"batch": {"A": 2}, "sample": {"A:a": 2}}
    assert schema.nlevels == {"batch": 10, "sample": 30}
    msg = error(SchemaError, merge_schema, {"A": describe_frame(a, spec, "A"),
                                            "B": describe_frame(b, spec, "B")}, spec, "gamma")
    assert msg.startswith("group 'batch' level 'A' is present at sites 'A' and 'B'; levels shared by sites")


def test_integer_factor_codes_equal_the_labels_codes():
    """A factor of one integer column is coded from its numbers: the same codes and levels as from its text
    labels (natural order: -3 < 2 < 10), for unsorted rows and negative numbers."""
    from fedglmm.model.design import factor_codes, factor_labels
    from fedglmm.model.formula import parse_formula
    from fedglmm.model.labels import group_codes

    rng = np.random.default_rng(5)
    df = pd.DataFrame({"y": rng.normal(size=200), "g": rng.choice([10, -3, 2, 7, 100, 0], 200),
                       "h": rng.choice(["b", "a", "10", "9"], 200)})
    for formula, g in (("y ~ 1 + (1 | g)", "g"), ("y ~ 1 + (1 | h)", "h"), ("y ~ 1 + (1 | g:h)", "g:h")):
        spec = parse_formula(formula)
        codes, levels = factor_codes(df, spec, spec.groups[0])
        want_codes, want_levels = group_codes(factor_labels(df, spec, spec.groups[0]))
        assert levels == want_levels and np.array_equal(codes, want_codes), formula
    assert factor_codes(df, parse_formula("y ~ 1 + (1 | g)"), "g")[1] == ["-3", "0", "2", "7", "10", "100"]
