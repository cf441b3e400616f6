#!/usr/bin/env bash
# Regenerate the toolbox references in tests/data/toolbox (anova, profile intervals, Satterthwaite,
# VarCorr/ICC/posterior means) from their case tables.
# usage (repo root): bash benchmarks/r/make_toolbox.sh [part ...]
#   parts: data anova profile lmertest varcorr check (default: all, in that order)
#   PAT=regex limits the R parts to matching case names; PYTHON=... picks the interpreter for `data`
#   (needs numpy and pandas) and `check` (standard library only).
# R 4.2 with lme4 1.1-31, lmerTest 3.1-3, glmmTMB 1.1.5, numDeriv and jsonlite (Debian r-cran-* packages).
# The profile part is slow: about 15 minutes on 2 cores, mostly contraception_la and contraception_slope.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/r; T=tests/data/toolbox; PY="${PYTHON:-python3}"; pat="${PAT:-.}"
parts=("$@"); [[ ${#parts[@]} -gt 0 ]] || parts=(data anova profile lmertest varcorr check)
for p in "${parts[@]}"; do
  t0=$(date +%s)
  case "$p" in
    data)     "$PY" "$R/make_toolbox_data.py" "$T" ;;
    anova)    Rscript "$R/ref_anova.R" "$T/anova.tsv" "$pat" ;;
    profile)  Rscript "$R/ref_profile.R" "$T/profile.tsv" "$pat" ;;
    lmertest) Rscript "$R/ref_lmertest.R" "$T/lmertest.tsv" "$pat" ;;
    varcorr)  Rscript "$R/ref_varcorr.R" "$T/varcorr.tsv" "$pat" ;;
    check)    "$PY" "$T/check_toolbox.py" ;;
    *) echo "unknown part: $p" >&2; exit 2 ;;
  esac
  echo "== $p: $(( $(date +%s) - t0 ))s wall"
done
