#!/usr/bin/env Rscript
# Satterthwaite degrees of freedom and t/F tests for linear mixed models with lmerTest.
#
# usage (repo root): Rscript benchmarks/r/ref_lmertest.R [tests/data/toolbox/lmertest.tsv] [case-name-regex]
#   One case a row: name, data (path under tests/data), formula (project syntax), reml. Writes
#   lmertest_NAME.json next to the TSV.
#
# JSON:
#  coefficients: summary(m)$coefficients of lmerTest::lmer (Estimate, Std. Error, df, t value, Pr(>|t|));
#    df is Satterthwaite's: 2 (l' V l)^2 / (g' A g), V = vcov(beta), g = gradient of l' V(varpar) l in
#    varpar = (theta, sigma), A = vcov_varpar (2 x the inverse Hessian of the (RE)ML deviance in varpar);
#    t = estimate / SE, p = 2 pt(-|t|, df).
#  anova_III (and anova_II, anova_I): anova(m, type = ...) with Satterthwaite denominator df (Sum Sq,
#    Mean Sq, NumDF, DenDF, F value, Pr(>F)), default contrasts (contr.treatment); anova_III_contr_sum is
#    the type III table from the same model fitted with contr.sum (lmerTest's type III contrasts should not
#    depend on the coding; the `type3_coding_max_diff` field reports the largest difference).
#  varpar: lmerTest's (theta, sigma) at the estimates, vcov_varpar, and Jac_list (the Jacobian of
#    vcov(beta) with respect to varpar, one p x p matrix per variance parameter).
a <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", a[grep("^--file=", a)])))
source(file.path(here, "toolbox_common.R"))
suppressPackageStartupMessages(library(lmerTest))
a <- commandArgs(trailingOnly = TRUE)
tsv <- if (length(a) >= 1) a[1] else "tests/data/toolbox/lmertest.tsv"
pat <- if (length(a) >= 2) a[2] else "."
cases <- tb_cases(tsv)
data_dir <- file.path(dirname(tsv), ".."); out_dir <- dirname(tsv)

rows_of <- function(tab) { tab <- as.data.frame(tab); lapply(setNames(seq_len(nrow(tab)), rownames(tab)), function(i) as.list(tab[i, , drop = FALSE])) }

run_case <- function(cs) {
  name <- cs$name
  d <- tb_read(file.path(data_dir, cs$data))
  reml <- cs$reml == "1"
  fit <- tb_fit(d, cs$formula, "gaussian", "", 0, reml,
                fit_fun = function(f, d, reml) lmerTest::lmer(f, data = d, REML = reml))
  m <- fit$model
  stopifnot(inherits(m, "lmerModLmerTest"))
  rec <- tb_rec()
  t0 <- proc.time()[["elapsed"]]
  co <- tb_catch(summary(m)$coefficients, rec)
  a3 <- tb_catch(anova(m, type = "III"), rec)
  sec <- proc.time()[["elapsed"]] - t0
  a2 <- tb_catch(anova(m, type = "II"), rec)
  a1 <- tb_catch(anova(m, type = "I"), rec)
  # the same type III table with sum-to-zero coding of every factor
  facs <- names(d)[vapply(d, is.factor, NA)]
  facs <- intersect(facs, all.vars(nobars(as.formula(tb_formula_r(cs$formula)))))
  a3s <- NULL; diff3 <- NA
  if (length(facs)) {
    ms <- tb_catch(lmerTest::lmer(as.formula(tb_formula_r(cs$formula)), data = d, REML = reml,
                                  contrasts = setNames(rep(list("contr.sum"), length(facs)), facs)), rec)
    a3s <- anova(ms, type = "III")
    diff3 <- max(abs(as.matrix(a3s) - as.matrix(a3)[rownames(a3s), ]))
  }
  res <- list(
    name = name, kind = "lmertest", data = cs$data, formula = cs$formula,
    formula_r = tb_formula_r(cs$formula), reml = isREML(m), ddf = "Satterthwaite",
    coefficients = rows_of(co),
    coef_columns = as.list(colnames(co)),
    anova_III = rows_of(a3), anova_II = rows_of(a2), anova_I = rows_of(a1),
    anova_III_contr_sum = if (!is.null(a3s)) rows_of(a3s) else NULL,
    type3_coding_max_diff = diff3, factors = as.list(facs),
    varpar = as.list(c(unname(getME(m, "theta")), sigma(m))),
    varpar_names = as.list(c(paste0("theta", seq_along(getME(m, "theta"))), "sigma")),
    vcov_varpar = unname(m@vcov_varpar),
    Jac_list = lapply(m@Jac_list, unname),
    vcov_beta = unname(as.matrix(vcov(m))),
    fit = tb_summary(m),
    seconds = list(fit = fit$seconds, summary_and_anova = sec),
    fit_warnings = as.list(fit$warnings), conv_messages = as.list(fit$conv_messages),
    lmerTest_warnings = as.list(unique(rec$warnings)),
    engine = c(tb_meta(), list(lmerTest = as.character(packageVersion("lmerTest")))))
  tb_write(res, file.path(out_dir, paste0("lmertest_", name, ".json")))
  cat(sprintf("%s: %s%s\n", name,
              paste(sprintf("%s df=%.3f t=%.3f", rownames(co), co[, "df"], co[, "t value"]), collapse = "; "),
              if (length(facs)) sprintf(" | type III coding diff %.2g", diff3) else ""))
}
for (i in seq_len(nrow(cases))) if (grepl(pat, cases$name[i])) run_case(as.list(cases[i, ]))
