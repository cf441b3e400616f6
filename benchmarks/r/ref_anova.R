#!/usr/bin/env Rscript
# Likelihood-ratio model comparison with lme4's anova(m0, m1[, m2]) on one data set.
#
# usage (repo root): Rscript benchmarks/r/ref_anova.R [tests/data/toolbox/anova.tsv] [case-name-regex]
#   One case a row: name, data (path under tests/data), family, link ("" = default), nagq, reml,
#   formula0, formula1[, formula2] in the project's syntax (`**` -> `^`). Writes anova_NAME.json next to
#   the TSV. reml 1: gaussian models are fitted with REML (lmer's default), so anova() refits them by ML
#   first (message "refitting model(s) with ML (instead of REML)").
#
# JSON: `table` is anova()'s data frame, one row per model in lme4's order (by npar; rows carry the model
# label m0/m1/m2 = position in the command line and its formula), columns as lme4 names them:
# npar, AIC, BIC, logLik, deviance (= -2 logLik), Chisq (= 2 max(0, diff logLik)), Df, Pr(>Chisq).
# `refit_ml`: whether anova() refitted; `models`: each fit as made; `models_ml`: the ML fits the table
# uses (refitML() of the REML fits, identical to anova()'s own refit); warnings and timings per model.
# `glmmTMB`: the same models fitted by glmmTMB 1.1.5 (ML) as a check; `best`: per model the higher of the
# two log-likelihoods and the LR statistics recomputed from them (use where lme4 stops early).
a <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", a[grep("^--file=", a)])))
source(file.path(here, "toolbox_common.R"))
a <- commandArgs(trailingOnly = TRUE)
tsv <- if (length(a) >= 1) a[1] else "tests/data/toolbox/anova.tsv"
pat <- if (length(a) >= 2) a[2] else "."
cases <- tb_cases(tsv)
data_dir <- file.path(dirname(tsv), ".."); out_dir <- dirname(tsv)

run_case <- function(cs) {
name <- cs$name; data_path <- file.path(data_dir, cs$data); family <- cs$family; link <- cs$link
nagq <- as.integer(cs$nagq); reml <- cs$reml == "1"; out <- file.path(out_dir, paste0("anova_", name, ".json"))
formulas <- unname(unlist(cs[c("formula0", "formula1", "formula2")])); formulas <- formulas[nzchar(formulas)]
labels <- paste0("m", seq_along(formulas) - 1L)

d <- tb_read(data_path)
fits <- lapply(formulas, function(f) tb_fit(d, f, family, link, nagq, reml))
names(fits) <- labels
mods <- lapply(fits, `[[`, "model")

rec <- tb_rec()
t0 <- proc.time()[["elapsed"]]
tab <- tb_catch(do.call(anova, c(unname(mods), list(model.names = labels))), rec)
anova_sec <- proc.time()[["elapsed"]] - t0
refit <- any(grepl("refitting model(s) with ML", rec$messages, fixed = TRUE))

tab <- as.data.frame(tab)
rows <- lapply(seq_len(nrow(tab)), function(i) {
  lab <- rownames(tab)[i]
  c(list(model = lab, formula = formulas[match(lab, labels)]), as.list(tab[i, , drop = FALSE]))
})

mods_ml <- lapply(mods, function(m) if (isLMM(m) && isREML(m)) refitML(m) else m)
# consistency: the table's logLik are those of the ML fits
ll_ml <- vapply(mods_ml, function(m) as.numeric(logLik(m)), 0)
stopifnot(max(abs(ll_ml[rownames(tab)] - tab$logLik)) < 1e-8)

# Second opinion: glmmTMB (ML, Laplace) log-likelihood of every model; `best` takes the higher of the two
# per model and recomputes the LR statistics from it (lme4 stops early on some data, e.g. grouseticks).
tmb <- lapply(formulas, function(f) {
  r <- tb_rec()
  m <- tb_catch(glmmTMB::glmmTMB(as.formula(tb_formula_r(f)), data = d, family = tb_family(family, link),
                                 REML = FALSE), r)
  list(logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"), warnings = as.list(unique(r$warnings)),
       pdHess = m$sdr$pdHess, fixef = as.list(glmmTMB::fixef(m)$cond))
})
names(tmb) <- labels
ord <- rownames(tab)
ll_best <- pmax(tab$logLik, vapply(tmb[ord], `[[`, 0, "logLik"))
chisq_best <- 2 * pmax(0, c(NA, diff(ll_best)))
best <- lapply(seq_along(ord), function(i) list(model = ord[i], logLik = ll_best[i], source =
  if (tab$logLik[i] >= tmb[[ord[i]]]$logLik) "lme4" else "glmmTMB", Chisq = chisq_best[i], Df = tab$Df[i],
  `Pr(>Chisq)` = if (i == 1) NA else pchisq(chisq_best[i], tab$Df[i], lower.tail = FALSE)))

res <- list(
  name = name, kind = "anova", data = cs$data, family = tb_family(family, link)$family,
  link = tb_family(family, link)$link, nAGQ = nagq, reml_input = reml,
  formulas = setNames(as.list(formulas), labels), formulas_r = setNames(as.list(tb_formula_r(formulas)), labels),
  refit_ml = refit, anova_messages = as.list(rec$messages), anova_warnings = as.list(rec$warnings),
  table_order = as.list(rownames(tab)), table = rows,
  models = lapply(mods, tb_summary),
  models_ml = if (refit) lapply(mods_ml, tb_summary) else NULL,
  glmmTMB = tmb, best = best,
  fit_seconds = lapply(fits, `[[`, "seconds"), anova_seconds = anova_sec,
  fit_warnings = lapply(fits, function(x) as.list(x$warnings)),
  conv_messages = lapply(fits, function(x) as.list(x$conv_messages)),
  engine = tb_meta())
tb_write(res, out)
cat(sprintf("%s: refit=%s, max |lme4 - glmmTMB| logLik %.2g, %s\n", name, refit,
            max(abs(tab$logLik - vapply(tmb[ord], `[[`, 0, "logLik"))),
            paste(sprintf("%s npar=%d logLik=%.4f", rownames(tab), tab$npar, tab$logLik), collapse = "; ")))
}
for (i in seq_len(nrow(cases))) if (grepl(pat, cases$name[i])) run_case(as.list(cases[i, ]))
