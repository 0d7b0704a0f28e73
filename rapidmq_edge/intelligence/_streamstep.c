/*
 * Optional C kernel for the steady-stream fast path of StreamTable.update_outside
 * (rapidmq_edge/intelligence/streams.py, issue 6).
 *
 * It computes, bit for bit, what the Python loop computes: the same IEEE double operations
 * in the same order, libm log/exp/sqrt/fabs as Python's math module, built with
 * -ffp-contract=off (no fused multiply-add) and without -ffast-math. Only a steady, live
 * stream whose state and reading are plain floats is computed here; every other reading
 * (a new, warming or gapped stream) goes through the Python `_scalar_step`, and the box
 * test of its row through `Box.__contains__`, exactly as the Python loop does.
 *
 *   configure(constants: tuple[float, ...13], scalar_step, zero)   (once, from streams.py)
 *   update_outside(table, keys, ts, xs, box, pos, rows) -> None | int
 *     folds readings into `table` and appends to `pos` / `rows` like the Python loop; None
 *     when every reading was handled, else the index of the first reading it left to the
 *     Python loop (a state or value that is not a plain float: the caller continues there).
 *
 * Without a compiler the package uses the Python loop (same results, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "_streamstep.c must not be built with -ffast-math (results must equal Python's)"
#endif

#define NSTATE 11
#define NROW 10
#define NCONST 13

typedef struct {
    int ready;
    double steady, reset_gap, log_eps, a_fast, a_slow, a_var, a_slope, a_dt, a_burst,
        clip_sigma, clip_dt_down, clip_dt_up, feature_clip;
    PyObject *scalar_step; /* streams._scalar_step(state, t, x) -> (row, new_state) */
    PyObject *zero;        /* streams._ZERO: the state of an unseen stream */
    PyObject *s_fast, *s_steady_in; /* interned "fast", "steady_in" (Box attributes) */
} ss_state;

static inline ss_state *
get_state(PyObject *mod)
{
    return (ss_state *)PyModule_GetState(mod);
}

static PyObject *
ss_configure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    ss_state *s = get_state(mod);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "configure(constants, scalar_step, zero)");
        return NULL;
    }
    PyObject *c = args[0];
    if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != NCONST) {
        PyErr_Format(PyExc_TypeError, "constants must be a tuple of %d floats", NCONST);
        return NULL;
    }
    if (!PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scalar_step must be callable");
        return NULL;
    }
    if (!PyList_CheckExact(args[2]) || PyList_GET_SIZE(args[2]) != NSTATE) {
        PyErr_Format(PyExc_TypeError, "zero must be a list of %d floats", NSTATE);
        return NULL;
    }
    double v[NCONST];
    for (int i = 0; i < NCONST; i++) {
        v[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(c, i)); /* an int: what Python's float
                                                            * arithmetic converts it to */
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    s->steady = v[0];
    s->reset_gap = v[1];
    s->log_eps = v[2];
    s->a_fast = v[3];
    s->a_slow = v[4];
    s->a_var = v[5];
    s->a_slope = v[6];
    s->a_dt = v[7];
    s->a_burst = v[8];
    s->clip_sigma = v[9];
    s->clip_dt_down = v[10];
    s->clip_dt_up = v[11];
    s->feature_clip = v[12];
    Py_INCREF(args[1]);
    Py_XSETREF(s->scalar_step, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(s->zero, args[2]);
    s->ready = 1;
    Py_RETURN_NONE;
}

/* item i of a list or tuple (borrowed), or NULL when the sequence is shorter (a list may
 * shrink while Python code runs: a key's __eq__, scalar_step, Box.__contains__) */
static inline PyObject *
seq_item(PyObject *seq, Py_ssize_t i)
{
    if (PyList_CheckExact(seq))
        return i < PyList_GET_SIZE(seq) ? PyList_GET_ITEM(seq, i) : NULL;
    return i < PyTuple_GET_SIZE(seq) ? PyTuple_GET_ITEM(seq, i) : NULL;
}

static inline double
clip_f(double z, double lim)
{
    return z > lim ? lim : z < -lim ? -lim : z;
}

/* a new list of n floats; NULL on error */
static PyObject *
float_list(const double *v, int n)
{
    PyObject *l = PyList_New(n);
    if (l == NULL)
        return NULL;
    for (int j = 0; j < n; j++) {
        PyObject *f = PyFloat_FromDouble(v[j]);
        if (f == NULL) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, j, f);
    }
    return l;
}

/* append i to pos and row to rows (row is not stolen); -1 on error */
static int
keep(PyObject *pos, PyObject *rows, Py_ssize_t i, PyObject *row)
{
    PyObject *pi = PyLong_FromSsize_t(i);
    if (pi == NULL)
        return -1;
    int rc = PyList_Append(pos, pi);
    Py_DECREF(pi);
    if (rc < 0)
        return -1;
    return PyList_Append(rows, row);
}

/* the general update of one reading through Python's _scalar_step, and the box test of its
 * row; 0 or -1 on error */
static int
slow_step(ss_state *s, PyObject *table, PyObject *k, PyObject *st, PyObject *t, PyObject *x,
          PyObject *box, PyObject *pos, PyObject *rows, Py_ssize_t i)
{
    PyObject *argv[3] = {st, t, x};
    PyObject *res = PyObject_Vectorcall(s->scalar_step, argv, 3, NULL);
    if (res == NULL)
        return -1;
    if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 2) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "scalar_step must return (row, state)");
        return -1;
    }
    PyObject *row = PyTuple_GET_ITEM(res, 0);
    int rc = PyDict_SetItem(table, k, PyTuple_GET_ITEM(res, 1));
    if (rc == 0) {
        int inside = box == Py_None ? 0 : PySequence_Contains(box, row);
        if (inside < 0)
            rc = -1;
        else if (!inside)
            rc = keep(pos, rows, i, row);
    }
    Py_DECREF(res);
    return rc;
}

/* the box's bounds within the clip limits for a steady row (Box.fast, Box.steady_in) */
typedef struct {
    int has_box, steady_in;
    double lo[8], hi[8];
} bounds_t;

/* the Python loop's fast path, operation for operation: a steady (n >= _STEADY) and live
 * (dt <= RESET_GAP * exp(log_dt_base)) stream; v is its state, (tv, xv) the reading */
static int
fast_step(const ss_state *s, const bounds_t *b, PyObject *table, PyObject *k,
          const double *v, PyObject *t, PyObject *x, double xv, double dt,
          PyObject *pos, PyObject *rows, Py_ssize_t i)
{
    const double n = v[0], n_dt = v[1], last_x = v[3], m_fast = v[4], m_slow = v[5],
                 var = v[6], slope = v[7], log_dt_base = v[8], burst = v[9], stuck = v[10];
    const double lf = s->feature_clip;
    const double log_dt_now = dt > 1e-6 ? log(dt) : s->log_eps;
    double floor_ = fabs(m_slow) * 1e-4;
    if (floor_ < 1e-9)
        floor_ = 1e-9;
    floor_ *= floor_;
    const double sig = sqrt(var > floor_ ? var : floor_);
    const double inv = 1.0 / sig;
    const double d = xv - last_x;
    const double stuck_new = d == 0.0 ? stuck + 1 : 0.0;
    const double rel_dt = log_dt_now - log_dt_base;
    const double burst_new = burst + s->a_burst * (rel_dt - burst);
    const double z1 = (xv - m_fast) * inv;
    const double z2 = (xv - m_slow) * inv;
    const double z3 = d * inv;
    const double z4 = (m_fast - m_slow) * inv;
    const double z5 = slope * inv;
    const double *lo = b->lo, *hi = b->hi;
    if (!b->has_box ||
        !(b->steady_in && lo[0] <= z1 && z1 <= hi[0] && lo[1] <= z2 && z2 <= hi[1] &&
          lo[2] <= z3 && z3 <= hi[2] && lo[3] <= z4 && z4 <= hi[3] && lo[4] <= z5 &&
          z5 <= hi[4] && lo[5] <= stuck_new && stuck_new <= hi[5] && lo[6] <= rel_dt &&
          rel_dt <= hi[6] && lo[7] <= burst_new && burst_new <= hi[7])) {
        const double r[NROW] = {
            1.0,
            clip_f(z1, lf),
            clip_f(z2, lf),
            clip_f(z3, lf),
            clip_f(z4, lf),
            clip_f(z5, lf),
            stuck_new > 20 ? 20.0 : stuck_new,
            rel_dt < -8.0 ? -8.0 : rel_dt > 8.0 ? 8.0 : rel_dt,
            burst_new < -8.0 ? -8.0 : burst_new > 8.0 ? 8.0 : burst_new,
            0.0,
        };
        PyObject *row = float_list(r, NROW);
        if (row == NULL)
            return -1;
        int rc = keep(pos, rows, i, row);
        Py_DECREF(row);
        if (rc < 0)
            return -1;
    }
    const double lim = s->clip_sigma * sig;
    const double nlim = -lim;
    double e = xv - m_fast;
    const double new_fast = m_fast + s->a_fast * (e < nlim ? nlim : e > lim ? lim : e);
    e = xv - m_slow;
    const double w = 1.0 / (n + 1);
    const double new_slow =
        m_slow + (w < s->a_slow ? s->a_slow : w) * (e < nlim ? nlim : e > lim ? lim : e);
    const double dc = d < nlim ? nlim : d > lim ? lim : d;
    e = rel_dt < -s->clip_dt_down ? -s->clip_dt_down
        : rel_dt > s->clip_dt_up  ? s->clip_dt_up
                                  : rel_dt;
    const double nv[NSTATE] = {
        n + 1,
        n_dt + 1,
        0.0, /* t, x: the reading's own objects, as the Python loop stores them */
        0.0,
        new_fast,
        new_slow,
        d != 0.0 ? var + s->a_var * (dc * dc / 2.0 - var) : var,
        slope + s->a_slope * (dc - slope),
        log_dt_base + s->a_dt * e,
        burst_new,
        stuck_new,
    };
    PyObject *ns = PyList_New(NSTATE);
    if (ns == NULL)
        return -1;
    for (int j = 0; j < NSTATE; j++) {
        PyObject *f = j == 2 ? Py_NewRef(t) : j == 3 ? Py_NewRef(x) : PyFloat_FromDouble(nv[j]);
        if (f == NULL) {
            Py_DECREF(ns); /* the slots not set yet are NULL: safe */
            return -1;
        }
        PyList_SET_ITEM(ns, j, f);
    }
    int rc = PyDict_SetItem(table, k, ns);
    Py_DECREF(ns);
    return rc;
}

/* one reading (k, t, x: strong references held by the caller): 0 done, -1 error, 1 left
 * to the Python loop (nothing changed) */
static int
step(ss_state *s, const bounds_t *b, PyObject *table, PyObject *box, PyObject *k,
     PyObject *t, PyObject *x, PyObject *pos, PyObject *rows, Py_ssize_t i)
{
    PyObject *st = PyDict_GetItemWithError(table, k);
    if (st == NULL) {
        if (PyErr_Occurred())
            return -1;
        return slow_step(s, table, k, s->zero, t, x, box, pos, rows, i);
    }
    if (!PyList_CheckExact(st) || PyList_GET_SIZE(st) != NSTATE)
        return 1;
    double v[NSTATE];
    for (int j = 0; j < NSTATE; j++) {
        PyObject *o = PyList_GET_ITEM(st, j);
        if (!PyFloat_CheckExact(o))
            return 1;
        v[j] = PyFloat_AS_DOUBLE(o);
    }
    int rc;
    Py_INCREF(st);
    if (!(v[0] >= s->steady)) {
        rc = slow_step(s, table, k, st, t, x, box, pos, rows, i);
    } else if (!PyFloat_CheckExact(t) || !PyFloat_CheckExact(x)) {
        rc = 1;
    } else {
        double dt = PyFloat_AS_DOUBLE(t) - v[2];
        if (dt < 1e-6)
            dt = 1e-6;
        const double eb = exp(v[8]);
        if (isinf(eb) && isfinite(v[8]))
            rc = 1; /* math.exp raises OverflowError: the Python loop raises it */
        else if (dt <= s->reset_gap * eb)
            rc = fast_step(s, b, table, k, v, t, x, PyFloat_AS_DOUBLE(x), dt, pos, rows, i);
        else
            rc = slow_step(s, table, k, st, t, x, box, pos, rows, i);
    }
    Py_DECREF(st);
    return rc;
}

/* b from box (None: no box); 0 or -1 on error */
static int
get_bounds(ss_state *s, PyObject *box, bounds_t *b)
{
    memset(b, 0, sizeof *b);
    if (box == Py_None)
        return 0;
    b->has_box = 1;
    PyObject *fast = PyObject_GetAttr(box, s->s_fast);
    if (fast == NULL)
        return -1;
    int rc = 0;
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != 16) {
        PyErr_SetString(PyExc_TypeError, "box.fast must be a tuple of 16 floats");
        rc = -1;
    }
    for (int j = 0; rc == 0 && j < 16; j++) {
        double v = PyFloat_AsDouble(PyTuple_GET_ITEM(fast, j));
        if (v == -1.0 && PyErr_Occurred())
            rc = -1;
        else if (j < 8)
            b->lo[j] = v;
        else
            b->hi[j - 8] = v;
    }
    Py_DECREF(fast);
    if (rc < 0)
        return -1;
    PyObject *si = PyObject_GetAttr(box, s->s_steady_in);
    if (si == NULL)
        return -1;
    b->steady_in = PyObject_IsTrue(si);
    Py_DECREF(si);
    return b->steady_in < 0 ? -1 : 0;
}

static PyObject *
ss_update_outside(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    ss_state *s = get_state(mod);
    if (!s->ready) {
        PyErr_SetString(PyExc_RuntimeError, "_streamstep.configure() was not called");
        return NULL;
    }
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "update_outside(table, keys, ts, xs, box, pos, rows) takes 7 arguments");
        return NULL;
    }
    PyObject *table = args[0], *box = args[4], *pos = args[5], *rows = args[6];
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "table must be a dict");
        return NULL;
    }
    if (!PyList_Check(pos) || !PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "pos and rows must be lists");
        return NULL;
    }
    bounds_t b;
    if (get_bounds(s, box, &b) < 0)
        return NULL;
    PyObject *seqs[3] = {NULL, NULL, NULL}, *result = NULL;
    static const char *const what[3] = {"keys must be a sequence", "ts must be a sequence",
                                        "xs must be a sequence"};
    int j;
    for (j = 0; j < 3; j++) {
        seqs[j] = PySequence_Fast(args[1 + j], what[j]);
        if (seqs[j] == NULL)
            break;
    }
    for (Py_ssize_t i = 0; j == 3; i++) {
        /* zip(keys, ts, xs, strict=True): lengths re-read every step, as zip's iterators
         * do (a list may change while Python code runs: __eq__, scalar_step, __contains__) */
        PyObject *k = seq_item(seqs[0], i), *t = seq_item(seqs[1], i), *x = seq_item(seqs[2], i);
        if (k == NULL || t == NULL || x == NULL) {
            if (k != NULL || t != NULL || x != NULL)
                PyErr_SetString(PyExc_ValueError, "keys, ts and xs must have the same length");
            else
                result = Py_NewRef(Py_None);
            break;
        }
        Py_INCREF(k);
        Py_INCREF(t);
        Py_INCREF(x);
        int rc = step(s, &b, table, box, k, t, x, pos, rows, i);
        Py_DECREF(k);
        Py_DECREF(t);
        Py_DECREF(x);
        if (rc < 0)
            break;
        if (rc > 0) {
            result = PyLong_FromSsize_t(i);
            break;
        }
    }
    for (j = 0; j < 3; j++)
        Py_XDECREF(seqs[j]);
    return result;
}

static PyMethodDef ss_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))ss_configure, METH_FASTCALL,
     "configure(constants, scalar_step, zero): streams.py's constants and general update"},
    {"update_outside", (PyCFunction)(void (*)(void))ss_update_outside, METH_FASTCALL,
     "update_outside(table, keys, ts, xs, box, pos, rows) -> None | int: "
     "StreamTable.update_outside with its steady fast path in C; an int is the index of "
     "the first reading left to the Python loop"},
    {NULL, NULL, 0, NULL},
};

static int
ss_exec(PyObject *mod)
{
    ss_state *s = get_state(mod);
    s->s_fast = PyUnicode_InternFromString("fast");
    s->s_steady_in = PyUnicode_InternFromString("steady_in");
    if (s->s_fast == NULL || s->s_steady_in == NULL)
        return -1;
    return 0;
}

static int
ss_traverse(PyObject *mod, visitproc visit, void *arg)
{
    ss_state *s = get_state(mod);
    Py_VISIT(s->scalar_step);
    Py_VISIT(s->zero);
    return 0;
}

static int
ss_clear(PyObject *mod)
{
    ss_state *s = get_state(mod);
    Py_CLEAR(s->scalar_step);
    Py_CLEAR(s->zero);
    Py_CLEAR(s->s_fast);
    Py_CLEAR(s->s_steady_in);
    s->ready = 0;
    return 0;
}

static void
ss_free(void *mod)
{
    ss_clear((PyObject *)mod);
}

static PyModuleDef_Slot ss_slots[] = {
    {Py_mod_exec, ss_exec},
    {0, NULL},
};

static struct PyModuleDef ss_module = {
    PyModuleDef_HEAD_INIT, "_streamstep",
    "Optional C kernel for the steady-stream fast path of StreamTable.update_outside.",
    sizeof(ss_state), ss_methods, ss_slots, ss_traverse, ss_clear, ss_free,
};

PyMODINIT_FUNC
PyInit__streamstep(void)
{
    return PyModuleDef_Init(&ss_module);
}
