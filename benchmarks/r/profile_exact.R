# Second opinion on lme4's profile intervals for GLMMs (sourced by ref_profile.R): the same profiled
# deviance as lme4 (lme4:::devfun2, i.e. the Laplace deviance in sd/cor and beta), but
#  * the optimum is refined (BFGS in whitened coordinates, also from glmmTMB's estimates), and
#  * each bound is found by root-finding on the signed root deviance zeta(c) = +-qnorm((1 + level) / 2),
#    every zeta(c) a full constrained minimisation, instead of lme4's spline through a grid of points.
# Whitening: p = (sd/cor..., beta); V = 2 H^-1 from a numerical Hessian H of the deviance at the optimum;
# for the profile of p_k = c the others are p_-k = p^_-k + V_-k,k / V_kk (c - p^_k) + L w with L L' the
# conditional covariance, so w = 0 is the quadratic guess and the search over w is well conditioned.
# sd parameters are restricted to >= 0 (lower bound 0 when zeta(0) does not reach the cut-off) and
# correlations to (-1, 1) (bound -1 or 1 likewise).

exact_profile <- function(m, levels, starts = list(), maxit = 500) {
  dd <- lme4:::devfun2(m, useSc = FALSE, signames = FALSE,
                       transfuns = list(from.chol = lme4:::Cv_to_Sv, to.chol = lme4:::Sv_to_Cv, to.sd = identity),
                       prefix = c("sd", "cor"))
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
  t0 <- proc.time()[["elapsed"]]
  out <- lapply(setNames(levels, sprintf("%g", levels)), function(lv) {
    q <- qnorm((1 + lv) / 2)
    lapply(setNames(seq_len(np), pn), function(k) {
      lo <- bound(k, -q); up <- bound(k, q)
      list(lower = lo$value, upper = up$value, lower_at_limit = lo$at_limit, upper_at_limit = up$at_limit)
    })
  })
  list(method = "root-finding on the Laplace profile (lme4:::devfun2), optimum refined",
       optimum = as.list(phat), deviance = dmin, logLik = -dmin / 2, optimum_from = best$from,
       lme4_deviance = attr(dd, "basedev"), intervals = out,
       evaluations = nev, seconds = proc.time()[["elapsed"]] - t0)
}
