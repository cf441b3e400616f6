# Reference for tests/test_gamma_domain.py: a Gamma GLMM with the inverse link (glmer's default) and a
# random slope, on tests/data/gamma_inverse_slope.csv (log-link data: 12 groups of 50 rows, SDs 1.5 and 0.4),
# where groups' modes start outside the link's domain (η ≤ 0 at some rows).  glmmTMB from its own start,
# from glmer's estimates where glmer fits (glmer's logLik is not comparable: its Gamma logLik does not use the
# maximum-likelihood shape), and from the intercept-only mean with small SDs.
# usage: Rscript benchmarks/r/gamma_inverse_slope.R tests/data/gamma_inverse_slope.csv
suppressPackageStartupMessages({library(lme4); library(glmmTMB); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); d$g <- factor(d$g)
f <- y ~ x + z + (1 + x | g)
summ <- function(t) list(fixef = as.list(fixef(t)$cond), se = as.list(sqrt(diag(vcov(t)$cond))),
                         sd = as.list(attr(VarCorr(t)$cond$g, "stddev")),
                         corr = attr(VarCorr(t)$cond$g, "correlation")[1, 2],
                         shape = 1 / sigma(t)^2, logLik = as.numeric(logLik(t)))
out <- list()
t0 <- tryCatch(glmmTMB(f, data = d, family = Gamma(link = "inverse")), error = function(e) conditionMessage(e))
out$glmmTMB_own_start <- if (is.character(t0)) t0 else summ(t0)
m <- tryCatch(glmer(f, data = d, family = Gamma), error = function(e) conditionMessage(e))
if (!is.character(m)) {
  vc <- VarCorr(m)$g
  sds <- attr(vc, "stddev"); cr <- attr(vc, "correlation")[1, 2]
  t1 <- glmmTMB(f, data = d, family = Gamma(link = "inverse"),
                start = list(beta = unname(fixef(m)), theta = c(log(sds), cr / sqrt(1 - cr^2))))
  out$glmmTMB_from_glmer <- summ(t1)
  out$glmer <- list(fixef = as.list(fixef(m)), sd = as.list(sds), corr = cr, logLik = as.numeric(logLik(m)))
} else out$glmer <- m
# neither starts here: glmmTMB from the intercept-only mean (inside the domain at every row) with small SDs,
# and with larger ones
for (s in list(c(log(0.01), log(0.01)), c(log(0.1), log(0.05)))) {
  t2 <- tryCatch(glmmTMB(f, data = d, family = Gamma(link = "inverse"),
                         start = list(beta = c(1 / mean(d$y), 0, 0), theta = c(s, 0))),
                 error = function(e) conditionMessage(e))
  out[[paste0("glmmTMB_from_mean_sd", round(exp(s[1]), 2))]] <- if (is.character(t2)) t2 else summ(t2)
}
cat(toJSON(out, digits = 12, auto_unbox = TRUE, pretty = TRUE), "\n")
