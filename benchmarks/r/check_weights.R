#!/usr/bin/env Rscript
# What do prior weights mean in lme4 and in glmmTMB? Poisson: Check on sim_pois_w with integer
# weights (w rounded up to whole numbers): a fit with weights w against the fit on the data with each row
# repeated w times (same group), which is "each row's log-likelihood multiplied by w".
# usage (from the repo root): Rscript benchmarks/r/check_weights.R
suppressPackageStartupMessages({library(lme4); library(glmmTMB)})
d <- read.csv("tests/data/heldout/families/sim_pois_w.csv")
d$wi <- ceiling(d$w)
e <- d[rep(seq_len(nrow(d)), d$wi), ]
f <- y ~ x + (1 | g)
ctl <- glmerControl(optimizer = "bobyqa")
m_w <- glmer(f, data = d, family = poisson, weights = wi, control = ctl)
m_e <- glmer(f, data = e, family = poisson, control = ctl)
t_w <- glmmTMB(f, data = d, family = poisson, weights = wi)
t_e <- glmmTMB(f, data = e, family = poisson)
row <- function(lab, m, fe, s) cat(sprintf("%-26s logLik %.6f  fixef %s  sd %.6f\n", lab, as.numeric(logLik(m)),
                                        paste(sprintf("%.6f", fe), collapse = " "), s))
row("lme4 weights=ceiling(w)", m_w, fixef(m_w), attr(VarCorr(m_w)$g, "stddev"))
row("lme4 rows repeated", m_e, fixef(m_e), attr(VarCorr(m_e)$g, "stddev"))
row("glmmTMB weights=ceiling(w)", t_w, fixef(t_w)$cond, attr(VarCorr(t_w)$cond$g, "stddev"))
row("glmmTMB rows repeated", t_e, fixef(t_e)$cond, attr(VarCorr(t_e)$cond$g, "stddev"))
# non-integer weights: lme4 and glmmTMB on the file's own w (the held-out case sim_pois_w)
m_f <- glmer(f, data = d, family = poisson, weights = w, control = ctl)
t_f <- glmmTMB(f, data = d, family = poisson, weights = w)
row("lme4 weights=w", m_f, fixef(m_f), attr(VarCorr(m_f)$g, "stddev"))
row("glmmTMB weights=w", t_f, fixef(t_f)$cond, attr(VarCorr(t_f)$cond$g, "stddev"))
# the log-likelihood each reports at its optimum, as a weighted sum: lme4's conditional part
mu <- fitted(m_f)
cat(sprintf("lme4 sum(w * dpois(y, mu, log)) at its fit: %.6f\n", sum(d$w * dpois(d$y, mu, log = TRUE))))

# Gaussian: lme4's lmer weights are precision weights (residual variance sigma^2 / k); glmmTMB 1.1.5's weights
# multiply each row's log-likelihood, a different model. glmmTMB fits the precision-weight model with a
# dispersion offset instead: dispformula = ~ offset(-log(k)) gives sigma_i^2 = sigma^2 / k.
g <- read.csv("tests/data/heldout/families/sim_gauss_wmean.csv")
fg <- ybar ~ x + (1 | g)
for (reml in c(FALSE, TRUE)) {
  l <- lmer(fg, data = g, weights = k, REML = reml)
  tw <- glmmTMB(fg, data = g, weights = k, REML = reml)
  td <- glmmTMB(fg, data = g, dispformula = ~ offset(-log(k)), REML = reml)
  cat(sprintf("gaussian REML=%d: lmer weights=k logLik %.6f sigma %.6f sd_g %.6f | glmmTMB weights=k logLik %.6f sigma %.6f | glmmTMB dispformula offset(-log(k)) logLik %.6f sigma %.6f sd_g %.6f fixef %s vs lmer %s\n",
    reml, as.numeric(logLik(l)), sigma(l), attr(VarCorr(l)$g, "stddev"), as.numeric(logLik(tw)), sigma(tw),
    as.numeric(logLik(td)), sigma(td), attr(VarCorr(td)$cond$g, "stddev"),
    paste(sprintf("%.6f", fixef(td)$cond), collapse = " "), paste(sprintf("%.6f", fixef(l)), collapse = " ")))
}
