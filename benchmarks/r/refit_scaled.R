#!/usr/bin/env Rscript
# A second lme4 reference for a badly scaled model: glmer on centred and scaled numeric covariates, with the
# fixed effects and their covariance mapped back to the original columns (beta = A gamma, V = A W A').
# usage: refit_scaled.R data.csv "formula" family nAGQ out.json
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1]); for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
f <- as.formula(gsub("**", "^", a[2], fixed = TRUE)); nagq <- as.integer(a[4])
X <- model.matrix(lme4::nobars(f), d)
num <- setdiff(colnames(X), "(Intercept)")
ctr <- colMeans(X[, num, drop = FALSE]); scl <- apply(X[, num, drop = FALSE], 2, sd)
Xs <- X; Xs[, num] <- sweep(sweep(X[, num, drop = FALSE], 2, ctr), 2, scl, "/")
ds <- d; ds$.Xs <- Xs[, -1, drop = FALSE]
rhs <- paste(deparse(lme4::findbars(f)[[1]]), collapse = "")
fs <- as.formula(paste(deparse(f[[2]]), "~ .Xs + (", rhs, ")"))
m <- glmer(fs, data = ds, family = a[3], nAGQ = nagq,
           control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))
A <- diag(ncol(X)); A[1, -1] <- -ctr / scl; A[-1, -1] <- diag(1 / scl, length(scl))
beta <- drop(A %*% fixef(m)); V <- A %*% as.matrix(vcov(m)) %*% t(A)
names(beta) <- colnames(X)
sat <- if (a[3] == "poisson") sum(dpois(model.response(model.frame(m)), model.response(model.frame(m)), log = TRUE)) else 0
out <- list(engine = paste("lme4", packageVersion("lme4"), "(scaled refit)"), nAGQ = nagq, formula = a[2],
  fixef = as.list(beta), se = as.list(setNames(sqrt(diag(V)), colnames(X))),
  varcorr = as.data.frame(VarCorr(m)), logLik = as.numeric(logLik(m)),
  logLik_full = as.numeric(logLik(m)) + if (nagq > 1) sat else 0,
  messages = m@optinfo$conv$lme4$messages)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), a[5])
