# Reference for tests/test_gamma_domain.py: a Gamma GLMM with the inverse link (glmer's default) on
# tests/data/gamma_inverse_domain.csv, whose one-step start leaves the link's domain (η ≤ 0 at some rows).
# glmmTMB's own start is not finite there either ("negative log-likelihood is NaN at starting parameter
# values"), so it starts from glmer's estimates; glmer's logLik is printed too (its Gamma logLik does not
# use the maximum-likelihood shape, so it is not comparable).
# usage: Rscript benchmarks/r/gamma_domain.R tests/data/gamma_inverse_domain.csv
suppressPackageStartupMessages({library(lme4); library(glmmTMB); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); d$g <- factor(d$g)
m <- glmer(y ~ x + z + (1 | g), data = d, family = Gamma)
t <- glmmTMB(y ~ x + z + (1 | g), data = d, family = Gamma(link = "inverse"),
             start = list(beta = unname(fixef(m)), theta = log(sqrt(VarCorr(m)$g[1]))))
out <- list(glmmTMB = list(fixef = as.list(fixef(t)$cond), se = as.list(sqrt(diag(vcov(t)$cond))),
                           sd = sqrt(VarCorr(t)$cond$g[1]), shape = 1 / sigma(t)^2, logLik = as.numeric(logLik(t))),
            glmer = list(fixef = as.list(fixef(m)), sd = sqrt(VarCorr(m)$g[1]), logLik = as.numeric(logLik(m))))
cat(toJSON(out, digits = 12, auto_unbox = TRUE, pretty = TRUE), "\n")
