# Second opinion on lme4's profile intervals for GLMMs (sourced by ref_profile.R): the same profiled
# deviance as lme4 (lme4:::devfun2, i.e. the Laplace deviance in sd/cor and beta), but
#  * evaluated with a PIRLS tolerance of 1e-13 instead of the 1e-7 that getME(m, "devfun") always uses
#    (lme4's profile thereby carries Laplace errors up to ~3e-3 in the log-likelihood, a few 1e-4 SE in
#    the bounds; checked against a direct per-group Laplace for sim_pois_offset_la: agreement to 1e-6),
#  * the optimum is refined (BFGS in whitened coordinates, also from glmmTMB's estimates), and
#  * each bound is found by root-finding on the signed root deviance zeta(c) = +-qnorm((1 + level) / 2),
#    every zeta(c) a full constrained minimisation, instead of lme4's spline through a grid of points.
# Whitening: p = (sd/cor..., beta); V = 2 H^-1 from a numerical Hessian H of the deviance at the optimum;
# for the profile of p_k = c the others are p_-k = p^_-k + V_-k,k / V_kk (c - p^_k) + L w with L L' the
# conditional covariance, so w = 0 is the quadratic guess and the search over w is well conditioned.
# sd parameters are restricted to >= 0 (lower bound 0 when zeta(0) does not reach the cut-off) and
# correlations to (-1, 1) (bound -1 or 1 likewise).

exact_profile <- function(m, levels, starts = list(), maxit = 500) {
  t0 <- proc.time()[["elapsed"]]
  dd <- lme4:::devfun2(m, useSc = FALSE, signames = FALSE,
                       transfuns = list(from.chol = lme4:::Cv_to_Sv, to.chol = lme4:::Sv_to_Cv, to.sd = identity),
                       prefix = c("sd", "cor"))
  # getME(m, "devfun"), which devfun2 (and so lme4's profile) uses, is rebuilt with glmerControl()'s default
  # tolPwrss = 1e-7 whatever the fit's control: its inner PIRLS then stops early enough to misstate the
  # Laplace log-likelihood by up to ~3e-3 at parameters two SEs from the optimum (1e-5 at it). Tighten it.
  assign("tolPwrss", 1e-13, envir = environment(environment(dd)$d0))
  opt <- attr(dd, "optimum"); pn <- names(opt); np <- length(opt)
  is_sd <- startsWith(pn, "sd_"); is_cor <- startsWith(pn, "cor_")
  nev <- 0L
  f <- function(p) {
    nev <<- nev + 1L
    if (any(p[is_cor] <= -1 | p[is_cor] >= 1)) return(1e10)
    p[is_sd] <- abs(p[is_sd])   # the deviance is even in a scalar sd; keeps the search unconstrained
    v <- tryCatch(dd(p), error = function(e) NA_real_)
    if (is.finite(v)) v else 1e10
  }
  hess <- function(p) numDeriv::hessian(f, p, method.args = list(d = 1e-3, r = 4))
  # refine the optimum from lme4's estimates and any extra starts
  cand <- c(list(lme4 = opt), starts)
  best <- NULL
  for (s in names(cand)) {
    p0 <- cand[[s]][pn]
    if (any(!is.finite(p0))) next
    H <- hess(p0); ev <- eigen(H, symmetric = TRUE)
    if (any(ev$values <= 0)) H <- H + diag(abs(min(ev$values)) + 1e-6, np)
    C <- t(chol(2 * solve(H)))
    for (rep in 1:3) {
      o <- optim(rep(0, np), function(z) f(p0 + drop(C %*% z)), method = "BFGS",
                 control = list(reltol = 1e-14, maxit = maxit, ndeps = rep(1e-4, np)))
      p0 <- p0 + drop(C %*% o$par)
    }
    if (is.null(best) || o$value < best$value) best <- list(par = p0, value = o$value, from = s)
  }
  phat <- best$par; phat[is_sd] <- abs(phat[is_sd]); dmin <- f(phat)
  H <- hess(phat); V <- 2 * solve(H)
  prof_dev <- function(k, c) {
    ik <- setdiff(seq_len(np), k)
    mu <- phat[ik] + V[ik, k] / V[k, k] * (c - phat[k])
    Vc <- V[ik, ik, drop = FALSE] - V[ik, k, drop = FALSE] %*% V[k, ik, drop = FALSE] / V[k, k]
    L <- t(chol(Vc))
    g <- function(w) { p <- numeric(np); p[k] <- c; p[ik] <- mu + drop(L %*% w); f(p) }
    o <- optim(rep(0, np - 1), g, method = "BFGS", control = list(reltol = 1e-14, maxit = maxit,
                                                                   ndeps = rep(1e-4, np - 1)))
    o$value
  }
  zeta <- function(k, c) sign(c - phat[k]) * sqrt(max(0, prof_dev(k, c) - dmin))
  bound <- function(k, q) {   # q < 0: lower bound, q > 0: upper
    se <- sqrt(V[k, k]); lim <- if (is_sd[k]) c(0, Inf) else if (is_cor[k]) c(-1, 1) else c(-Inf, Inf)
    z0 <- phat[k]; step <- abs(q) * se
    a <- z0; b <- z0 + sign(q) * step
    for (i in 1:30) {
      b <- min(max(b, lim[1]), lim[2])
      zb <- zeta(k, b)
      if (sign(q) * (zb - q) >= 0) break
      if (b == lim[1] || b == lim[2]) return(list(value = b, at_limit = TRUE))
      a <- b; b <- b + sign(q) * step
    }
    r <- uniroot(function(c) zeta(k, c) - q, sort(c(a, b)), tol = 1e-9 * max(1, abs(z0)))
    list(value = r$root, at_limit = FALSE)
  }
  out <- lapply(setNames(levels, sprintf("%g", levels)), function(lv) {
    q <- qnorm((1 + lv) / 2)
    lapply(setNames(seq_len(np), pn), function(k) {
      lo <- bound(k, -q); up <- bound(k, q)
      list(lower = lo$value, upper = up$value, lower_at_limit = lo$at_limit, upper_at_limit = up$at_limit)
    })
  })
  list(method = "root-finding on lme4's profiled deviance (lme4:::devfun2: Laplace, or AGHQ for nAGQ > 1) with PIRLS tolerance 1e-13, optimum refined",
       optimum = as.list(phat), deviance = dmin, logLik = -dmin / 2, optimum_from = best$from,
       lme4_deviance = attr(dd, "basedev"), lme4_deviance_tight_at_lme4_optimum = f(opt),
       pirls_tolerance = 1e-13, intervals = out,
       evaluations = nev, seconds = proc.time()[["elapsed"]] - t0)
}

# Independent check of the fixed-effect bounds: refit the GLMM with beta_k held at the bound (an offset
# c x_k, the column dropped from X) by glmer (bobyqa and Nelder_Mead, tolPwrss 1e-12, the better kept) and report
# zeta = sign * sqrt(2 (logLik_max - logLik_constrained)); at an exact bound it is +-qnorm((1 + level) / 2).
offset_check <- function(m, d, ex, level = 0.95) {
  X <- getME(m, "X"); bars <- findbars(formula(m))
  re <- paste(vapply(bars, function(b) paste0("(", deparse1(b), ")"), ""), collapse = " + ")
  d$.y <- m@resp$y; d$.w <- m@resp$weights
  ll0 <- ex$logLik; lv <- sprintf("%g", level)
  fam <- family(m)
  t0 <- proc.time()[["elapsed"]]
  res <- lapply(setNames(colnames(X), colnames(X)), function(k) {
    Xo <- X[, colnames(X) != k, drop = FALSE]
    sapply(c(lower = "lower", upper = "upper"), function(side) {
      cval <- ex$intervals[[lv]][[k]][[side]]
      d$.off <- cval * X[, k] + m@resp$offset
      f <- as.formula(paste(".y ~ 0 + Xo + offset(.off) +", re))
      lls <- sapply(c("bobyqa", "Nelder_Mead"), function(opt) tryCatch(suppressWarnings(suppressMessages(
        as.numeric(logLik(glmer(f, data = d, family = fam, weights = .w, nAGQ = m@devcomp$dims[["nAGQ"]],
                                control = glmerControl(optimizer = opt, tolPwrss = 1e-12, optCtrl = list(maxfun = 1e5))))))),
        error = function(e) NA_real_))
      if (all(is.na(lls))) NA_real_ else (if (side == "lower") -1 else 1) * sqrt(max(0, 2 * (ll0 - max(lls, na.rm = TRUE))))
    })
  })
  list(level = level, target = qnorm((1 + level) / 2), zeta = res,
       max_abs_error = if (all(is.na(unlist(res)))) NA else max(abs(abs(unlist(res)) - qnorm((1 + level) / 2)), na.rm = TRUE),
       failed = sum(is.na(unlist(res))),
       seconds = proc.time()[["elapsed"]] - t0)
}

# LMMs: the same check for lme4's own fixed-effect bounds (no second profile needed there: lme4's LMM
# deviance is exact). zeta from an ML lmer fit with beta_k held at lme4's bound by an offset.
lmm_offset_check <- function(m, d, intervals, level = 0.95) {
  mml <- if (isREML(m)) refitML(m) else m
  X <- getME(mml, "X"); ll0 <- as.numeric(logLik(mml)); lv <- sprintf("%g", level)
  re <- paste(vapply(findbars(formula(mml)), function(b) paste0("(", deparse1(b), ")"), ""), collapse = " + ")
  d$.y <- getME(mml, "y")
  res <- lapply(setNames(colnames(X), colnames(X)), function(k) {
    Xo <- X[, colnames(X) != k, drop = FALSE]
    sapply(c(lower = 1, upper = 2), function(side) {
      d$.off <- intervals[[lv]][[k]][side] * X[, k] + getME(mml, "offset")
      f <- as.formula(paste(".y ~ 0 +", if (ncol(Xo)) "Xo +" else "", "offset(.off) +", re))
      ll <- as.numeric(logLik(suppressMessages(lmer(f, data = d, REML = FALSE))))
      (if (side == 1) -1 else 1) * sqrt(max(0, 2 * (ll0 - ll)))
    })
  })
  list(level = level, target = qnorm((1 + level) / 2), zeta = res,
       max_abs_error = max(abs(abs(unlist(res)) - qnorm((1 + level) / 2))))
}
