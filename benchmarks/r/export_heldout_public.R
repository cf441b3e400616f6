#!/usr/bin/env Rscript
# Export the public data sets used by the held-out reference cases (tests/data/heldout/*/) to CSV.
# usage (from the repo root): Rscript benchmarks/r/export_heldout_public.R [outdir=tests/data/heldout]
# Needs: r-cran-mass (epil), r-cran-glmmtmb (Salamanders, Owls), r-cran-hsaur3 (toenail),
#        r-cran-mlmrev (guImmun, Contraception), r-cran-lme4 (sleepstudy, grouseticks).
# Conventions (see tests/data/SOURCES.md): factors are written as strings; factor labels that look like
# numbers and would be read back as numbers (by R's read.csv and by pandas) get a letter prefix;
# binary outcomes are written as 0/1. Factor levels are read back in alphabetical order, so reference
# levels can differ from the R package's level order.
suppressPackageStartupMessages({library(MASS); library(glmmTMB); library(HSAUR3); library(mlmRev); library(lme4)})
a <- commandArgs(trailingOnly = TRUE)
out <- if (length(a)) a[1] else "tests/data/heldout"
w <- function(d, group, name) {
  for (nm in names(d)) if (is.factor(d[[nm]])) d[[nm]] <- as.character(d[[nm]])
  p <- file.path(out, group, paste0(name, ".csv"))
  write.csv(d, p, row.names = FALSE)
  cat(p, nrow(d), "rows\n")
}

# MASS::epil: 59 subjects x 4 periods. lbase and lage are MASS's own columns; checked here to be
# log(base/4) and log(age) centred at their means over the 236 rows (= over the 59 subjects).
ep <- MASS::epil
lb <- log(ep$base / 4); la <- log(ep$age)
stopifnot(max(abs(ep$lbase - (lb - mean(lb)))) < 1e-12, max(abs(ep$lage - (la - mean(la)))) < 1e-12)
ep$subject <- sprintf("s%02d", ep$subject)
ep <- ep[, c("subject", "period", "y", "trt", "base", "age", "V4", "lbase", "lage")]
w(ep, "families", "epil"); w(ep, "rounds", "epil")

# glmmTMB::Salamanders: 644 rows, 23 sites (mined is a site-level factor), 7 species.
sal <- glmmTMB::Salamanders
sal <- sal[, c("site", "mined", "spp", "count", "cover", "sample", "DOP", "Wtemp", "DOY")]
w(sal, "families", "salamanders"); w(sal, "rounds", "salamanders")

# glmmTMB::Owls: 599 rows, 27 nests.
ow <- glmmTMB::Owls
w(ow, "families", "owls")

# HSAUR3::toenail: 1908 rows, 294 patients, up to 7 visits; outcome 1 = "moderate or severe".
te <- HSAUR3::toenail
te <- data.frame(patientID = sprintf("p%03d", as.integer(as.character(te$patientID))),
                 outcome = as.integer(te$outcome == "moderate or severe"),
                 treatment = te$treatment, time = te$time, visit = te$visit)
w(te, "rounds", "toenail")

# mlmRev::guImmun: 2159 children in 161 communities; immun 1 = "Y". ord's labels "01","23","46","7p"
# get the prefix "o" (o01, o23, o46, o7p); kid, mom, comm are identifiers.
gu <- mlmRev::guImmun
gu$immun <- as.integer(gu$immun == "Y")
gu$ord <- paste0("o", as.character(gu$ord))
gu$kid <- paste0("k", as.character(gu$kid)); gu$mom <- paste0("m", as.character(gu$mom))
gu$comm <- paste0("c", as.character(gu$comm))
w(gu, "rounds", "guimmun")

# mlmRev::Contraception: 1934 women, 60 districts (district 54 absent, so 60 levels in use);
# use 1 = "Y"; age is centred at the sample mean as in mlmRev; livch keeps its labels 0, 1, 2, 3+ (the column reads back as text because of "3+").
co <- mlmRev::Contraception
co <- data.frame(woman = paste0("w", as.character(co$woman)), district = paste0("d", as.character(co$district)),
                 use = as.integer(co$use == "Y"), livch = as.character(co$livch),
                 age = co$age, urban = co$urban)
w(co, "data", "contraception")

# lme4::sleepstudy (180 rows, 18 subjects) and lme4::grouseticks (403 rows, 63 locations).
ss <- lme4::sleepstudy; ss$Subject <- paste0("S", as.character(ss$Subject))
w(ss, "data", "sleepstudy")
gt <- lme4::grouseticks
gt$INDEX <- paste0("i", as.character(gt$INDEX)); gt$BROOD <- paste0("b", as.character(gt$BROOD))
gt$LOCATION <- paste0("L", as.character(gt$LOCATION)); gt$YEAR <- paste0("y", as.character(gt$YEAR))
w(gt, "data", "grouseticks")
