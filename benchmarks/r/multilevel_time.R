#!/usr/bin/env Rscript
# Time lme4's glmer(nAGQ = 1) and glmmTMB on one CSV and one formula (binomial, logit); print one JSON line
#   {"glmer": {"seconds", "cpu_seconds", "logLik", "max_mem_mb", "fixef"}, "glmmTMB": {...}}
# seconds: R's own fit time (excluding start-up and reading), cpu_seconds: the CPU time it used (user +
# system, this process and its threads; on a busy machine the fair measure); max_mem_mb: gc()'s "max used" (Mb) during the
# fit (R's heap, vectors and cons cells; memory allocated by C++ outside R's heap, as TMB's, is not counted).
# usage: multilevel_time.R data.csv "formula" [glmer|glmmTMB|both]
suppressPackageStartupMessages({library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1]); for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
f <- as.formula(a[2]); which <- if (length(a) >= 3) a[3] else "both"
timed <- function(expr) {
  invisible(gc(reset = TRUE)); t0 <- proc.time()
  m <- suppressWarnings(expr); el <- proc.time() - t0
  g <- gc(); list(model = m, seconds = el[["elapsed"]], cpu = el[["user.self"]] + el[["sys.self"]],
                  max_mem_mb = sum(g[, ncol(g)]))
}
out <- list()
if (which %in% c("glmer", "both")) {
  suppressPackageStartupMessages(library(lme4))
  r <- timed(glmer(f, data = d, family = binomial, nAGQ = 1,
                   control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))))
  out$glmer <- list(seconds = r$seconds, cpu_seconds = r$cpu, logLik = as.numeric(logLik(r$model)), max_mem_mb = r$max_mem_mb,
                    fixef = as.list(fixef(r$model)))
}
if (which %in% c("glmmTMB", "both")) {
  suppressPackageStartupMessages(library(glmmTMB))
  r <- timed(glmmTMB(f, data = d, family = binomial))
  out$glmmTMB <- list(seconds = r$seconds, cpu_seconds = r$cpu, logLik = as.numeric(logLik(r$model)), max_mem_mb = r$max_mem_mb,
                      fixef = as.list(fixef(r$model)$cond))
}
cat(toJSON(out, auto_unbox = TRUE, digits = NA), "\n")
