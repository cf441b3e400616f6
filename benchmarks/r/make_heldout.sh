#!/usr/bin/env bash
# Reference fits for one held-out group: every row of tests/data/heldout/GROUP/cases.tsv.
# usage (from the repo root): bash benchmarks/r/make_heldout.sh GROUP [case-name-regex]
# Writes tests/data/heldout/GROUP/NAME.json (lme4, benchmarks/r/ref_lme4.R) for every case and NAME.tmb.json
# (glmmTMB, benchmarks/r/ref_glmmtmb.R) for nagq <= 1 (glmmTMB has no adaptive quadrature).
# Columns are found by the header (first line, "# name<TAB>data<TAB>..."): name, data (CSV file without
# .csv in the group folder), formula, family, nagq, reml, weights (column of prior weights or empty), split;
# an optional formula_r column, where not empty, is the formula handed to R instead of formula.
# Data first: Rscript benchmarks/r/export_heldout_public.R; python3 benchmarks/r/make_heldout_GROUP.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/r; group="$1"; pat="${2:-.}"; D="tests/data/heldout/$group"
IFS=$'\t' read -r -a hdr < <(head -n 1 "$D/cases.tsv" | sed 's/^# *//')
declare -A col; for i in "${!hdr[@]}"; do col[${hdr[$i]}]=$i; done
tail -n +2 "$D/cases.tsv" | while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  IFS=$'\x1f' read -r -a f <<< "${line//$'\t'/$'\x1f'}"  # tabs are IFS whitespace: empty fields would merge
  name=${f[${col[name]}]}; data=${f[${col[data]}]}; formula=${f[${col[formula]}]}
  family=${f[${col[family]}]}; nagq=${f[${col[nagq]}]}; reml=${f[${col[reml]}]:-0}
  weights=${f[${col[weights]}]:-}
  if [[ -n "${col[formula_r]:-}" && -n "${f[${col[formula_r]}]:-}" ]]; then formula=${f[${col[formula_r]}]}; fi
  [[ "$name" =~ $pat ]] || continue
  t0=$(date +%s.%N)
  REF_WEIGHTS="$weights" Rscript "$R/ref_lme4.R" "$D/$data.csv" "$formula" "$family" "$nagq" "$D/$name.json" "$reml" \
    || echo "$name: lme4 FAILED"
  t1=$(date +%s.%N)
  msg="$name: lme4 $(printf '%.1f' "$(echo "$t1 - $t0" | bc)")s wall"
  if [[ "$nagq" -le 1 ]]; then
    REF_WEIGHTS="$weights" Rscript "$R/ref_glmmtmb.R" "$D/$data.csv" "$formula" "$family" "$D/$name.tmb.json" "$reml" \
      || echo "$name: glmmTMB FAILED"
    msg="$msg, glmmTMB $(printf '%.1f' "$(echo "$(date +%s.%N) - $t1" | bc)")s wall"
  fi
  echo "$msg"
done
