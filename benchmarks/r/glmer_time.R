#!/usr/bin/env Rscript
# Time one lme4 fit (glmer; lmer for gaussian; glm without random effects) on a CSV; print one JSON line
#   {"seconds": fit time in seconds (excluding R start-up and reading), "logLik": lme4's logLik,
#    "logLik_full": logLik plus the saturated term lme4 omits for nAGQ > 1}
# usage: glmer_time.R data.csv "formula" family [nAGQ=1] [reml 0|1] [link]
#   formula in the project's syntax (`**` -> `^`); character columns become factors.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
if (length(a) < 3) stop("usage: glmer_time.R data.csv formula family [nAGQ] [reml 0|1] [link]")
arg <- function(i, default) if (length(a) >= i && nzchar(a[i])) a[i] else default
d <- read.csv(a[1]); for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
f <- as.formula(gsub("**", "^", a[2], fixed = TRUE))
nagq <- as.integer(arg(4, "1")); reml <- arg(5, "0") == "1"; link <- arg(6, "")
fam <- if (grepl("(", a[3], fixed = TRUE)) eval(parse(text = a[3])) else {
  ff <- get(a[3], mode = "function"); if (nzchar(link)) ff(link = link) else ff()
}
has_re <- !is.null(findbars(f)); is_lmm <- fam$family == "gaussian" && fam$link == "identity"
ctrl_g <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
t0 <- proc.time()[["elapsed"]]
m <- suppressWarnings(
  if (!has_re) glm(f, data = d, family = fam)
  else if (is_lmm) lmer(f, data = d, REML = reml)
  else glmer(f, data = d, family = fam, nAGQ = nagq, control = ctrl_g))
el <- proc.time()[["elapsed"]] - t0
ll <- as.numeric(logLik(m)); ll_full <- ll
if (has_re && !is_lmm && nagq > 1)
  ll_full <- ll - m@resp$family$aic(m@resp$y, m@resp$n, m@resp$y, m@resp$weights, 0) / 2
cat(toJSON(list(seconds = el, logLik = ll, logLik_full = ll_full), auto_unbox = TRUE, digits = NA), "\n")
