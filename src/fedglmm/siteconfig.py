"""A site's disclosure rules and where it keeps its audit log (``site.toml``).

A deployed site reads its rules from a TOML file its data steward controls::

    [disclosure]
    min_rows = 10                 # fewer rows: the site refuses every request
    min_cell = 3                  # smallest count per factor level and per binomial outcome class
    max_params_per_row = 0.33     # (fixed-effect columns + covariance parameters) / rows
    min_group = 10                # smallest group whose own outputs may leave
    allowed_columns = ["use", "age", "urban", "livch", "district"]   # optional

    [audit]
    log = "audit.jsonl"           # relative to the folder of site.toml

``SiteConfig()`` holds the strict defaults above (no column list, no log).  ``SiteConfig.permissive()``
is what a site built in-process without rules does: no rule but the one-shot minimum group size, and
every group's conditional modes are sent.

What each rule means (checked by :class:`fedglmm.site.Site` before anything is sent):

* ``min_rows``: the site's row count (rows of the columns the formula uses);
* ``min_cell``: every level present at the site of every categorical column the formula uses (factor
  columns, ``C(x)`` terms, a factor outcome; not the grouping factor, which ``min_group`` governs) must
  have at least this many rows, and a binomial outcome at least this many successes and this many
  failures (rows with y = 1 and y = 0; for ``cbind(s, f)`` the totals of s and of f);
* ``max_params_per_row``: (fixed-effect columns + random-effect covariance parameters) / rows, the
  columns counted as the site sends them: the agreed design's in ``setup``, and in a one-shot message
  the site's own coding (a column for every factor level it has);
* ``min_group``: a group's size counts its observations: rows, or trials for ``cbind(s, f)`` outcomes.
  Smaller groups' conditional modes are withheld at ``finalize`` (the fit itself is unaffected: the
  likelihood sums are totals over all groups) and their one-shot blocks are not sent;
* ``allowed_columns``: every column the formula names (outcome, covariates, grouping factor, offset)
  must be in the list; the site's description then lists only these columns.

0 switches ``min_rows`` and ``min_cell`` off, ``inf`` switches ``max_params_per_row`` off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import InputError

DISCLOSURE_KEYS = ("min_rows", "min_cell", "max_params_per_row", "min_group", "allowed_columns")
AUDIT_KEYS = ("log",)


@dataclass
class SiteConfig:
    """A site's disclosure rules (see the module docstring)."""

    min_rows: int = 10
    min_cell: int = 3
    max_params_per_row: float = 0.33
    min_group: int = 10
    allowed_columns: list[str] | None = None
    audit_log: str | None = None
    # not read from site.toml: False only for in-process sites without rules (every mode is sent)
    withhold_modes: bool = True
    # the file the rules came from, named in refusals ("min_rows in site.toml")
    source: str | None = field(default=None, compare=False)

    def __post_init__(self):
        for key in ("min_rows", "min_cell", "min_group", "max_params_per_row", "allowed_columns", "audit_log"):
            err = _check_value(key, getattr(self, key))
            if err:
                raise InputError(f"site rules: {err}")
        if self.allowed_columns is not None:
            self.allowed_columns = [str(c) for c in self.allowed_columns]
        self.max_params_per_row = float(self.max_params_per_row)

    @classmethod
    def permissive(cls, min_group: int = 10) -> "SiteConfig":
        """The rules of an in-process site built without any: only the one-shot minimum group size."""
        return cls(min_rows=0, min_cell=0, max_params_per_row=math.inf, min_group=min_group,
                   allowed_columns=None, audit_log=None, withhold_modes=False)

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
            if table not in ("disclosure", "audit"):
                raise InputError(f"site config '{path}': unknown key '{table}' (known tables: [disclosure], [audit])")
            if not isinstance(value, dict):
                raise InputError(f"site config '{path}': '{table}' must be a table ([{table}])")
            known = DISCLOSURE_KEYS if table == "disclosure" else AUDIT_KEYS
            for key, v in value.items():
                if key not in known:
                    raise InputError(f"site config '{path}': unknown key '{table}.{key}' "
                                     f"(known: {', '.join(known)})")
                name = "audit_log" if table == "audit" else key
                err = _check_value(name, v, shown=f"{table}.{key}")
                if err:
                    raise InputError(f"site config '{path}': {err}")
                kwargs[name] = v
        if kwargs.get("audit_log") is not None:
            log = Path(kwargs["audit_log"]).expanduser()
            kwargs["audit_log"] = str(log if log.is_absolute() else (path.parent / log).resolve())
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
    elif key == "min_group":
        if not whole or v < 1:
            return f"'{shown}' must be a whole number ≥ 1, not {v!r}"
    elif key == "max_params_per_row":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
            return f"'{shown}' must be a number > 0, not {v!r}"
    elif key == "allowed_columns":
        if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v)):
            return f"'{shown}' must be a list of column names, not {v!r}"
    elif key == "audit_log":
        if v is not None and (not isinstance(v, (str, Path)) or not str(v)):
            return f"'{shown}' must be a file path, not {v!r}"
    return None
