#!/usr/bin/env Rscript
# Profile-likelihood confidence intervals with lme4: confint(m, method = "profile", oldNames = FALSE),
# plus the Wald intervals confint(m, method = "Wald") for comparison.
#
# usage (repo root): Rscript benchmarks/r/ref_profile.R [tests/data/toolbox/profile.tsv] [case-name-regex]
#   One case a row: name, data (path under tests/data), formula (project syntax, `**` -> `^`), family, link
#   ("" = default), nagq (GLMMs: lme4 profiles the fit's deviance, Laplace for 1), reml (gaussian), levels
#   (comma-separated confidence levels), scaled_check (optional, comma-separated covariates: see
#   `scaled_check` below). Writes profile_NAME.json next to the TSV.
#
# What lme4 does (1.1-31, profile.merMod / devfun2):
#  * confint(m, method = "profile") is profile(m, signames = oldNames) followed by confint(<profile>, level):
#    one profile (alphamax = 0.01, so it reaches 99 %) serves every level; intervals are where the
#    interpolated signed root deviance zeta crosses +-qnorm((1 + level) / 2).
#  * REML fits are profiled on the ML deviance: devfun2() starts with refitML(m). The profile intervals of
#    a REML fit are therefore those of the ML fit (centred at the ML estimates), while its Wald intervals
#    use the REML estimates and standard errors.
#  * Parameters are on the sd/correlation scale: sd_TERM|GROUP, cor_TERM2.TERM1|GROUP, sigma (LMMs), then
#    the fixed effects. For GLMMs the deviance is the fit's own: Laplace for nAGQ = 1, adaptive quadrature
#    for nAGQ > 1 (getME(m, "devfun") is rebuilt with the fit's nAGQ); beta is in the outer optimisation.
#
# JSON: intervals (per level: parameter -> [lower, upper], null where lme4 gives NA), wald (same layout;
# variance parameters are NA in lme4's Wald intervals), estimates (the zeta = 0 row of the profile, i.e. the
# ML estimates), profile (per parameter: the profiled values and zeta), seconds (fit, profile), warnings.
# status "error" + profile_error where lme4's profile() stops (intervals then null).
# GLMMs also get `exact` (profile_exact.R): the bounds by root-finding on the same Laplace profile from a
# refined optimum (lme4's and glmmTMB's estimates as starts), and their largest difference from lme4's;
# exact$offset_check re-derives zeta at each exact fixed-effect bound (first level) from a glmer fit with
# that coefficient held fixed by an offset (should be +-qnorm((1 + level) / 2)).
# lmm_offset_check (LMMs): zeta at lme4's fixed-effect bounds (first level) from an ML lmer fit with the
# coefficient held by an offset (should be +-qnorm((1 + level) / 2)).
# scaled_check (cases with a scaled_check column): lme4's profile intervals (first level) of the same model
# with those covariates centred and scaled, mapped back (sd/cor unchanged, slopes / sd(column), no intercept).
a <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", a[grep("^--file=", a)])))
source(file.path(here, "toolbox_common.R"))
source(file.path(here, "profile_exact.R"))
a <- commandArgs(trailingOnly = TRUE)
tsv <- if (length(a) >= 1) a[1] else "tests/data/toolbox/profile.tsv"
pat <- if (length(a) >= 2) a[2] else "."
cases <- tb_cases(tsv)
data_dir <- file.path(dirname(tsv), ".."); out_dir <- dirname(tsv)

ci_list <- function(ci) lapply(setNames(seq_len(nrow(ci)), rownames(ci)), function(i) unname(ci[i, ]))

run_case <- function(cs) {
  name <- cs$name
  d <- tb_read(file.path(data_dir, cs$data))
  reml <- cs$reml == "1"; nagq <- as.integer(cs$nagq)
  levels <- as.numeric(strsplit(cs$levels, ",", fixed = TRUE)[[1]])
  fit <- tb_fit(d, cs$formula, cs$family, cs$link, nagq, reml)
  m <- fit$model

  rec <- tb_rec()
  t0 <- proc.time()
  pp <- tryCatch(tb_catch(profile(m, signames = FALSE), rec), error = function(e) e)
  dt <- proc.time() - t0
  prof_sec <- dt[["elapsed"]]; prof_cpu <- dt[["user.self"]] + dt[["sys.self"]]
  prof_error <- if (inherits(pp, "error")) conditionMessage(pp) else NULL
  rec_ci <- tb_rec()
  wald <- lapply(setNames(levels, sprintf("%g", levels)), function(lv)
    ci_list(confint(m, method = "Wald", level = lv, oldNames = FALSE)))
  if (is.null(prof_error)) {
    intervals <- lapply(setNames(levels, sprintf("%g", levels)), function(lv)
      ci_list(tb_catch(confint(pp, level = lv), rec_ci)))
    pdf <- as.data.frame(pp)
    params <- levels(pdf$.par)
    prof <- lapply(setNames(params, params), function(p) {
      s <- pdf[pdf$.par == p, ]
      list(value = s[[p]], zeta = s$.zeta)
    })
    est <- as.list(unlist(pdf[pdf$.zeta == 0, , drop = FALSE][1, params]))
  } else {
    intervals <- NULL; prof <- NULL; est <- NULL; params <- rownames(confint(m, method = "Wald", oldNames = FALSE))
  }
  na_bounds <- unlist(lapply(names(intervals), function(lv) {
    ci <- intervals[[lv]]
    unlist(lapply(names(ci), function(p) c(if (is.na(ci[[p]][1])) paste0(p, " lower @", lv),
                                           if (is.na(ci[[p]][2])) paste0(p, " upper @", lv))))
  }))

  # GLMMs: second opinion by root-finding on the same Laplace profile (profile_exact.R), with the
  # optimum refined from lme4's and glmmTMB's estimates
  exact <- NULL; tmb_ll <- NULL
  if (isGLMM(m)) {
    starts <- list()
    tm <- tryCatch(suppressWarnings(glmmTMB::glmmTMB(as.formula(tb_formula_r(cs$formula)), data = d,
                                                     family = family(m))), error = function(e) NULL)
    if (!is.null(tm)) {
      tmb_ll <- as.numeric(logLik(tm))
      vc <- glmmTMB::VarCorr(tm)$cond
      th <- unlist(lapply(names(m@cnms), function(g) { S <- vc[[g]]; L <- t(chol(S[m@cnms[[g]], m@cnms[[g]], drop = FALSE]))
                                                       L[lower.tri(L, diag = TRUE)] }))
      sv <- lme4:::Cv_to_Sv(th, n = lengths(m@cnms))
      pn <- names(attr(lme4:::devfun2(m, useSc = FALSE, signames = FALSE), "optimum"))
      starts$glmmTMB <- setNames(c(sv, glmmTMB::fixef(tm)$cond[names(fixef(m))]), pn)
    }
    exact <- exact_profile(m, levels, starts)
    exact$glmmTMB_logLik <- tmb_ll
    exact$offset_check <- offset_check(m, d, exact, levels[1])
    if (!is.null(intervals)) exact$max_abs_diff_vs_lme4 <- lapply(setNames(names(intervals), names(intervals)), function(lv)
      max(abs(unlist(lapply(names(intervals[[lv]]), function(p) intervals[[lv]][[p]] -
        c(exact$intervals[[lv]][[p]]$lower, exact$intervals[[lv]][[p]]$upper)))), na.rm = TRUE))
  }

  lmm_check <- if (isLMM(m) && !is.null(intervals)) lmm_offset_check(m, d, intervals, levels[1]) else NULL

  # optional check on badly scaled data: the same model with the listed covariates centred and scaled,
  # profiled by lme4; its sd/cor and slope bounds map back exactly (slopes divided by the column's sd;
  # the intercept is a different parameter there and is left out)
  scaled <- NULL
  if (nzchar(cs$scaled_check)) {
    vs <- strsplit(cs$scaled_check, ",", fixed = TRUE)[[1]]
    d2 <- d; sds <- sapply(vs, function(v) sd(d[[v]]))
    for (v in vs) d2[[v]] <- (d[[v]] - mean(d[[v]])) / sds[[v]]
    f2 <- tb_fit(d2, cs$formula, cs$family, cs$link, nagq, reml)
    rec2 <- tb_rec(); t2 <- proc.time()[["elapsed"]]
    ci2 <- tryCatch(tb_catch(confint(f2$model, method = "profile", oldNames = FALSE, level = levels[1]), rec2),
                    error = function(e) e)
    if (!inherits(ci2, "error")) {
      keep <- rownames(ci2) != "(Intercept)"
      ci2 <- ci2[keep, , drop = FALSE]
      for (v in intersect(vs, rownames(ci2))) ci2[v, ] <- ci2[v, ] / sds[[v]]
    }
    scaled <- list(covariates = as.list(vs), sds = as.list(sds), level = levels[1],
                   logLik = as.numeric(logLik(f2$model)), fit_warnings = as.list(f2$warnings),
                   intervals = if (inherits(ci2, "error")) NULL else ci_list(ci2),
                   error = if (inherits(ci2, "error")) conditionMessage(ci2) else NULL,
                   warnings = as.list(unique(rec2$warnings)), seconds = proc.time()[["elapsed"]] - t2)
  }

  res <- list(
    name = name, kind = "profile", data = cs$data, formula = cs$formula,
    formula_r = tb_formula_r(cs$formula), family = family(m)$family, link = family(m)$link,
    nAGQ = if (isGLMM(m)) nagq else NA, reml = isLMM(m) && isREML(m),
    profiled_deviance = if (isGLMM(m) && nagq <= 1) "Laplace (nAGQ = 1) deviance" else
      if (isGLMM(m)) sprintf("adaptive Gauss-Hermite (nAGQ = %d) deviance, the fit's own; lme4's logLik convention (no saturated term)", nagq) else
      if (isREML(m)) "ML deviance (lme4 refits the REML fit by ML before profiling)" else "ML deviance",
    call = sprintf("confint(m, method = \"profile\", oldNames = FALSE, level = L) for L in %s",
                   paste(levels, collapse = ", ")),
    levels = as.list(levels), parameters = as.list(params),
    status = if (is.null(prof_error)) "ok" else "error", profile_error = prof_error,
    intervals = intervals, wald = wald,
    estimates = est,
    fit = tb_summary(m),
    na_bounds = as.list(na_bounds),
    seconds = list(fit = fit$seconds, profile = prof_sec, profile_cpu = prof_cpu),
    fit_warnings = as.list(fit$warnings), conv_messages = as.list(fit$conv_messages),
    profile_warnings = as.list(unique(rec$warnings)), confint_warnings = as.list(unique(rec_ci$warnings)),
    exact = exact, lmm_offset_check = lmm_check, scaled_check = scaled, profile = prof, engine = tb_meta())
  tb_write(res, file.path(out_dir, paste0("profile_", name, ".json")))
  ci <- if (!is.null(intervals)) intervals[[1]] else lapply(exact$intervals[[1]], function(b) c(b$lower, b$upper))
  cat(sprintf("%s: fit %.1fs, profile %.1fs (cpu %.1fs)%s, %d warnings, NA bounds: %s%s%s\n  %s%s\n", name, fit$seconds, prof_sec, prof_cpu,
              if (!is.null(prof_error)) paste0(" ERROR: ", prof_error) else "",
              length(unique(c(rec$warnings, rec_ci$warnings))), if (length(na_bounds)) paste(na_bounds, collapse = "; ") else "none",
              if (!is.null(lmm_check)) sprintf(", LMM offset check: max |zeta| error %.2g", lmm_check$max_abs_error) else "",
              if (!is.null(exact)) sprintf(", exact %.1fs (offset check: max |zeta| error %.2g), max diff %s", exact$seconds,
                                           exact$offset_check$max_abs_error,
                                           paste(format(unlist(exact$max_abs_diff_vs_lme4), digits = 2), collapse = "/")) else "",
              if (is.null(intervals)) "(exact) " else "",
              paste(sprintf("%s [%.4g, %.4g]", names(ci), sapply(ci, `[`, 1), sapply(ci, `[`, 2)), collapse = "  ")))
}
for (i in seq_len(nrow(cases))) if (grepl(pat, cases$name[i])) run_case(as.list(cases[i, ]))
