#!/usr/bin/env Rscript
# Reference fit with lme4 (glmer / lmer; glm when the formula has no random-effect term) on a CSV.
# Writes the same JSON shape as shared/reference/ref_lme4.R plus: link, logLik_full, formula_r, reml, warnings.
#
# usage: ref_fit.R data.csv "formula" family nAGQ [out.json|-] [reml 0|1] [link]
#   formula: the project's syntax; `**` (Python power inside I()) is translated to R's `^`.
#   family:  gaussian | binomial | poisson, or an R call such as 'binomial(link="probit")'.
#   link:    optional link name (overrides the family's default), e.g. probit, cloglog.
#   gaussian (identity link) uses lmer with REML = reml; nAGQ is ignored there (recorded as given).
#
# logLik is lme4's own number. For nAGQ > 1 lme4 leaves out the saturated log-likelihood
# sum log f(y | mu = y) (lme4 issue 161); logLik_full adds it back. For nAGQ <= 1, gaussian and glm,
# logLik_full == logLik.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
if (length(a) < 3) stop("usage: ref_fit.R data.csv formula family [nAGQ] [out.json|-] [reml 0|1] [link]")
arg <- function(i, default) if (length(a) >= i && nzchar(a[i])) a[i] else default

d <- read.csv(a[1])
for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
f_in <- a[2]
f_r <- gsub("**", "^", f_in, fixed = TRUE)
f <- as.formula(f_r)
nagq <- as.integer(arg(4, "1"))
out_path <- arg(5, "-")
reml <- arg(6, "0") == "1"
link <- arg(7, "")

fam <- if (grepl("(", a[3], fixed = TRUE)) eval(parse(text = a[3])) else {
  ff <- get(a[3], mode = "function")
  if (nzchar(link)) ff(link = link) else ff()
}
if (is.function(fam)) fam <- fam()
if (nzchar(link) && fam$link != link) stop("link argument '", link, "' conflicts with family ", a[3])

has_re <- !is.null(findbars(f))
is_lmm <- fam$family == "gaussian" && fam$link == "identity"

warns <- character()
catch <- function(expr) withCallingHandlers(expr, warning = function(w) {
  warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning")
})

ctrl_g <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
t0 <- proc.time()[["elapsed"]]
m <- catch(
  if (!has_re) glm(f, data = d, family = fam)
  else if (is_lmm) lmer(f, data = d, REML = reml)
  else glmer(f, data = d, family = fam, nAGQ = nagq, control = ctrl_g))
el <- proc.time()[["elapsed"]] - t0

s <- summary(m)$coefficients
ll <- as.numeric(logLik(m))
ll_full <- ll
if (has_re && !is_lmm && nagq > 1) {
  # saturated log-likelihood, sum log f(y | mu = y), from the family's own aic()
  ll_full <- ll - m@resp$family$aic(m@resp$y, m@resp$n, m@resp$y, m@resp$weights, 0) / 2
}
empty_obj <- setNames(list(), character(0))

out <- list(
  engine = if (has_re) paste("lme4", packageVersion("lme4")) else paste("stats::glm", getRversion()),
  family = fam$family, link = fam$link, nAGQ = nagq,
  formula = f_in, formula_r = f_r, reml = is_lmm && has_re && reml,
  n = nobs(m), seconds = el,
  fixef = as.list(if (has_re) fixef(m) else coef(m)),
  se = as.list(setNames(s[, 2], rownames(s))),
  varcorr = if (has_re) as.data.frame(VarCorr(m)) else list(),
  logLik = ll, logLik_full = ll_full, AIC = AIC(m), BIC = BIC(m),
  singular = if (has_re) isSingular(m) else FALSE,
  messages = if (has_re) m@optinfo$conv$lme4$messages else if (!m$converged) "glm: algorithm did not converge" else NULL,
  warnings = warns,
  ranef = if (has_re) lapply(ranef(m), function(r) { r$level <- rownames(r); r }) else empty_obj)
js <- toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "list")
if (out_path != "-") writeLines(js, out_path) else cat(js, "\n")
