#!/usr/bin/env Rscript
# VarCorr as a data frame, intraclass correlations, and posterior means of scalar random effects.
#
# usage (repo root): Rscript benchmarks/r/ref_varcorr.R [tests/data/toolbox/varcorr.tsv] [case-name-regex]
#   One case a row: name, data (path under tests/data), formula, family, link, nagq, reml. Writes
#   varcorr_NAME.json next to the TSV.
#
# varcorr: lme4's as.data.frame(VarCorr(m)) (grp, var1, var2, vcov, sdcor; rows with var2 are covariances
#   in vcov and correlations in sdcor; the "Residual" row only for LMMs).
#
# icc (only where every random-effect term is a scalar intercept; none for random slopes): the adjusted
#   ICC of Nakagawa, Johnson & Schielzeth (2017, J. R. Soc. Interface 14: 20170213), as performance::icc
#   reports it, computed here directly (no extra package):
#     ICC_k   = s2_k / (sum_j s2_j + s2_e)          one per grouping factor ("by group")
#     ICC_adj = sum_j s2_j / (sum_j s2_j + s2_e)     the "adjusted ICC"
#     ICC_cond = sum_j s2_j / (s2_f + sum_j s2_j + s2_e)   the "conditional ICC" (performance's
#                "unadjusted"), s2_f = var(X beta) with denominator n - 1, offsets excluded
#   with s2_e the residual variance: gaussian sigma^2; binomial logit the latent-scale pi^2/3 (the
#   logistic distribution's variance; also Snijders & Bosker). Poisson has no ICC here (its
#   distribution-specific variance needs an approximation such as log(1 + 1/lambda)).
#
# posterior_means (GLMMs with one scalar random effect): E[b_j | y] and SD[b_j | y] at lme4's estimates
#   (fixef, theta as fitted, recorded in `at`), by adaptive Gauss-Hermite quadrature centred at lme4's
#   conditional mode (ranef) with scale sqrt(condVar) (attr(ranef(m, condVar = TRUE), "postVar")):
#     E[g(b) | y] = sum_k w_k g(b_k) r_k / sum_k w_k r_k,  b_k = mode + s x_k,
#     r_k = exp(l(b_k) - l(mode) + x_k^2 / 2),  l(b) = sum_i log f(y_i | eta_i + b) + log phi(b; 0, sd^2),
#   (x_k, w_k) the K-point rule for the standard normal (Golub-Welsch). K = 50 is the reference; K = 100
#   gives the quadrature error; K = 1 returns the mode itself (checked). `mode_check` is the largest
#   |lme4 mode - argmax l| (Newton) and `condvar_check` the largest relative difference between lme4's
#   condVar and -1 / l''(mode).
a <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", a[grep("^--file=", a)])))
source(file.path(here, "toolbox_common.R"))
a <- commandArgs(trailingOnly = TRUE)
tsv <- if (length(a) >= 1) a[1] else "tests/data/toolbox/varcorr.tsv"
pat <- if (length(a) >= 2) a[2] else "."
cases <- tb_cases(tsv)
data_dir <- file.path(dirname(tsv), ".."); out_dir <- dirname(tsv)

# K-point Gauss-Hermite rule for the standard normal density (probabilists' Hermite), Golub-Welsch
gh_normal <- function(K) {
  if (K == 1) return(list(x = 0, w = 1))
  J <- matrix(0, K, K); off <- sqrt(seq_len(K - 1)); J[cbind(1:(K - 1), 2:K)] <- off; J[cbind(2:K, 1:(K - 1))] <- off
  e <- eigen(J, symmetric = TRUE)
  o <- order(e$values)
  list(x = e$values[o], w = (e$vectors[1, o])^2)
}

# per-observation log density log f(y | eta) for the model's family (binomial with trials, poisson)
loglik_obs <- function(m) {
  fam <- family(m); y <- m@resp$y; wt <- m@resp$weights
  if (fam$family == "binomial") function(eta, i) dbinom(round(y[i] * wt[i]), round(wt[i]), fam$linkinv(eta), log = TRUE)
  else if (fam$family == "poisson") function(eta, i) dpois(y[i], fam$linkinv(eta), log = TRUE)
  else stop("posterior means: binomial and poisson only")
}

posterior_means <- function(m, Ks = c(50, 100, 1)) {
  stopifnot(isGLMM(m), length(m@cnms) == 1, length(m@cnms[[1]]) == 1)
  re <- ranef(m, condVar = TRUE)[[1]]
  mode <- re[, 1]; s <- sqrt(attr(re, "postVar")[1, 1, ])
  sdb <- unname(getME(m, "theta"))   # GLMM: theta is the random-effect sd
  grp <- getME(m, "flist")[[1]]; lev <- levels(grp)
  stopifnot(identical(rownames(re), lev))
  eta0 <- drop(getME(m, "X") %*% fixef(m)) + m@resp$offset
  ll <- loglik_obs(m)
  idx <- split(seq_along(grp), grp)
  lj <- function(j, b) sum(ll(eta0[idx[[j]]] + b, idx[[j]])) + dnorm(b, 0, sdb, log = TRUE)
  # Newton for the mode (check of lme4's), numerical derivatives of l
  newton <- function(j) {
    b <- mode[j]; h <- 1e-4
    for (it in 1:50) {
      g <- (lj(j, b + h) - lj(j, b - h)) / (2 * h)
      H <- (lj(j, b + h) - 2 * lj(j, b) + lj(j, b - h)) / h^2
      step <- g / H; b <- b - step
      if (abs(step) < 1e-12) break
    }
    c(b = b, H = (lj(j, b + h) - 2 * lj(j, b) + lj(j, b - h)) / h^2)
  }
  nt <- sapply(seq_along(lev), newton)
  quad <- function(K) {
    r <- gh_normal(K)
    t(sapply(seq_along(lev), function(j) {
      bk <- mode[j] + s[j] * r$x
      lr <- sapply(bk, function(b) lj(j, b)) - lj(j, mode[j]) + r$x^2 / 2
      wk <- r$w * exp(lr)
      mu <- sum(wk * bk) / sum(wk)
      c(mean = mu, sd = sqrt(sum(wk * (bk - mu)^2) / sum(wk)))
    }))
  }
  q <- lapply(setNames(Ks, paste0("K", Ks)), quad)
  list(group = names(m@cnms), term = m@cnms[[1]], levels = lev,
       mode = unname(mode), condsd = unname(s),
       mean = unname(q$K50[, "mean"]), sd = unname(q$K50[, "sd"]), K = 50,
       mean_K100 = unname(q$K100[, "mean"]), sd_K100 = unname(q$K100[, "sd"]),
       quad_error_K50_vs_K100 = max(abs(q$K50 - q$K100)),
       K1_minus_mode = max(abs(q$K1[, "mean"] - mode)),
       mode_check = max(abs(nt["b", ] - mode)),
       condvar_check = max(abs(s^2 / (-1 / nt["H", ]) - 1)),
       max_abs_mean_minus_mode = max(abs(q$K50[, "mean"] - mode)),
       at = list(fixef = as.list(fixef(m)), sd = sdb, nAGQ = m@devcomp$dims[["nAGQ"]]))
}

icc <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  re <- vc[vc$grp != "Residual", ]
  if (any(!is.na(re$var2)) || any(re$var1 != "(Intercept)")) return(NULL)
  fam <- family(m)
  s2e <- if (isLMM(m)) sigma(m)^2 else if (fam$family == "binomial" && fam$link == "logit") pi^2 / 3 else return(NULL)
  s2 <- setNames(re$vcov, re$grp); tot <- sum(s2)
  s2f <- var(drop(getME(m, "X") %*% fixef(m)))
  list(definition = paste("Nakagawa, Johnson & Schielzeth (2017) adjusted ICC, as performance::icc;",
                          if (isLMM(m)) "residual variance sigma^2" else "latent-scale residual variance pi^2/3 (logit)"),
       residual_variance = s2e, random_variances = as.list(s2), fixed_variance = s2f,
       icc_by_group = as.list(s2 / (tot + s2e)), icc_adjusted = tot / (tot + s2e),
       icc_conditional = tot / (s2f + tot + s2e))
}

run_case <- function(cs) {
  name <- cs$name
  d <- tb_read(file.path(data_dir, cs$data))
  fit <- tb_fit(d, cs$formula, cs$family, cs$link, as.integer(cs$nagq), cs$reml == "1")
  m <- fit$model
  single <- isGLMM(m) && length(m@cnms) == 1 && length(m@cnms[[1]]) == 1
  t0 <- proc.time()[["elapsed"]]
  pm <- if (single) posterior_means(m) else NULL
  pm_sec <- proc.time()[["elapsed"]] - t0
  ic <- icc(m)
  res <- list(name = name, kind = "varcorr", data = cs$data, formula = cs$formula,
              formula_r = tb_formula_r(cs$formula), family = family(m)$family, link = family(m)$link,
              nAGQ = if (isGLMM(m)) as.integer(cs$nagq) else NA, reml = isLMM(m) && isREML(m),
              varcorr = as.data.frame(VarCorr(m)),
              icc = ic, icc_note = if (is.null(ic)) "no ICC: random slopes/correlations or a family without a residual variance here" else NULL,
              posterior_means = pm, posterior_seconds = if (single) pm_sec else NULL,
              fit = tb_summary(m), fit_warnings = as.list(fit$warnings), conv_messages = as.list(fit$conv_messages),
              engine = tb_meta())
  tb_write(res, file.path(out_dir, paste0("varcorr_", name, ".json")))
  cat(sprintf("%s: %s%s\n", name,
              if (!is.null(ic)) sprintf("ICC adj %.4f cond %.4f", ic$icc_adjusted, ic$icc_conditional) else "no ICC",
              if (single) sprintf(" | post. means: max|mean-mode| %.3g, K50 vs K100 %.2g, K1-mode %.2g, mode check %.2g, condVar check %.2g",
                                  pm$max_abs_mean_minus_mode, pm$quad_error_K50_vs_K100, pm$K1_minus_mode,
                                  pm$mode_check, pm$condvar_check) else ""))
}
for (i in seq_len(nrow(cases))) if (grepl(pat, cases$name[i])) run_case(as.list(cases[i, ]))
