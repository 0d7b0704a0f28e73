/*
 * Optional C kernel of DetectorTable.update (rapidmq_edge/intelligence/stream_detector.py,
 * issue 13): the per-reading update of StreamDetector for many interleaved streams.
 *
 * It computes, bit for bit, what StreamDetector.update computes: the same IEEE double
 * operations in the same order, libm log/exp/pow/fmod as Python's math module and float
 * operators, Python's float % (sign of the divisor) and round() (half to even, here
 * nearbyint in the default rounding mode), built with -ffp-contract=off (no fused
 * multiply-add) and without -ffast-math. tests/test_stream_detector.py checks it against
 * the Python detector on synthetic streams and a NAB file.
 *
 *   configure(Verdict, KINDS, param_names)   (once, from stream_detector.py)
 *   Kernel(params: tuple)                    (DetectorParams as a tuple, field order)
 *   Kernel.update(dets: dict, keys, ts, xs) -> list[Verdict]
 *     one verdict per reading, in order; dets maps a key to its State (created here on
 *     the key's first reading; DetectorTable.forget pops it).
 *
 * Without a compiler the package uses StreamDetector (same verdicts, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "_detectorstep.c must not be built with -ffast-math (results must equal Python's)"
#endif

#define DAY 86400.0
#define WEEK (7 * DAY)
#define NCH 5 /* value channels (Bonferroni factor) */
#define NKIND 6

/* DetectorParams' fields, in order: configure() refuses any other list */
static const char *const PARAM_NAMES[] = {
    "warmup", "day_knots", "week_knots", "a_level", "a_offset", "a_season", "a_err",
    "season_gain", "a_scale", "a_smooth", "a_short", "clip", "ev_z", "a_rate",
    "a_rate_long", "stuck_factor", "stuck_min", "q", "eta_q", "a_excess", "xi_max",
    "p_open", "p_calm", "calm_readings", "reopen", "reopen_after", "gap", "p_single",
    "ref_clip", "level_clip", "rate_window", "rate_floor", "young_after", "a_burst",
    "burst_min", "burst_clip", "p_burst", "young_z", "young_k",
    "young_light", "young_g", "young_from", "reopen_new", "young_hold", "hold_readings",
    "young_range",
};
#define NPARAM ((int)(sizeof PARAM_NAMES / sizeof PARAM_NAMES[0]))

typedef struct {
    double warmup, day_knots, week_knots, a_level, a_offset, a_season, a_err, season_gain,
        a_scale, a_smooth, a_short, clip, ev_z, a_rate, a_rate_long, stuck_factor,
        stuck_min, q, eta_q, a_excess, xi_max, p_open, p_calm, calm_readings, reopen,
        reopen_after, gap, p_single, ref_clip, level_clip, rate_window, rate_floor,
        young_after, a_burst, burst_min, burst_clip, p_burst, young_z, young_k,
        young_light, young_g, young_from, reopen_new, young_hold,
        hold_readings, young_range;
    int window;         /* rate_window as an int, 1..64 */
    uint64_t wmask;     /* its bit mask */
} params_t;

typedef struct {
    double u, m1, m2;
    long long n;
} tail_t;

/* StreamDetector's state, field for field */
typedef struct {
    PyObject_HEAD
    long long n;
    double t0, last_t, last_x, log_step, res, level;
    double err[3], off[2];
    int model;
    double scale1, scale2, ref, g, shortv;
    long long run;
    double run_max;
    uint64_t bits;
    double rate_long, burst;
    tail_t tails[4];
    int in_episode;
    long long calm, ep_len;
    double ep_p, prev_p;
    double zmax;
    int was_burst, was_light, lvl_on;
    double hi, lo; /* largest and smallest value since young_from */
    Py_ssize_t nk[2];
    double *knots[2];
} det_t;

typedef struct {
    PyObject_HEAD
    params_t p;
} kernel_t;

typedef struct {
    PyObject *verdict;     /* stream_detector.Verdict */
    PyObject *kinds[NKIND];
    PyObject *none;        /* "none" */
    PyTypeObject *state_type, *kernel_type;
    int ready;
} mod_state;

static struct PyModuleDef ds_module;

static inline mod_state *
get_state(PyObject *mod)
{
    return (mod_state *)PyModule_GetState(mod);
}

/* ------------------------------------------------------------------ Python semantics */

/* Python's float % for a positive divisor (float_rem) */
static inline double
py_mod(double vx, double wx)
{
    double mod = fmod(vx, wx);
    if (mod) {
        if ((wx < 0) != (mod < 0))
            mod += wx;
    }
    else {
        mod = copysign(0.0, wx);
    }
    return mod;
}

/* Python's max(a, b) / min(a, b) on floats: the first unless the second is larger /
 * smaller */
static inline double
py_max(double a, double b)
{
    return b > a ? b : a;
}

static inline double
py_min(double a, double b)
{
    return b < a ? b : a;
}

static inline double
clip_f(double v, double lim)
{
    return v < -lim ? -lim : v > lim ? lim : v;
}

/* ------------------------------------------------------------------ the detector */

static double
tail_p(const tail_t *tl, double z, const params_t *p)
{
    double u = tl->u, m = tl->m1;
    if (z <= u)
        return 1.0;
    if (m <= 0.0)
        return 1.0 - p->q;
    double v = tl->m2 - m * m;
    double xi = v > 0.0 ? 0.5 * (1.0 - m * m / v) : 0.0;
    xi = xi < 0.0 ? 0.0 : xi > p->xi_max ? p->xi_max : xi;
    double sig = m * (1.0 - xi);
    if (xi < 1e-6)
        return (1.0 - p->q) * exp(-(z - u) / sig);
    return (1.0 - p->q) * pow(1.0 + xi * (z - u) / sig, -1.0 / xi);
}

static void
tail_learn(tail_t *tl, double z, const params_t *p)
{
    tl->n += 1;
    double step = p->eta_q * 0.1 * (1.0 + tl->u);
    if (z > tl->u) {
        double y = z - tl->u;
        double a = py_max(p->a_excess, 1.0 / (double)tl->n);
        tl->m1 += a * (y - tl->m1);
        tl->m2 += a * (y * y - tl->m2);
        tl->u += step * p->q;
    }
    else {
        tl->u -= step * (1.0 - p->q);
    }
}

static double
binom_sf(int k, int w, double pi)
{
    double q1 = 1.0 - pi;
    double r = pi / q1;
    double term = pow(q1, (double)w);
    double tot = 0.0;
    for (int j = 1; j <= w; j++) {
        term = term * (double)(w - j + 1) / (double)j * r;
        if (j >= k)
            tot += term;
    }
    return tot;
}

typedef struct {
    double v, w;
    Py_ssize_t i0, i1;
} prof_t;

static prof_t
profile(const det_t *s, int k, double t)
{
    prof_t o;
    const double *kn = s->knots[k];
    Py_ssize_t b = s->nk[k];
    double period = k == 0 ? DAY : WEEK;
    double f = py_mod(t, period) / period * (double)b;
    Py_ssize_t i0 = (Py_ssize_t)f;
    o.w = f - (double)i0;
    i0 %= b;
    Py_ssize_t i1 = (i0 + 1) % b;
    double k0 = kn[i0], k1 = kn[i1];
    if (k0 != k0)
        k0 = k1;
    else if (k1 != k1)
        k1 = k0;
    o.v = (1.0 - o.w) * k0 + o.w * k1;
    o.i0 = i0;
    o.i1 = i1;
    return o;
}

typedef struct {
    double score, lik, expected, lo, hi;
    int opens, in_episode, kind; /* kind: index into KINDS, -1 = "none" */
} out_t;

/* StreamDetector.update, operation for operation; -1 (MemoryError set) or 0 */
static int
det_update(det_t *s, const params_t *p, double t, double x, out_t *o)
{
    if (!(isfinite(t) && isfinite(x))) {
        double lv = s->level;
        *o = (out_t){0.0, 0.0, lv, lv, lv, 0, s->in_episode, -1};
        return 0;
    }
    long long n = s->n;
    if (n == 0) {
        s->n = 1;
        s->t0 = s->last_t = t;
        s->last_x = s->level = s->ref = x;
        *o = (out_t){0.0, 0.0, x, x, x, 0, 0, -1};
        return 0;
    }
    const double nd = (double)n;
    double dt = t - s->last_t;
    if (dt < 1e-6)
        dt = 1e-6;
    double lr = 0.0;
    if (n == 1) {
        s->log_step = log(dt);
    }
    else {
        lr = s->log_step - log(dt);
        lr = lr < -p->burst_clip ? -p->burst_clip : lr > p->burst_clip ? p->burst_clip : lr;
        double e = -lr;
        s->log_step += 0.05 * (e < -0.5 ? -0.5 : e > 0.5 ? 0.5 : e);
    }
    int gap = n >= 2 && dt > p->gap * exp(s->log_step);
    double d = x - s->last_x;
    if (d != 0.0 && fabs(d) < s->res)
        s->res = fabs(d);
    if (n == 20) { /* size the profiles once the sampling step is known */
        double step = exp(s->log_step);
        for (int k = 0; k < 2; k++) {
            double period = k == 0 ? DAY : WEEK, cap = k == 0 ? p->day_knots : p->week_knots;
            double r = nearbyint(period / step);
            double v = r < cap ? r : cap; /* min(cap, round(...)) */
            v = v > 8 ? v : 8;            /* max(8, ...) */
            Py_ssize_t b = (Py_ssize_t)v;
            double *kn = PyMem_Malloc(sizeof(double) * (size_t)(b > 0 ? b : 1));
            if (kn == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            for (Py_ssize_t i = 0; i < b; i++)
                kn[i] = NAN;
            PyMem_Free(s->knots[k]);
            s->knots[k] = kn;
            s->nk[k] = b;
            s->off[k] = s->level;
        }
    }
    const int seasonal = s->nk[0] > 0;
    double preds[3] = {s->level, s->level, s->level};
    prof_t prof[2] = {{NAN, 0.0, 0, 0}, {NAN, 0.0, 0, 0}};
    if (seasonal) {
        for (int k = 0; k < 2; k++) {
            prof[k] = profile(s, k, t);
            if (prof[k].v == prof[k].v)
                preds[k + 1] = s->off[k] + prof[k].v;
        }
    }
    const int m = s->model;
    const double xhat = preds[m];
    /* --- statistics, from the state before this reading */
    double dprof = 0.0;
    if (m > 0) {
        dprof = prof[m - 1].v - profile(s, m - 1, s->last_t).v;
        if (dprof != dprof)
            dprof = 0.0;
    }
    const double e1 = gap ? 0.0 : x - s->ref - dprof;
    double floor_ = py_max(s->res < INFINITY ? s->res * 0.5 : 0.0, 1e-9 * fabs(s->level));
    floor_ = py_max(floor_, 1e-12);
    const double s1 = py_max(s->scale1, floor_);
    const double z1 = fabs(e1) / s1;
    const double r = x - xhat;
    const double s2 = py_max(s->scale2, floor_);
    const double lim2 = p->level_clip * s2;
    const double g = s->g + p->a_smooth * ((r < -lim2 ? -lim2 : r > lim2 ? lim2 : r) - s->g);
    const double z2 = fabs(g) / s2;
    const double shortv = s->shortv + p->a_short * (py_min(fabs(e1), p->clip * s1) - s->shortv);
    const double z3 = fabs(log((shortv + floor_) / (s1 + floor_)));
    const long long run = d == 0.0 && !gap ? s->run + 1 : 0;
    const int big = fabs(e1) > p->ev_z * py_max(py_max(s->scale1, s->shortv),
                                                   1e-12 * fabs(s->level));
    const uint64_t bits = ((s->bits << 1) | (uint64_t)big) & p->wmask;
    double p5 = 1.0;
    if (big) {
        int kb = __builtin_popcountll(bits);
        double pi = py_max(s->rate_long, p->rate_floor);
        if (kb >= 2 && pi < 0.5)
            p5 = binom_sf(kb, p->window, pi);
    }
    const double burst = s->burst + p->a_burst * (lr - s->burst);
    tail_t *tails = s->tails;
    const int stuck = (double)run >= py_max(p->stuck_min, p->stuck_factor * s->run_max);
    double ps[NCH] = {tail_p(&tails[0], z1, p), tail_p(&tails[1], z2, p),
                      tail_p(&tails[2], z3, p), stuck ? 1e-9 : 1.0, p5};
    int imin = 0;
    for (int j = 1; j < NCH; j++)
        if (ps[j] < ps[imin])
            imin = j;
    const double pmin = ps[imin];
    const double pval = py_min(1.0, pmin * NCH);
    const double pb = n > 2 && burst > p->burst_min ? tail_p(&tails[3], burst, p) : 1.0;
    const int is_burst = pb < p->p_burst;
    /* |x - expected| / scale; while the level test is on (the expected value may hold a
     * shifted level), the change from the previous reading / (sqrt 2 x that scale) */
    const double zr = s->lvl_on ? (gap ? 0.0 : fabs(d) / (1.4142135623730951 * s2))
                                : fabs(r) / s2;
    int opens = 0;
    int light = 0; /* 1: opened by the light-tail residual test, 2: by its level test */
    int light_ok = 0; /* a young stream with light-tailed residuals so far */
    double pl = 1.0;  /* their p-value under a Gaussian model, on the likelihood scale */
    int lkind = 0;    /* which of the two gives it (1 or 2) */
    if (nd >= p->young_after) {
        const int mature = nd >= p->warmup;
        const int young_stuck = !mature && stuck && (double)run >= 2 * p->stuck_min &&
                                s->run_max <= 2.0;
        if (!mature && s->zmax <= p->young_light && s->hi - s->lo <= p->young_range * s2) {
            light_ok = 1;
            if (0.0 < p->young_z && p->young_z < zr && zr > p->young_k * s->zmax)
                light = 1;
            else if (0.0 < p->young_g && p->young_g < z2)
                light = 2;
            if (p->young_z > 0.0) {
                const double e = -(zr * zr - p->young_z * p->young_z) / M_PI;
                pl = e > 50.0 ? 1.0 : py_min(1.0, p->p_open * exp(e));
                lkind = 1;
            }
            if (p->young_g > 0.0) {
                const double e = -(z2 * z2 - p->young_g * p->young_g) * (2.0 - p->a_smooth) /
                                 (M_PI * p->a_smooth);
                const double p2 = e > 50.0 ? 1.0 : py_min(1.0, p->p_open * exp(e));
                if (p2 < pl) {
                    pl = p2;
                    lkind = 2;
                }
            }
            if (light)
                lkind = light; /* the test over its bar names the kind */
        }
        if (s->in_episode) {
            s->ep_len += 1;
            if ((double)s->ep_len > p->reopen_after &&
                ((mature && pval < p->p_open * p->reopen && pval < s->ep_p * p->reopen) ||
                 (p->reopen_new != 0.0 &&
                  ((light == 1 && s->was_light != 1) || (light == 2 && !s->lvl_on) ||
                   (is_burst && !s->was_burst) ||
                   (young_stuck && (double)run == 2 * p->stuck_min))))) {
                opens = 1;
                s->calm = s->ep_len = 0;
                s->ep_p = pval;
            }
            else if (pval < p->p_calm || is_burst) {
                s->calm = 0;
            }
            else {
                s->calm += 1;
                if ((double)s->calm >= p->calm_readings)
                    s->in_episode = 0;
            }
        }
        else if (is_burst || light ||
                 (mature ? pval < p->p_open && (pval < p->p_single || s->prev_p < p->p_open)
                         : young_stuck)) {
            opens = s->in_episode = 1;
            s->calm = s->ep_len = 0;
            s->ep_p = pval;
        }
    }
    /* --- learn */
    if (nd >= p->young_from && nd < p->warmup && !s->in_episode && s->zmax < zr &&
        zr <= p->young_z)
        s->zmax = zr;
    s->was_burst = is_burst;
    if (nd >= p->young_from) {
        s->hi = py_max(s->hi, x);
        s->lo = py_min(s->lo, x);
    }
    s->was_light = light;
    s->lvl_on = z2 > p->young_g * (s->lvl_on ? 0.5 : 1.0);
    /* while a young light-tailed stream's level test is on, its level and level scale
     * hold, for at most hold_readings into the episode */
    const int hold = p->young_hold != 0.0 && light_ok && s->lvl_on &&
                     (double)s->ep_len <= p->hold_readings;
    s->prev_p = pval;
    tail_learn(&tails[0], z1, p);
    tail_learn(&tails[1], z2, p);
    tail_learn(&tails[2], z3, p);
    if (n > 2 && !is_burst) /* a burst does not teach the burst tail */
        tail_learn(&tails[3], burst, p);
    s->burst = burst;
    s->bits = bits;
    s->rate_long += py_max(p->a_rate_long, 1.0 / nd) * ((big ? 1.0 : 0.0) - s->rate_long);
    if (n == 1) {
        s->scale1 = fabs(e1);
        s->scale2 = fabs(r);
    }
    else {
        double a = py_max(p->a_scale, 1.0 / nd);
        if (!gap)
            s->scale1 += a * (py_min(fabs(e1), p->clip * s1) - s->scale1);
        if (!hold)
            s->scale2 += a * (py_min(fabs(r), p->clip * s2) - s->scale2);
    }
    s->g = g;
    s->shortv = shortv;
    if (run == 0 && s->run > 0)
        s->run_max = py_max(s->run_max * 0.999, (double)s->run);
    s->run = run;
    const double lr2 = p->ref_clip * s2;
    s->ref = xhat + (r < -lr2 ? -lr2 : r > lr2 ? lr2 : r);
    const double lim = p->clip * s2;
    const double age = t - s->t0;
    const double ae = p->a_err > 1.0 / nd ? p->a_err : 1.0 / nd;
    double *err = s->err;
    for (int j = 0; j < 3; j++) {
        if (j && age < 1.25 * (j == 1 ? DAY : WEEK))
            err[j] = err[0];
        else
            err[j] += ae * (py_min(fabs(x - preds[j]), lim) - err[j]);
    }
    const double rl = x - s->level;
    if (!hold)
        s->level += py_max(p->a_level, 1.0 / nd) * clip_f(rl, lim);
    if (seasonal) {
        for (int k = 0; k < 2; k++) {
            const prof_t pk = prof[k];
            double *kn = s->knots[k];
            Py_ssize_t near_ = pk.w < 0.5 ? pk.i0 : pk.i1;
            if (kn[near_] != kn[near_])
                kn[near_] = x - s->off[k];
            if (pk.v != pk.v)
                continue;
            double klim = p->clip * py_max(err[k + 1], floor_);
            double rk = x - s->off[k] - pk.v;
            rk = rk < -klim ? -klim : rk > klim ? klim : rk;
            s->off[k] += p->a_offset * rk;
            kn[pk.i0] += p->a_season * (1.0 - pk.w) * rk;
            kn[pk.i1] += p->a_season * pk.w * rk;
        }
        int best = 0;
        if (err[1] < p->season_gain * err[0])
            best = 1;
        if (err[2] < p->season_gain * err[best])
            best = 2;
        s->model = best;
    }
    s->n = n + 1;
    s->last_t = t;
    s->last_x = x;
    const double pbs = pb * (p->p_open / p->p_burst);
    const int untailed = light_ok || nd < p->young_after;
    double pv_like = untailed ? (stuck ? 1e-9 * NCH : 1.0) : pval;
    if (light_ok && !stuck && run > 0)
        /* a Gaussian stream repeats a value at its resolution with probability about
         * res / (sd of a one-step change x sqrt(2 pi)), that sd = sqrt(pi / 2) x s1 */
        pv_like = pow(py_min(1.0, s->res / (s1 * M_PI)), (double)run);
    const double pv_all = py_min(py_min(pv_like, pbs), pl);
    const double lik = 1.0 - pv_all;
    int kind;
    if (pv_all >= 0.5)
        kind = opens && light ? light - 1 : -1; /* spike or level_shift */
    else if (pv_all < pv_like)
        kind = pbs <= pl ? 5 : lkind - 1;
    else
        kind = untailed ? 3 : imin;
    const double band = 4.0 * s2;
    o->score = opens ? 0.5 + 0.5 * lik : 0.49 * lik;
    o->lik = lik;
    o->opens = opens;
    o->in_episode = s->in_episode;
    o->kind = kind;
    o->expected = xhat;
    o->lo = xhat - band;
    o->hi = xhat + band;
    return 0;
}

/* ------------------------------------------------------------------ State */

static void
det_init(det_t *s)
{
    /* StreamDetector.__init__ */
    s->n = 0;
    s->t0 = s->last_t = s->last_x = s->log_step = 0.0;
    s->res = INFINITY;
    s->level = 0.0;
    memset(s->err, 0, sizeof s->err);
    memset(s->off, 0, sizeof s->off);
    s->model = 0;
    s->scale1 = s->scale2 = s->ref = s->g = s->shortv = 0.0;
    s->run = 0;
    s->run_max = 0.0;
    s->bits = 0;
    s->rate_long = s->burst = 0.0;
    memset(s->tails, 0, sizeof s->tails);
    s->in_episode = 0;
    s->calm = s->ep_len = 0;
    s->ep_p = s->prev_p = 1.0;
    s->zmax = 0.0;
    s->was_burst = s->was_light = s->lvl_on = 0;
    s->hi = -INFINITY;
    s->lo = INFINITY;
    s->nk[0] = s->nk[1] = 0;
    s->knots[0] = s->knots[1] = NULL;
}

static void
state_dealloc(PyObject *self)
{
    det_t *s = (det_t *)self;
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(s->knots[0]);
    PyMem_Free(s->knots[1]);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *
state_get_n(PyObject *self, void *closure)
{
    return PyLong_FromLongLong(((det_t *)self)->n);
}

static PyObject *
state_get_in_episode(PyObject *self, void *closure)
{
    return PyBool_FromLong(((det_t *)self)->in_episode);
}

static PyGetSetDef state_getset[] = {
    {"n", state_get_n, NULL, "readings seen", NULL},
    {"in_episode", state_get_in_episode, NULL, "an episode is open", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot state_slots[] = {
    {Py_tp_dealloc, state_dealloc},
    {Py_tp_getset, state_getset},
    {Py_tp_doc, "One stream's detector state (StreamDetector's, in C)."},
    {0, NULL},
};

static PyType_Spec state_spec = {
    "rapidmq_edge.intelligence._detectorstep.State", sizeof(det_t), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, state_slots,
};

/* ------------------------------------------------------------------ Kernel */

static mod_state *
kernel_mod_state(PyObject *self)
{
    PyObject *mod = PyType_GetModuleByDef(Py_TYPE(self), &ds_module);
    return mod == NULL ? NULL : get_state(mod);
}

static PyObject *
kernel_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *tup;
    if (!PyArg_ParseTuple(args, "O!:Kernel", &PyTuple_Type, &tup))
        return NULL;
    if (PyTuple_GET_SIZE(tup) != NPARAM) {
        PyErr_Format(PyExc_TypeError, "Kernel(params): a tuple of %d numbers", NPARAM);
        return NULL;
    }
    double v[NPARAM];
    for (int i = 0; i < NPARAM; i++) {
        v[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(tup, i));
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    PyObject *w = PyTuple_GET_ITEM(tup, 30); /* rate_window: an int 1..64 */
    long win = PyLong_Check(w) ? PyLong_AsLong(w) : 0;
    if (win == -1 && PyErr_Occurred())
        return NULL;
    if (win < 1 || win > 64) {
        PyErr_SetString(PyExc_ValueError, "rate_window must be an int from 1 to 64");
        return NULL;
    }
    kernel_t *self = (kernel_t *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    params_t *p = &self->p;
    double *f[NPARAM] = {
        &p->warmup, &p->day_knots, &p->week_knots, &p->a_level, &p->a_offset,
        &p->a_season, &p->a_err, &p->season_gain, &p->a_scale, &p->a_smooth,
        &p->a_short, &p->clip, &p->ev_z, &p->a_rate, &p->a_rate_long,
        &p->stuck_factor, &p->stuck_min, &p->q, &p->eta_q, &p->a_excess,
        &p->xi_max, &p->p_open, &p->p_calm, &p->calm_readings, &p->reopen,
        &p->reopen_after, &p->gap, &p->p_single, &p->ref_clip, &p->level_clip,
        &p->rate_window, &p->rate_floor, &p->young_after, &p->a_burst,
        &p->burst_min, &p->burst_clip, &p->p_burst, &p->young_z, &p->young_k,
        &p->young_light, &p->young_g, &p->young_from, &p->reopen_new,
        &p->young_hold, &p->hold_readings,
        &p->young_range,
    };
    for (int i = 0; i < NPARAM; i++)
        *f[i] = v[i];
    p->window = (int)win;
    p->wmask = win == 64 ? ~(uint64_t)0 : (((uint64_t)1 << win) - 1);
    return (PyObject *)self;
}

static void
kernel_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* float(o) as Python computes it; -1 with an exception set on error */
static inline int
as_double(PyObject *o, double *out)
{
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 0;
    }
    PyObject *f = PyNumber_Float(o);
    if (f == NULL)
        return -1;
    *out = PyFloat_AS_DOUBLE(f);
    Py_DECREF(f);
    return 0;
}

static PyObject *
make_verdict(mod_state *ms, const out_t *o)
{
    PyObject *a[8];
    a[0] = PyFloat_FromDouble(o->score);
    a[1] = PyFloat_FromDouble(o->lik);
    a[2] = o->opens ? Py_True : Py_False;
    a[3] = o->in_episode ? Py_True : Py_False;
    a[4] = o->kind < 0 ? ms->none : ms->kinds[o->kind];
    a[5] = PyFloat_FromDouble(o->expected);
    a[6] = PyFloat_FromDouble(o->lo);
    a[7] = PyFloat_FromDouble(o->hi);
    PyObject *v = NULL;
    if (a[0] && a[1] && a[5] && a[6] && a[7])
        v = PyObject_Vectorcall(ms->verdict, a, 8, NULL);
    Py_XDECREF(a[0]);
    Py_XDECREF(a[1]);
    Py_XDECREF(a[5]);
    Py_XDECREF(a[6]);
    Py_XDECREF(a[7]);
    return v;
}

/* one reading (strong references held by the caller): its verdict into out[i]; 0 or -1 */
static int
step_one(mod_state *ms, const params_t *p, PyObject *dets, PyObject *k, PyObject *tv,
         PyObject *xv, PyObject *out, Py_ssize_t i)
{
    PyObject *st = PyDict_GetItemWithError(dets, k); /* borrowed */
    if (st == NULL) {
        if (PyErr_Occurred())
            return -1;
        st = ms->state_type->tp_alloc(ms->state_type, 0);
        if (st == NULL)
            return -1;
        det_init((det_t *)st);
        int rc = PyDict_SetItem(dets, k, st);
        if (rc < 0) {
            Py_DECREF(st);
            return -1;
        }
    }
    else if (Py_TYPE(st) != ms->state_type) {
        PyErr_SetString(PyExc_TypeError, "dets holds a value that is not a State");
        return -1;
    }
    else {
        Py_INCREF(st); /* float() below may run Python code that drops it from dets */
    }
    double t = 0.0, x = 0.0;
    out_t o;
    int rc = as_double(tv, &t);
    if (rc == 0)
        rc = as_double(xv, &x);
    if (rc == 0)
        rc = det_update((det_t *)st, p, t, x, &o);
    Py_DECREF(st);
    if (rc < 0)
        return -1;
    PyObject *v = make_verdict(ms, &o);
    if (v == NULL)
        return -1;
    PyList_SET_ITEM(out, i, v);
    return 0;
}

static PyObject *
kernel_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    mod_state *ms = kernel_mod_state(self);
    if (ms == NULL)
        return NULL;
    if (!ms->ready) {
        PyErr_SetString(PyExc_RuntimeError, "_detectorstep.configure() was not called");
        return NULL;
    }
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "update(dets, keys, ts, xs) takes 4 arguments");
        return NULL;
    }
    PyObject *dets = args[0];
    if (!PyDict_Check(dets)) {
        PyErr_SetString(PyExc_TypeError, "dets must be a dict");
        return NULL;
    }
    const params_t *p = &((kernel_t *)self)->p;
    PyObject *seqs[3] = {NULL, NULL, NULL}, *out = NULL;
    static const char *const what[3] = {"keys must be a sequence", "ts must be a sequence",
                                        "xs must be a sequence"};
    for (int j = 0; j < 3; j++) {
        seqs[j] = PySequence_Fast(args[1 + j], what[j]);
        if (seqs[j] == NULL)
            goto done;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seqs[0]);
    if (PySequence_Fast_GET_SIZE(seqs[1]) != len || PySequence_Fast_GET_SIZE(seqs[2]) != len) {
        PyErr_SetString(PyExc_ValueError, "keys, ts and xs must have the same length");
        goto done;
    }
    out = PyList_New(len);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < len; i++) {
        /* lengths re-read every step: a list may change while Python code runs (a key's
         * __eq__, a value's __float__) */
        if (i >= PySequence_Fast_GET_SIZE(seqs[0]) || i >= PySequence_Fast_GET_SIZE(seqs[1]) ||
            i >= PySequence_Fast_GET_SIZE(seqs[2])) {
            PyErr_SetString(PyExc_RuntimeError, "keys, ts or xs changed size during update");
            goto fail;
        }
        PyObject *k = Py_NewRef(PySequence_Fast_GET_ITEM(seqs[0], i));
        PyObject *tv = Py_NewRef(PySequence_Fast_GET_ITEM(seqs[1], i));
        PyObject *xv = Py_NewRef(PySequence_Fast_GET_ITEM(seqs[2], i));
        int rc = step_one(ms, p, dets, k, tv, xv, out, i);
        Py_DECREF(k);
        Py_DECREF(tv);
        Py_DECREF(xv);
        if (rc < 0)
            goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    for (int j = 0; j < 3; j++)
        Py_XDECREF(seqs[j]);
    return out;
}

static PyMethodDef kernel_methods[] = {
    {"update", (PyCFunction)(void (*)(void))kernel_update, METH_FASTCALL,
     "update(dets, keys, ts, xs) -> list[Verdict]: DetectorTable.update in C"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot kernel_slots[] = {
    {Py_tp_new, kernel_new},
    {Py_tp_dealloc, kernel_dealloc},
    {Py_tp_methods, kernel_methods},
    {Py_tp_doc, "Kernel(params: tuple): the detector update for one DetectorParams."},
    {0, NULL},
};

static PyType_Spec kernel_spec = {
    "rapidmq_edge.intelligence._detectorstep.Kernel", sizeof(kernel_t), 0,
    Py_TPFLAGS_DEFAULT, kernel_slots,
};

/* ------------------------------------------------------------------ module */

static PyObject *
ds_configure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    mod_state *ms = get_state(mod);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "configure(Verdict, KINDS, param_names)");
        return NULL;
    }
    if (!PyCallable_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "Verdict must be callable");
        return NULL;
    }
    PyObject *kinds = args[1], *names = args[2];
    if (!PyTuple_Check(kinds) || PyTuple_GET_SIZE(kinds) != NKIND) {
        PyErr_Format(PyExc_TypeError, "KINDS must be a tuple of %d str", NKIND);
        return NULL;
    }
    for (int i = 0; i < NKIND; i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(kinds, i))) {
            PyErr_Format(PyExc_TypeError, "KINDS must be a tuple of %d str", NKIND);
            return NULL;
        }
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != NPARAM) {
        PyErr_Format(PyExc_ValueError, "DetectorParams must have the %d fields this kernel "
                     "was written for", NPARAM);
        return NULL;
    }
    for (int i = 0; i < NPARAM; i++) {
        PyObject *nm = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(nm) || PyUnicode_CompareWithASCIIString(nm, PARAM_NAMES[i])) {
            PyErr_Format(PyExc_ValueError, "DetectorParams field %d is not %s", i,
                         PARAM_NAMES[i]);
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    Py_XSETREF(ms->verdict, args[0]);
    for (int i = 0; i < NKIND; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        Py_INCREF(k);
        Py_XSETREF(ms->kinds[i], k);
    }
    ms->ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef ds_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))ds_configure, METH_FASTCALL,
     "configure(Verdict, KINDS, param_names): stream_detector.py's verdict class, kinds and "
     "DetectorParams field names (checked against this kernel's)"},
    {NULL, NULL, 0, NULL},
};

static int
ds_exec(PyObject *mod)
{
    mod_state *ms = get_state(mod);
    ms->none = PyUnicode_InternFromString("none");
    if (ms->none == NULL)
        return -1;
    ms->state_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &state_spec, NULL);
    if (ms->state_type == NULL)
        return -1;
    ms->kernel_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &kernel_spec, NULL);
    if (ms->kernel_type == NULL)
        return -1;
    if (PyModule_AddType(mod, ms->state_type) < 0 || PyModule_AddType(mod, ms->kernel_type) < 0)
        return -1;
    return 0;
}

static int
ds_traverse(PyObject *mod, visitproc visit, void *arg)
{
    mod_state *ms = get_state(mod);
    Py_VISIT(ms->verdict);
    for (int i = 0; i < NKIND; i++)
        Py_VISIT(ms->kinds[i]);
    Py_VISIT(ms->state_type);
    Py_VISIT(ms->kernel_type);
    return 0;
}

static int
ds_clear(PyObject *mod)
{
    mod_state *ms = get_state(mod);
    Py_CLEAR(ms->verdict);
    for (int i = 0; i < NKIND; i++)
        Py_CLEAR(ms->kinds[i]);
    Py_CLEAR(ms->none);
    Py_CLEAR(ms->state_type);
    Py_CLEAR(ms->kernel_type);
    ms->ready = 0;
    return 0;
}

static void
ds_free(void *mod)
{
    ds_clear((PyObject *)mod);
}

static PyModuleDef_Slot ds_slots[] = {
    {Py_mod_exec, ds_exec},
    {0, NULL},
};

static struct PyModuleDef ds_module = {
    PyModuleDef_HEAD_INIT, "_detectorstep",
    "Optional C kernel of DetectorTable.update (the per-stream anomaly detector).",
    sizeof(mod_state), ds_methods, ds_slots, ds_traverse, ds_clear, ds_free,
};

PyMODINIT_FUNC
PyInit__detectorstep(void)
{
    return PyModuleDef_Init(&ds_module);
}
