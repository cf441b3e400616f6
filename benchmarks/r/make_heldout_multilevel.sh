#!/usr/bin/env bash
# Fit every row of tests/data/heldout/multilevel/cases.tsv with lme4 (ref_lme4.R -> NAME.json) and glmmTMB
# (ref_glmmtmb.R -> NAME.tmb.json).
# usage (from anywhere): bash benchmarks/r/make_heldout_multilevel.sh [case-name-regex]
# Data first: python3 benchmarks/r/make_heldout_multilevel.py (simulations) and
#             Rscript benchmarks/r/export_public_multilevel.R (public data sets).
# R's messages (stderr of both scripts, e.g. "boundary (singular) fit") are appended to fits.log in the
# data directory, with the wall time of each call; the JSON files hold each engine's own fit time
# (`seconds`) and its warnings (`messages`).
# Every case has nagq <= 1 (Laplace or gaussian), so glmmTMB fits every row; REF_WEIGHTS is set from the
# `weights` column.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/r; D=tests/data/heldout/multilevel; pat="${1:-.}"; LOG="$D/fits.log"
now() { date +%s.%N; }
# tabs -> \x1f: with IFS=<tab> bash would merge the empty weights/split fields (tab is IFS whitespace)
tail -n +2 "$D/cases.tsv" | tr '\t' '\037' | while IFS=$'\037' read -r name data formula family nagq reml weights split; do
  [[ "$name" =~ $pat ]] || continue
  export REF_WEIGHTS="$weights"
  {
    echo "== $name  ($data: $formula | $family nAGQ=$nagq REML=$reml weights=${weights:-none} split=${split:-none})"
    t0=$(now)
    Rscript "$R/ref_lme4.R" "$D/$data.csv" "$formula" "$family" "$nagq" "$D/$name.json" "$reml" 2>&1 || echo "lme4 FAILED"
    t1=$(now)
    Rscript "$R/ref_glmmtmb.R" "$D/$data.csv" "$formula" "$family" "$D/$name.tmb.json" "$reml" 2>&1 || echo "glmmTMB FAILED"
    t2=$(now)
    printf -- "-- %s wall: lme4 %.1f s, glmmTMB %.1f s\n" "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)"
  } | tee -a "$LOG" | tail -n 1
done
