#!/usr/bin/env Rscript
# Second reference with glmmTMB (Laplace; full log-likelihood with constants) on a CSV.
# JSON: engine, seconds, fixef, se, logLik, AIC, BIC, sd (per grouping term: standard deviations),
# plus family, link, formula, formula_r, reml, n, sigma (gaussian residual sd), corr, convergence, warnings.
#
# usage: ref_tmb.R data.csv "formula" family [out.json|-] [reml 0|1] [link]
#   formula in the project's syntax (`**` -> `^`); glmmTMB 1.1.5 expands (x || g) itself (diagonal).
suppressPackageStartupMessages({library(glmmTMB); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
if (length(a) < 3) stop("usage: ref_tmb.R data.csv formula family [out.json|-] [reml 0|1] [link]")
arg <- function(i, default) if (length(a) >= i && nzchar(a[i])) a[i] else default
d <- read.csv(a[1]); for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
f_in <- a[2]; f_r <- gsub("**", "^", f_in, fixed = TRUE)
out_path <- arg(4, "-"); reml <- arg(5, "0") == "1"; link <- arg(6, "")
fam <- if (grepl("(", a[3], fixed = TRUE)) eval(parse(text = a[3])) else {
  ff <- get(a[3], mode = "function"); if (nzchar(link)) ff(link = link) else ff()
}
warns <- character()
t0 <- proc.time()[["elapsed"]]
m <- withCallingHandlers(glmmTMB(as.formula(f_r), data = d, family = fam, REML = reml),
  warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") })
el <- proc.time()[["elapsed"]] - t0
s <- summary(m)$coefficients$cond
vc <- VarCorr(m)$cond
out <- list(engine = paste("glmmTMB", packageVersion("glmmTMB")), seconds = el,
  family = fam$family, link = fam$link, formula = f_in, formula_r = f_r, reml = reml, n = nobs(m),
  fixef = as.list(fixef(m)$cond), se = as.list(setNames(s[, 2], rownames(s))),
  logLik = as.numeric(logLik(m)), AIC = AIC(m), BIC = BIC(m),
  sd = if (length(vc)) lapply(vc, function(v) attr(v, "stddev")) else setNames(list(), character(0)),
  corr = if (length(vc)) lapply(vc, function(v) { r <- attr(v, "correlation"); r[upper.tri(r)] }) else setNames(list(), character(0)),
  sigma = if (fam$family == "gaussian") sigma(m) else NULL,
  convergence = m$fit$convergence, pdHess = m$sdr$pdHess, warnings = warns)
out <- out[!vapply(out, is.null, logical(1))]
js <- toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
if (out_path != "-") writeLines(js, out_path) else cat(js, "\n")
