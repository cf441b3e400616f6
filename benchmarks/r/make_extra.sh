#!/usr/bin/env bash
# Regenerate the extra reference fits in tests/data from tests/data/extra_cases.tsv.
# usage (from the repo root): bash benchmarks/r/make_extra.sh [case-name-regex]
# Data: python3 benchmarks/r/make_extra_data.py (simulated sets); cbpp, sleepstudy, grouseticks and
# contraception are byte copies of /work/shared/reference/data/*.csv (see tests/data/SOURCES.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/r; D=tests/data; pat="${1:-.}"
tail -n +2 "$D/extra_cases.tsv" | while IFS=$'\t' read -r name data formula family link nagq reml; do
  [[ "$name" =~ $pat ]] || continue
  t0=$(date +%s.%N)
  Rscript "$R/ref_fit.R" "$D/$data.csv" "$formula" "$family" "$nagq" "$D/extra_$name.json" "$reml" "$link"
  t1=$(date +%s.%N)
  msg="$name: lme4 $(printf '%.1f' "$(echo "$t1 - $t0" | bc)")s wall"
  if [[ "$nagq" -le 1 ]]; then   # glmmTMB is Laplace only: Laplace and gaussian cases
    Rscript "$R/ref_tmb.R" "$D/$data.csv" "$formula" "$family" "$D/extra_$name.tmb.json" "$reml" "$link"
    msg="$msg, glmmTMB $(printf '%.1f' "$(echo "$(date +%s.%N) - $t1" | bc)")s wall"
  fi
  echo "$msg"
done
