# Helpers shared by ref_anova.R, ref_profile.R, ref_lmertest.R and ref_varcorr.R (sourced, not run).
# Fits follow benchmarks/r/ref_fit.R: lmer with its default control; glmer with bobyqa, maxfun 1e5.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})

tb_read <- function(path) {
  d <- read.csv(path)
  for (nm in names(d)) if (is.character(d[[nm]])) d[[nm]] <- factor(d[[nm]])
  d
}

# the project's formula syntax (Python's ** inside I()) to R's
tb_formula_r <- function(f) gsub("**", "^", f, fixed = TRUE)

tb_family <- function(family, link = "") {
  ff <- get(family, mode = "function")
  if (nzchar(link)) ff(link = link) else ff()
}

tb_is_lmm <- function(fam) fam$family == "gaussian" && fam$link == "identity"

# Evaluate expr, recording warnings and messages (muffled) in the environment `rec`.
tb_catch <- function(expr, rec) withCallingHandlers(expr,
  warning = function(w) { rec$warnings <- c(rec$warnings, conditionMessage(w)); invokeRestart("muffleWarning") },
  message = function(m) { rec$messages <- c(rec$messages, sub("\n$", "", conditionMessage(m)))
                          invokeRestart("muffleMessage") })

tb_rec <- function() { e <- new.env(); e$warnings <- character(); e$messages <- character(); e }

# Fit one model; returns list(model, seconds, warnings, conv_messages).
tb_fit <- function(d, formula, family = "gaussian", link = "", nagq = 1, reml = FALSE, fit_fun = NULL) {
  fam <- tb_family(family, link)
  f <- as.formula(tb_formula_r(formula))
  rec <- tb_rec()
  t0 <- proc.time()[["elapsed"]]
  m <- tb_catch(
    if (!is.null(fit_fun)) fit_fun(f, d, reml)
    else if (tb_is_lmm(fam)) lmer(f, data = d, REML = reml)
    else glmer(f, data = d, family = fam, nAGQ = nagq,
               control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))), rec)
  el <- proc.time()[["elapsed"]] - t0
  list(model = m, seconds = el, warnings = unique(rec$warnings),
       conv_messages = as.character(unlist(m@optinfo$conv$lme4$messages)))
}

# Fit summary in the layout of the shared reference JSON (fixef, se, varcorr, logLik, ...).
tb_summary <- function(m) {
  s <- summary(m)$coefficients
  list(fixef = as.list(fixef(m)), se = as.list(setNames(s[, 2], rownames(s))),
       varcorr = as.data.frame(VarCorr(m)), theta = as.list(unname(getME(m, "theta"))),
       logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"), AIC = AIC(m), BIC = BIC(m),
       deviance = if (isREML(m)) NA_real_ else deviance(m),
       REMLcrit = if (isREML(m)) REMLcrit(m) else NA_real_,
       reml = isREML(m), nobs = nobs(m), ngrps = as.list(ngrps(m)), singular = isSingular(m))
}

tb_write <- function(x, path) {
  js <- toJSON(x, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null", null = "null")
  writeLines(js, path)
}

tb_meta <- function() list(R = as.character(getRversion()), lme4 = as.character(packageVersion("lme4")),
                           date = format(Sys.Date()))

# Read a TSV case table (first line a header starting with "# ") as a data frame of strings.
tb_cases <- function(path) {
  lines <- readLines(path)
  hdr <- strsplit(sub("^# ?", "", lines[1]), "\t", fixed = TRUE)[[1]]
  body <- lines[-1]; body <- body[nzchar(body) & !startsWith(body, "#")]
  rows <- lapply(strsplit(body, "\t", fixed = TRUE), function(r) { length(r) <- length(hdr); r[is.na(r)] <- ""; r })
  df <- as.data.frame(do.call(rbind, rows), stringsAsFactors = FALSE)
  names(df) <- hdr
  df
}
