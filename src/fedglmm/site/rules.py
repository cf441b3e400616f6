"""A site's disclosure rules and where it keeps its audit log (``site.toml``).

A deployed site reads its rules from a TOML file its data steward controls::

    [disclosure]
    min_rows = 10                 # fewer rows: the site refuses every request
    min_cell = 3                  # smallest count per factor level and per binomial outcome class
    max_params_per_row = 0.33     # (fixed-effect columns + covariance parameters) / rows
    min_group = 10                # smallest group whose own outputs may leave
    min_pooled = 5                # fewest small groups pooled in one bin (the hybrid's start); 0: none
    own_fit_modes = true          # the hybrid's own fit (several grouping factors) sends its levels' modes
    allowed_columns = ["use", "age", "urban", "livch", "district"]   # optional

    [limits]
    max_points = 1000             # points per evaluate request
    max_requests = 200            # requests per fit, from its set-up on
    max_fits_per_day = 100        # fits set up per UTC day
    max_param = 1e6               # largest |entry| of a requested point (internal scale)
    max_scaled = 1e5              # largest |entry| of the scaled columns X·transform and Z / zscale here
    require_secure_aggregation = false   # true: sums leave only masked

    [audit]
    log = "audit.jsonl"           # relative to the folder of site.toml
    state = "site-state.json"     # what the limits remember (default: next to the log, none without one)

``SiteConfig()`` holds the strict defaults above (no column list, no log).  ``SiteConfig.permissive()``
is what a site built in-process without rules does: no rule but the one-shot minimum group size, and
every group's conditional modes are sent.

What each rule means (checked by :class:`fedglmm.site.Site`, with the functions below, before anything
is sent):

* ``min_rows``: the site's row count (rows of the columns the formula uses);
* ``min_cell``: every level present at the site of every categorical column the formula uses (factor
  columns, ``C(x)`` terms, a factor outcome; not the grouping factor, which ``min_group`` governs) must
  have at least this many rows, and a binomial outcome at least this many successes and this many
  failures (rows with y = 1 and y = 0; for ``cbind(s, f)`` the totals of s and of f);
* ``max_params_per_row``: (fixed-effect columns + random-effect covariance and dispersion parameters) / rows, the
  columns counted as the site sends them: the agreed design's in ``setup``, and in a one-shot message
  the site's own coding (a column for every factor level it has);
* ``min_group``: a group's size counts its observations: rows, or trials for ``cbind(s, f)`` outcomes;
  with several grouping factors, each level of each factor is a group.  Smaller groups' conditional
  modes are withheld at ``finalize`` (the fit itself is unaffected: the
  likelihood sums are totals over all groups) and their one-shot blocks are not sent;
* ``min_pooled``: for the hybrid's start, the groups of a binary or count (poisson) outcome below
  ``min_group`` leave only pooled: binned by (size, count of positive rows or total count) -- or, for a
  binary outcome, by neighbouring sizes and share of positive rows where sizes are many --, each bin of at least this many groups sending its group count and pooled moments (:mod:`fedglmm.site.pooled`, which says what that reveals); 0: not at all;
* ``own_fit_modes``: with several grouping factors the site's own fit of its rows (the hybrid's start, binomial
  or poisson) also sends the conditional modes and SDs of each factor's levels with at least ``min_group``
  observations (they start the effects of levels shared by sites); false: they stay here (the fit is the same,
  it may take more rounds);
* ``allowed_columns``: every column the formula names (outcome, covariates, grouping factor, offset)
  must be in the list; the site's description then lists only these columns.

The limits bound what a coordinator can ask (checked by :mod:`fedglmm.site.limits`; ``min_rows`` also
governs differencing, see there); 0 switches ``min_rows`` and ``min_cell`` off, ``inf`` switches
``max_params_per_row`` and each limit off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, SiteRefusal
from ..model.formula import variables
from ..model.labels import as_labels, column_kind, level_columns
from ..model.options import MIN_GROUP, MIN_POOLED

DISCLOSURE_KEYS = ("min_rows", "min_cell", "max_params_per_row", "min_group", "min_pooled", "own_fit_modes",
                   "allowed_columns")
LIMIT_KEYS = ("max_points", "max_requests", "max_fits_per_day", "max_param", "max_scaled",
              "require_secure_aggregation")
AUDIT_KEYS = ("log", "state")
_TABLES = {"disclosure": DISCLOSURE_KEYS, "limits": LIMIT_KEYS, "audit": AUDIT_KEYS}


@dataclass
class SiteConfig:
    """A site's disclosure rules (see the module docstring)."""

    min_rows: int = 10
    min_cell: int = 3
    max_params_per_row: float = 0.33
    min_group: int = MIN_GROUP
    min_pooled: int = MIN_POOLED
    own_fit_modes: bool = True
    allowed_columns: list[str] | None = None
    max_points: float = 1000
    max_requests: float = 200
    max_fits_per_day: float = 100
    max_param: float = 1e6
    max_scaled: float = 1e5
    require_secure_aggregation: bool = False
    audit_log: str | None = None
    state_file: str | None = None     # default: next to the audit log (see :attr:`state_path`)
    # not read from site.toml: False only for in-process sites without rules (every mode is sent)
    withhold_modes: bool = True
    # the file the rules came from, named in refusals ("min_rows in site.toml")
    source: str | None = field(default=None, compare=False)

    def __post_init__(self):
        for key in ("min_rows", "min_cell", "min_group", "min_pooled", "max_params_per_row", "own_fit_modes",
                    "allowed_columns", "audit_log", "state_file") + LIMIT_KEYS:
            err = _check_value(key, getattr(self, key))
            if err:
                raise InputError(f"site rules: {err}")
        if self.allowed_columns is not None:
            self.allowed_columns = [str(c) for c in self.allowed_columns]
        self.max_params_per_row = float(self.max_params_per_row)

    @classmethod
    def permissive(cls, min_group: int = MIN_GROUP) -> "SiteConfig":
        """The rules of an in-process site built without any: only the one-shot minimum group size."""
        off = math.inf
        return cls(min_rows=0, min_cell=0, max_params_per_row=off, min_group=min_group, allowed_columns=None,
                   max_points=off, max_requests=off, max_fits_per_day=off, max_param=off, max_scaled=off,
                   audit_log=None, withhold_modes=False)

    @property
    def limited(self) -> bool:
        """Whether any limit on requests applies (the permissive in-process site has none)."""
        return any(getattr(self, k) != math.inf for k in LIMIT_KEYS[:-1]) or self.min_rows > 0 \
            or self.require_secure_aggregation

    @property
    def state_path(self) -> str | None:
        """Where the limits' memory is kept: ``state_file``, else ``<audit log>.state.json``, else nowhere
        (kept in memory for the site's lifetime)."""
        if self.state_file:
            return self.state_file
        return f"{self.audit_log}.state.json" if self.audit_log else None

    @classmethod
    def load(cls, path) -> "SiteConfig":
        """Read ``site.toml``; a missing key keeps its default, an unknown key or a bad value is an error."""
        path = Path(path)
        try:
            import tomllib
        except ModuleNotFoundError:    # Python 3.10
            raise InputError(f"cannot read site config '{path}': reading TOML needs Python ≥ 3.11") from None
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as e:
            raise InputError(f"cannot read site config '{path}': {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"site config '{path}' is not valid TOML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError:
            raise InputError(f"site config '{path}' is not UTF-8 text") from None
        kwargs = {}
        for table, value in doc.items():
            if table not in _TABLES:
                raise InputError(f"site config '{path}': unknown key '{table}' (known tables: "
                                 f"{', '.join(f'[{t}]' for t in _TABLES)})")
            if not isinstance(value, dict):
                raise InputError(f"site config '{path}': '{table}' must be a table ([{table}])")
            known = _TABLES[table]
            for key, v in value.items():
                if key not in known:
                    raise InputError(f"site config '{path}': unknown key '{table}.{key}' "
                                     f"(known: {', '.join(known)})")
                name = {"log": "audit_log", "state": "state_file"}.get(key, key) if table == "audit" else key
                err = _check_value(name, v, shown=f"{table}.{key}")
                if err:
                    raise InputError(f"site config '{path}': {err}")
                kwargs[name] = v
        for name in ("audit_log", "state_file"):
            if kwargs.get(name) is not None:
                file = Path(kwargs[name]).expanduser()
                kwargs[name] = str(file if file.is_absolute() else (path.parent / file).resolve())
        return cls(**kwargs, source=path.name)

    def where(self, key: str) -> str:
        """How a refusal names the rule: ``min_rows in site.toml``."""
        return f"{key} in {self.source}" if self.source else f"{key} in the site's rules"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


def _check_value(key: str, v, shown: str | None = None) -> str | None:
    """None if ``v`` is a valid value of ``key``, else a one-line reason."""
    shown = shown or key
    whole = isinstance(v, int) and not isinstance(v, bool)
    if key in ("min_rows", "min_cell"):
        if not whole or v < 0:
            return f"'{shown}' must be a whole number ≥ 0, not {v!r}"
    elif key == "min_pooled":
        if not whole or v < 0 or v in (1, 2):
            return f"'{shown}' must be 0 (no pooled bins) or a whole number ≥ 3, not {v!r}"
    elif key == "min_group":
        if not whole or v < 1:
            return f"'{shown}' must be a whole number ≥ 1, not {v!r}"
    elif key == "max_params_per_row":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
            return f"'{shown}' must be a number > 0, not {v!r}"
    elif key == "allowed_columns":
        if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v)):
            return f"'{shown}' must be a list of column names, not {v!r}"
    elif key in ("audit_log", "state_file"):
        if v is not None and (not isinstance(v, (str, Path)) or not str(v)):
            return f"'{shown}' must be a file path, not {v!r}"
    elif key in ("max_points", "max_requests", "max_fits_per_day"):
        if not ((whole and v >= 1) or v == math.inf):
            return f"'{shown}' must be a whole number ≥ 1 (or inf), not {v!r}"
    elif key in ("max_param", "max_scaled"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
            return f"'{shown}' must be a number > 0, not {v!r}"
    elif key in ("require_secure_aggregation", "own_fit_modes"):
        if not isinstance(v, bool):
            return f"'{shown}' must be true or false, not {v!r}"
    return None


# --- the checks -------------------------------------------------------------------------------------

def refuse(config: SiteConfig, site_id: str, what: str, key: str):
    """Stop the request with the site's one-line reason, naming the rule."""
    raise SiteRefusal(f"site '{site_id}' refuses: {what} ({config.where(key)})")


def check_frame(config: SiteConfig, site_id: str, spec, frame: pd.DataFrame) -> None:
    """Rules checked before the frame is read: allowed columns and the row count."""
    if config.allowed_columns is not None:
        bad = [c for c in variables(spec) if c not in config.allowed_columns]
        if bad:
            cols = ", ".join(f"'{c}'" for c in bad)
            refuse(config, site_id, f"column{'s' if len(bad) > 1 else ''} {cols} "
                   f"{'are' if len(bad) > 1 else 'is'} not among its allowed columns", "allowed_columns")
    if config.min_rows and len(frame) < config.min_rows:
        refuse(config, site_id, f"{len(frame)} rows, fewer than the minimum of {config.min_rows}", "min_rows")


def check_cells(config: SiteConfig, site_id: str, spec, frame: pd.DataFrame) -> None:
    """Every level present here of every factor the model uses has at least ``min_cell`` rows."""
    if not config.min_cell:
        return
    kinds = {str(c): column_kind(dt) for c, dt in frame.dtypes.items()}
    for col in level_columns(spec, kinds):
        counts = pd.Series(as_labels(frame[col])).value_counts(sort=False)
        small = counts[counts < config.min_cell]
        if len(small):
            level = sorted(small.index, key=str)[0]
            refuse(config, site_id, f"column '{col}' level '{level}' has {int(small[level])} rows, fewer than "
                   f"the minimum of {config.min_cell}", "min_cell")


def check_model(config: SiteConfig, site_id: str, spec, n: int, p: int, ntheta: int, family, successes=None,
                trials=None) -> None:
    """Rules on the model: parameters per row and the binomial outcome classes."""
    nd = int(getattr(family, "ndisp", 0))
    k = p + ntheta + nd
    if np.isfinite(config.max_params_per_row) and (n == 0 or k / n > config.max_params_per_row):
        ratio = "no rows" if n == 0 else f"{k / n:.3g} per row"
        disp = f", {nd} dispersion parameter" if nd else ""
        refuse(config, site_id, f"{k} parameters ({p} fixed-effect column{'s' if p != 1 else ''}, {ntheta} "
               f"covariance parameter{'s' if ntheta != 1 else ''}{disp}) for {n} rows is {ratio}, more than the "
               f"maximum of {config.max_params_per_row:g}", "max_params_per_row")
    if config.min_cell and family.name == "binomial":
        for what, count in (("successes", successes), ("failures", trials - successes)):
            if count < config.min_cell:
                refuse(config, site_id, f"outcome '{spec.response}' has {count:g} {what}, fewer than the minimum "
                       f"of {config.min_cell}", "min_cell")


def group_sizes(design, family) -> np.ndarray:
    """Observations per group: rows, or trials for ``cbind`` binomial outcomes (as the one-shot rule)."""
    weight = design.trials if family is not None and family.name == "binomial" else np.ones(design.n)
    return np.add.reduceat(weight, design.starts)



def factor_sizes(design, family) -> dict:
    """Observations per level of each grouping factor (as :func:`group_sizes`), by factor name."""
    weight = design.trials if family is not None and family.name == "binomial" else np.ones(design.n)
    return {f.name: np.bincount(f.codes, weight, len(f.levels)) for f in design.groupings}
