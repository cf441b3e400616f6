#!/usr/bin/env Rscript
# lme4's nAGQ > 1 objective evaluated at lme4's own estimates with a tight PIRLS tolerance.
# usage: Rscript benchmarks/r/aghq_at_lme4.R tests/data/heldout/rounds > tests/data/heldout/rounds/aghq_at_lme4.tsv
#
# glmer(nAGQ > 1) reports the deviance of its last evaluation, whose conditional modes PIRLS found to
# tolPwrss = 1e-7 (glmerControl's default).  With K nodes over a wide random-effect distribution that
# evaluation error reaches 1e-4 in the logLik (toenail, nAGQ 20: -625.375078 reported, -625.375271 with the
# modes converged).  This script refits each `_gh` case of the folder's cases.tsv, then evaluates the same
# deviance function (devFunOnly, tolPwrss = 1e-10 and 1e-13) at the estimates glmer returned; the logLik
# columns are lme4's convention (for poisson, without the saturated term; see the folder's README).
suppressPackageStartupMessages({library(lme4)})
dir <- commandArgs(trailingOnly = TRUE)[1]
cases <- read.delim(file.path(dir, "cases.tsv"), comment.char = "", check.names = FALSE, colClasses = "character")
names(cases)[1] <- sub("^# *", "", names(cases)[1])
cat("name\tlogLik_reported\tlogLik_tol1e-10\tlogLik_tol1e-13\n")
for (i in seq_len(nrow(cases))) {
  cs <- cases[i, ]
  nagq <- as.integer(cs$nagq)
  if (nagq <= 1) next
  d <- read.csv(file.path(dir, paste0(cs$data, ".csv")))
  for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
  f <- as.formula(cs$formula)
  fam <- strsplit(cs$family, "/", fixed = TRUE)[[1]]
  famobj <- do.call(fam[1], if (length(fam) > 1) list(link = fam[2]) else list())
  m <- glmer(f, data = d, family = famobj, nAGQ = nagq,
             control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))
  pars <- c(getME(m, "theta"), fixef(m))
  tight <- sapply(c(1e-10, 1e-13), function(tol) {
    dev <- glmer(f, data = d, family = famobj, nAGQ = nagq, devFunOnly = TRUE,
                 control = glmerControl(tolPwrss = tol))
    -dev(pars) / 2
  })
  cat(sprintf("%s\t%.10f\t%.10f\t%.10f\n", cs$name, as.numeric(logLik(m)), tight[1], tight[2]))
}
