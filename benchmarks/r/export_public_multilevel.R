#!/usr/bin/env Rscript
# Export the public data sets of the held-out multi-level reference cases as CSV.
# usage (from the repo root): Rscript benchmarks/r/export_public_multilevel.R [outdir]
#   outdir defaults to tests/data/heldout/multilevel
# Sources (all GPL-licensed R packages; see tests/data/SOURCES.md):
#   lme4: Pastes, VerbAgg, InstEval, Arabidopsis, cake   mlmRev: guImmun, Mmmec, egsingle, Chem97, ScotsSec
#   MASS: oats, epil                                     HSAUR3: respiratory
# Values are written unchanged; the only changes are listed per file below (binary factors -> 0/1 responses,
# an added observation index or site column, dropped redundant columns, one subsample of InstEval).
# Numeric-looking factor labels that are only used as grouping factors (region, school, ...) stay numeric
# in the CSV: lme4 and pandas turn a grouping column into a factor whatever its type.
suppressPackageStartupMessages({library(lme4); library(mlmRev); library(MASS); library(HSAUR3)})
a <- commandArgs(trailingOnly = TRUE)
out <- if (length(a)) a[1] else "tests/data/heldout/multilevel"
dir.create(out, showWarnings = FALSE, recursive = TRUE)
save <- function(d, name) {
  for (nm in names(d)) if (is.factor(d[[nm]])) d[[nm]] <- as.character(d[[nm]])
  rownames(d) <- NULL
  p <- file.path(out, paste0(name, ".csv"))
  write.csv(d, p, row.names = FALSE)
  cat(sprintf("%-28s %6d rows %8d bytes\n", p, nrow(d), file.size(p)))
}
yes <- function(f, level) as.integer(f == level)

# lme4 Pastes: paste strength, 10 batches x 3 casks x 2 assays; cask labels a-c repeat in every batch,
# `sample` (= batch:cask) is the unique cask label.
save(Pastes, "pastes")

# mlmRev guImmun: complete immunization (immun Y/N -> 1/0) of 2159 children of 1595 mothers in 161
# Guatemalan communities. `ord` keeps its labels (01, 23, 46, 7p).
d <- guImmun; d$immun <- yes(d$immun, "Y"); save(d, "guimmun")

# mlmRev Mmmec: melanoma deaths by county (354) in regions (78) in nations (9).
save(Mmmec, "mmmec")

# mlmRev egsingle: maths scores of 1721 children in 60 Chicago schools over grades 1-5 (7230 rows).
save(egsingle, "egsingle")

# mlmRev Chem97: A-level chemistry of 31022 students in 2410 schools in 131 LEAs. `student` (the row
# index) and `gcsescore` (= gcsecnt + its mean) are left out to keep the file small.
d <- Chem97; d$student <- NULL; d$gcsescore <- NULL; save(d, "chem97")

# mlmRev ScotsSec: attainment of 3435 pupils; 148 primary schools crossed with 19 secondary schools.
save(ScotsSec, "scotssec")

# lme4 InstEval: lecture ratings. Subsample: 1000 of the 2972 students drawn with set.seed(20240711),
# all their ratings kept. studage (2,4,6,8) and lectage (1..6) are ordered factors in lme4; they are
# written as their numeric labels and used as numeric covariates here.
d <- InstEval
set.seed(20240711)
keep <- sample(levels(d$s), 1000)
d <- d[d$s %in% keep, ]
d$studage <- as.integer(as.character(d$studage)); d$lectage <- as.integer(as.character(d$lectage))
d$service <- as.integer(as.character(d$service))
save(d, "insteval_sub")

# lme4 Arabidopsis: fruit counts of 625 plants, genotypes (24) nested in populations (9) in regions (3);
# obs = row number (observation-level random effect). `total.fruits` is renamed `total_fruits` (a dotted
# name is attribute access in pandas' eval and not a plain name in Python formulas).
d <- Arabidopsis; names(d)[names(d) == "total.fruits"] <- "total_fruits"; d$obs <- seq_len(nrow(d))
save(d, "arabidopsis")

# lme4 cake: breaking angle of chocolate cakes, 3 recipes x 15 replicates x 6 temperatures; `temperature`
# (ordered factor, the same values as `temp`) is left out.
d <- cake; d$temperature <- NULL; save(d, "cake")

# lme4 VerbAgg: verbal aggression, 316 respondents x 24 items; r2 (Y/N -> 1/0).
# site = s1..s4 by respondent: site = 1 + (id - 1) mod 4, so every item occurs at every site.
d <- VerbAgg; d$r2 <- yes(d$r2, "Y")
d$site <- paste0("s", 1 + (as.integer(as.character(d$id)) - 1) %% 4)
save(d, "verbagg")

# MASS oats: split-plot yields, 6 blocks (B), varieties (V) on whole plots, nitrogen (N) on sub-plots.
save(oats, "oats")

# MASS epil: seizure counts of 59 epileptics over 4 periods; obs = row number.
d <- epil; d$obs <- seq_len(nrow(d)); save(d, "epil")

# HSAUR3 respiratory: 111 patients at 2 centres, respiratory status at months 0..4. Months 1..4 kept
# (444 rows) with the month-0 status as `baseline` (1 = good), status good -> 1, month numeric, centre
# written as c1 / c2.
d <- respiratory
base <- d[d$month == "0", c("subject", "status")]
d <- d[d$month != "0", ]
d$baseline <- yes(base$status, "good")[match(d$subject, base$subject)]
d$status <- yes(d$status, "good"); d$month <- as.integer(as.character(d$month))
d$centre <- paste0("c", d$centre)
d <- d[order(as.integer(as.character(d$subject)), d$month), ]
save(d, "respiratory")
