#!/usr/bin/env Rscript
# The exact Laplace log-likelihood (glmmTMB's objective) at lme4's estimates, for every non-gaussian case of
# tests/data/heldout/multilevel/cases.tsv: tells whether an lme4-vs-glmmTMB logLik gap is lme4's optimum or
# lme4's evaluation of the likelihood.
# usage (from the repo root): Rscript benchmarks/r/laplace_at_lme4.R [out.tsv]
#   out.tsv defaults to tests/data/heldout/multilevel/laplace_at_lme4.tsv
# Columns: lme4 (lme4's logLik), laplace_at_lme4 (glmmTMB's Laplace value at lme4's fixef, SDs,
# correlations and NB theta, read from NAME.json), tmb (glmmTMB's maximum, NAME.tmb.json), selfcheck (the
# same mapping applied to glmmTMB's own estimates from NAME.tmb.json minus its logLik: ~0 when the mapping
# of parameters is right). Covariance terms: scalar, 2x2 unstructured (glmmTMB: log SDs and
# rho / sqrt(1 - rho^2)) or diagonal (`||`).
suppressPackageStartupMessages({library(glmmTMB); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
D <- "tests/data/heldout/multilevel"
out <- if (length(a)) a[1] else file.path(D, "laplace_at_lme4.tsv")
cs <- read.delim(file.path(D, "cases.tsv"), quote = "", colClasses = "character", na.strings = character(0))
names(cs) <- c("name", "data", "formula", "family", "nagq", "reml", "weights", "split")
theta_of <- function(vc, t) {  # glmmTMB's theta vector from a varcorr table in lme4's layout
  if (is.null(vc$var2)) vc$var2 <- NA_character_  # no correlation row: jsonlite leaves the column out
  unlist(lapply(seq_along(t$modelInfo$reTrms$cond$flist), function(k) {
    g <- names(t$modelInfo$reTrms$cond$flist)[k]
    cn <- t$modelInfo$reTrms$cond$cnms[[k]]
    rows <- vc[vc$grp == g | grepl(paste0("^", gsub("([.:])", "\\\\\\1", g), "\\.[0-9]+$"), vc$grp), ]
    sds <- sapply(cn, function(v) rows$sdcor[rows$var1 == v & is.na(rows$var2)][1])
    struct <- names(glmmTMB:::.valid_covstruct)[match(t$modelInfo$reStruc$condReStruc[[k]]$blockCode,
                                                      glmmTMB:::.valid_covstruct)]
    th <- log(sds)
    if (length(cn) == 2 && struct == "us") {
      rho <- rows$sdcor[!is.na(rows$var2)][1]
      th <- c(th, rho / sqrt(1 - rho^2))
    } else if (length(cn) > 2 && struct == "us") stop("only 2x2 unstructured terms are mapped")
    th
  }))
}
res <- list()
for (i in seq_len(nrow(cs))) {
  r <- cs[i, ]
  if (r$family == "gaussian") next
  d <- read.csv(file.path(D, paste0(r$data, ".csv")))
  for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
  fam <- if (r$family == "negative_binomial") nbinom2() else r$family
  w <- if (nzchar(r$weights)) d[[r$weights]] else NULL
  t <- glmmTMB(as.formula(r$formula), data = d, family = fam, weights = w)
  at <- function(js) {
    p <- t$fit$par
    p[names(p) == "beta"] <- unlist(js$fixef)[names(fixef(t)$cond)]
    p[names(p) == "theta"] <- theta_of(js$varcorr, t)
    if (r$family == "negative_binomial") p[names(p) == "betad"] <- log(js$nb_theta)
    -t$obj$fn(p)
  }
  l4 <- fromJSON(file.path(D, paste0(r$name, ".json")))
  tb <- fromJSON(file.path(D, paste0(r$name, ".tmb.json")))
  res[[r$name]] <- data.frame(name = r$name, lme4 = l4$logLik, laplace_at_lme4 = at(l4), tmb = tb$logLik,
                              selfcheck = at(tb) - tb$logLik)
  cat(sprintf("%-22s lme4 %.4f  Laplace at lme4's estimates %.4f  glmmTMB %.4f  (selfcheck %.1e)\n",
              r$name, l4$logLik, res[[r$name]]$laplace_at_lme4, tb$logLik, res[[r$name]]$selfcheck))
}
tab <- do.call(rbind, res)
tab$lme4_eval_gap <- tab$laplace_at_lme4 - tab$lme4
tab$lme4_opt_gap <- tab$tmb - tab$laplace_at_lme4
write.table(format(tab, digits = 10), out, sep = "\t", quote = FALSE, row.names = FALSE)
