# lme4's fits of tests/data/lmm_singular_slope.csv (REML and ML): Rscript benchmarks/r/lmm_singular_slope.R
# writes tests/data/lmm_singular_slope.json.  bobyqa with a tight rhoend, so that lme4 itself converges on
# the flat valley of a near-singular covariance.
suppressMessages({library(lme4); library(jsonlite)})
d <- read.csv("tests/data/lmm_singular_slope.csv")
d$g <- factor(d$g)
out <- list(lme4 = as.character(packageVersion("lme4")), formula = "y ~ x + t + (1 + t | g)")
for (reml in c(TRUE, FALSE)) {
  m <- lmer(y ~ x + t + (1 + t | g), data = d, REML = reml,
            control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhobeg = 2e-4, rhoend = 2e-9)))
  out[[if (reml) "reml" else "ml"]] <- list(logLik = as.numeric(logLik(m)), theta = unname(getME(m, "theta")),
                                            fixef = unname(fixef(m)), sigma = sigma(m), singular = isSingular(m))
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), "tests/data/lmm_singular_slope.json")
