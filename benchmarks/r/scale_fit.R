#!/usr/bin/env Rscript
# One fit of benchmarks/bench_scale.py's model on its pooled CSV by glmmTMB or lme4::glmer (Laplace);
# prints one JSON line {"seconds": fit time (no R start-up, no reading), "logLik": the fit's logLik}.
# usage: scale_fit.R data.csv glmmTMB|glmer
suppressPackageStartupMessages(library(jsonlite))
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1])
d$g <- factor(d$g)
f <- y ~ x1 + x2 + x3 + x4 + x5 + (1 + x1 | g)
t0 <- proc.time()[["elapsed"]]
if (a[2] == "glmmTMB") {
  suppressPackageStartupMessages(library(glmmTMB))
  m <- glmmTMB(f, data = d, family = binomial)
} else {
  suppressPackageStartupMessages(library(lme4))
  m <- glmer(f, data = d, family = binomial, nAGQ = 1)
}
el <- proc.time()[["elapsed"]] - t0
cat(toJSON(list(seconds = el, logLik = as.numeric(logLik(m))), auto_unbox = TRUE, digits = NA), "\n")
