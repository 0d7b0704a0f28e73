/* The fault classifier's per-stream residual features and its combination with the
 * stream detector's verdicts, in C: fault_classifier.py's ResidualState.row, the row
 * loop of ClassifiedTable.rows and combine(), bit for bit (the same IEEE double
 * operations in the same order; built with -ffp-contract=off, no fast-math).
 *
 *   configure(KINDS, LABEL_KIND, none)   (once, from fault_classifier.py)
 *   rows(states: dict, keys, ts, xs, verdicts, young: float)
 *       -> (positions: list[int], rows: bytes (float32, NF per row), states: list[State])
 *   combine(verdicts: list, positions, probs (float32 C-contiguous [m, nlab]),
 *           rows (float32 [m, NF], the ones rows() gave), states, p_fault, p_new, min_age,
 *           persist, young, calm_readings, p_open, spike, p_spike, p_drift, relabel)
 *       -> None (the verdicts are updated in place)
 *
 * Without a compiler the package uses the Python loop (same rows and verdicts, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#define NF 19
#define NTAIL 11

/* fault_classifier.TAIL_EDGES */
static const double TAIL_EDGES[NTAIL] = {2.0, 2.828427, 4.0, 5.656854, 8.0, 11.313708,
                                         16.0, 22.627417, 32.0, 45.254834, 64.0};
#define NKIND 6
#define NLAB 5
#define DRIFT 1 /* ANOMALY_LABELS.index("drift") */

typedef struct {
    PyObject_HEAD
    long long n;
    double last_x, last_t, log_step, res;
    long long run;
    double run_max, g_fast, g_slow, slope, absz, burst, jitter;
    int in_ep;
    long long fault, label, same, open_label;
    int opened, open;
    long long calm, last_n;
    double zmax;
    long long tail[NTAIL];
} rs_t;

typedef struct {
    PyObject *kinds[NKIND];
    PyObject *labels[NLAB];   /* LABEL_KIND */
    PyObject *none;
    PyObject *s_score, *s_likelihood, *s_opens, *s_in_episode, *s_kind, *s_expected,
        *s_lo, *s_hi;
    PyTypeObject *state_type;
    int ready;
} mod_state;

static struct PyModuleDef rs_module;

static inline mod_state *
get_state(PyObject *mod)
{
    return (mod_state *)PyModule_GetState(mod);
}

/* ------------------------------------------------------------------ State */

static void
rs_init(rs_t *s)
{
    s->n = 0;
    s->last_x = s->last_t = s->log_step = 0.0;
    s->res = INFINITY;
    s->run = 0;
    s->run_max = 1.0;
    s->g_fast = s->g_slow = s->slope = s->absz = s->burst = s->jitter = 0.0;
    s->in_ep = 0;
    s->fault = s->label = s->same = s->open_label = 0;
    s->opened = s->open = 0;
    s->calm = 0;
    s->last_n = -1;
    s->zmax = 0.0;
    for (int j = 0; j < NTAIL; j++)
        s->tail[j] = 0;
}

static PyObject *
state_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    rs_t *self = (rs_t *)tp->tp_alloc(tp, 0);
    if (self != NULL)
        rs_init(self);
    return (PyObject *)self;
}

static void
state_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *
state_get(PyObject *self, void *which)
{
    rs_t *s = (rs_t *)self;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLongLong(s->n);
    case 1: return PyLong_FromLongLong(s->fault);
    case 2: return PyBool_FromLong(s->open);
    case 3: return PyBool_FromLong(s->in_ep);
    case 4: return PyBool_FromLong(s->opened);
    }
    Py_RETURN_NONE;
}

static PyGetSetDef state_getset[] = {
    {"n", state_get, NULL, "readings seen", (void *)0},
    {"fault", state_get, NULL, "readings in a row called a fault", (void *)1},
    {"open", state_get, NULL, "an incident the classifier opened is open", (void *)2},
    {"in_ep", state_get, NULL, "the detector's episode after the previous reading",
     (void *)3},
    {"opened", state_get, NULL, "the current fault run opened an incident", (void *)4},
    {NULL},
};

static PyType_Slot state_slots[] = {
    {Py_tp_new, state_new},
    {Py_tp_dealloc, state_dealloc},
    {Py_tp_getset, state_getset},
    {Py_tp_doc, "fault_classifier.ResidualState in C"},
    {0, NULL},
};

static PyType_Spec state_spec = {
    "rapidmq_edge.intelligence._residualstep.State", sizeof(rs_t), 0,
    Py_TPFLAGS_DEFAULT, state_slots,
};

/* ------------------------------------------------------------------ helpers */

static inline int
get_double(PyObject *o, PyObject *name, double *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (*out == -1.0 && PyErr_Occurred())
        return -1;
    return 0;
}

static inline int
get_bool(PyObject *o, PyObject *name, int *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (r < 0)
        return -1;
    *out = r;
    return 0;
}

static inline double
clip(double v, double lim)
{
    return v < -lim ? -lim : (v > lim ? lim : v);
}

/* ResidualState.row: the row into out[NF], then learn */
static int
rs_row(mod_state *ms, rs_t *st, double t, double x, PyObject *v, float *out)
{
    double hi, lo, e, lik;
    int in_episode;
    if (get_double(v, ms->s_hi, &hi) < 0 || get_double(v, ms->s_lo, &lo) < 0
        || get_double(v, ms->s_expected, &e) < 0 || get_double(v, ms->s_likelihood, &lik) < 0
        || get_bool(v, ms->s_in_episode, &in_episode) < 0)
        return -1;
    PyObject *kind = PyObject_GetAttr(v, ms->s_kind);
    if (kind == NULL)
        return -1;
    double code = 0.0;
    for (int k = 0; k < NKIND; k++) {
        int eq = kind == ms->kinds[k];
        if (!eq) {
            eq = PyUnicode_Check(kind) && PyUnicode_Compare(kind, ms->kinds[k]) == 0;
            if (PyErr_Occurred()) {
                Py_DECREF(kind);
                return -1;
            }
        }
        if (eq) {
            code = (double)(k + 1);
            break;
        }
    }
    Py_DECREF(kind);
    long long n = st->n;
    double s = (hi - lo) * 0.125;
    if (!(s > 0.0 && e == e))
        s = 0.0;
    double z = 0.0, dz = 0.0, ldt = 0.0;
    if (n != 0) {
        double dt = t - st->last_t;
        if (dt < 1e-6)
            dt = 1e-6;
        if (n == 1)
            st->log_step = log(dt);
        ldt = log(dt) - st->log_step;
        ldt = ldt < -5.0 ? -5.0 : (ldt > 5.0 ? 5.0 : ldt);
        double d = x - st->last_x;
        if (d != 0.0 && fabs(d) < st->res)
            st->res = fabs(d);
        if (s > 0.0) {
            z = (x - e) / s;
            dz = d / s;
            z = z < -100.0 ? -100.0 : (z > 100.0 ? 100.0 : z);
            dz = dz < -100.0 ? -100.0 : (dz > 100.0 ? 100.0 : dz);
        }
    }
    int gap = n >= 2 && ldt > log(10.0);
    long long run = (n && x == st->last_x && !gap) ? st->run + 1 : 0;
    double az = fabs(z);
    double zc = clip(z, 5.0), dzc = clip(dz, 5.0);
    double g_fast = st->g_fast + 0.3 * (zc - st->g_fast);
    double g_slow = st->g_slow + 0.05 * (zc - st->g_slow);
    double slope = st->slope + 0.2 * (dzc - st->slope);
    double burst = st->burst + 0.2 * (-ldt - st->burst);
    double p = 1.0 - lik;
    double lp = p < 1e-12 ? 12.0 : -log(p) / log(10.0);
    double res = (s > 0.0 && st->res < INFINITY) ? st->res / s : 0.0;
    double zr = az / (st->zmax > 1.0 ? st->zmax : 1.0);
    double half = 0.5 * az;
    int kt = -1;
    for (int j = 0; j < NTAIL; j++)
        if (half >= TAIL_EDGES[j])
            kt = j;
    double tl = kt >= 0 ? log10(((double)st->tail[kt] + 0.5) / ((double)n + 1.0)) : 0.0;
    if (out != NULL) {
        out[0] = (float)log1p((double)n);
        out[1] = (float)z;
        out[2] = (float)dz;
        out[3] = (float)(st->absz > 0.0 ? az / st->absz : 0.0);
        out[4] = (float)g_fast;
        out[5] = (float)g_slow;
        out[6] = (float)slope;
        out[7] = (float)lp;
        out[8] = (float)code;
        out[9] = (float)(st->in_ep ? 1.0 : 0.0);
        out[10] = (float)log1p((double)run);
        out[11] = (float)((double)run / st->run_max);
        out[12] = (float)(res > 10.0 ? 10.0 : res);
        out[13] = (float)ldt;
        out[14] = (float)burst;
        out[15] = (float)st->jitter;
        out[16] = (float)(gap ? 1.0 : 0.0);
        out[17] = (float)(zr > 20.0 ? 20.0 : zr);
        out[18] = (float)tl;
    }
    /* learn */
    if (n >= 2)
        st->log_step += 0.05 * (ldt < -0.5 ? -0.5 : (ldt > 0.5 ? 0.5 : ldt));
    if (run == 0 && st->run > 0 && (double)st->run > st->run_max)
        st->run_max = (double)st->run;
    st->run = run;
    double a = n > 50 ? 0.02 : 1.0 / (double)(n + 1);
    st->absz += a * ((az < 5.0 ? az : 5.0) - st->absz);
    if (n >= 2) {
        double aj = ldt < 0.0 ? -ldt : ldt;
        st->jitter += a * ((aj < 3.0 ? aj : 3.0) - st->jitter);
    }
    if (az > st->zmax)
        st->zmax = az;
    for (int j = 0; j < NTAIL; j++)
        if (az >= TAIL_EDGES[j])
            st->tail[j] += 1;
    st->g_fast = g_fast;
    st->g_slow = g_slow;
    st->slope = slope;
    st->burst = burst;
    st->in_ep = in_episode;
    st->n = n + 1;
    st->last_t = t;
    st->last_x = x;
    return 0;
}

/* ------------------------------------------------------------------ rows */

static PyObject *
rs_rows(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    mod_state *ms = get_state(mod);
    if (!ms->ready) {
        PyErr_SetString(PyExc_RuntimeError, "_residualstep.configure() was not called");
        return NULL;
    }
    if (nargs != 6 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "rows(states, keys, ts, xs, verdicts, young)");
        return NULL;
    }
    PyObject *states = args[0];
    double young = PyFloat_AsDouble(args[5]);
    if (young == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *keys = PySequence_Fast(args[1], "keys must be a sequence");
    PyObject *ts = keys ? PySequence_Fast(args[2], "ts must be a sequence") : NULL;
    PyObject *xs = ts ? PySequence_Fast(args[3], "xs must be a sequence") : NULL;
    PyObject *vs = xs ? PySequence_Fast(args[4], "verdicts must be a sequence") : NULL;
    PyObject *pos = NULL, *buf = NULL, *sts = NULL, *result = NULL;
    float *rows = NULL;
    if (vs == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    if (PySequence_Fast_GET_SIZE(ts) != n || PySequence_Fast_GET_SIZE(xs) != n
        || PySequence_Fast_GET_SIZE(vs) != n) {
        PyErr_SetString(PyExc_ValueError, "keys, ts, xs and verdicts differ in length");
        goto done;
    }
    rows = PyMem_Malloc(sizeof(float) * NF * (n ? n : 1));
    pos = PyList_New(0);
    sts = PyList_New(n);
    if (rows == NULL || pos == NULL || sts == NULL) {
        if (rows == NULL)
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(keys, i);
        PyObject *st = PyDict_GetItemWithError(states, k);
        if (st == NULL) {
            if (PyErr_Occurred())
                goto done;
            st = ms->state_type->tp_alloc(ms->state_type, 0);
            if (st == NULL)
                goto done;
            rs_init((rs_t *)st);
            if (PyDict_SetItem(states, k, st) < 0) {
                Py_DECREF(st);
                goto done;
            }
        }
        else if (Py_TYPE(st) != ms->state_type) {
            PyErr_SetString(PyExc_TypeError, "states holds a value that is not a State");
            goto done;
        }
        else {
            Py_INCREF(st);
        }
        PyList_SET_ITEM(sts, i, st); /* the reference */
        double t = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(ts, i));
        if (t == -1.0 && PyErr_Occurred())
            goto done;
        double x = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(xs, i));
        if (x == -1.0 && PyErr_Occurred())
            goto done;
        if (!(isfinite(t) && isfinite(x)))
            continue;
        rs_t *s = (rs_t *)st;
        PyObject *v = PySequence_Fast_GET_ITEM(vs, i);
        int v_ep;
        if (get_bool(v, ms->s_in_episode, &v_ep) < 0)
            goto done;
        float *out = NULL;
        if ((double)s->n < young || s->in_ep || v_ep) {
            PyObject *pi = PyLong_FromSsize_t(i);
            if (pi == NULL || PyList_Append(pos, pi) < 0) {
                Py_XDECREF(pi);
                goto done;
            }
            Py_DECREF(pi);
            out = rows + NF * m;
            m++;
        }
        if (rs_row(ms, s, t, x, v, out) < 0)
            goto done;
    }
    buf = PyBytes_FromStringAndSize((const char *)rows, (Py_ssize_t)(sizeof(float) * NF * m));
    if (buf != NULL)
        result = PyTuple_Pack(3, pos, buf, sts);
done:
    PyMem_Free(rows);
    Py_XDECREF(keys);
    Py_XDECREF(ts);
    Py_XDECREF(xs);
    Py_XDECREF(vs);
    Py_XDECREF(pos);
    Py_XDECREF(buf);
    Py_XDECREF(sts);
    return result;
}

/* ------------------------------------------------------------------ combine */

static int
set_double(PyObject *o, PyObject *name, double d)
{
    PyObject *f = PyFloat_FromDouble(d);
    if (f == NULL)
        return -1;
    int r = PyObject_SetAttr(o, name, f);
    Py_DECREF(f);
    return r;
}

static PyObject *
rs_combine(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    mod_state *ms = get_state(mod);
    if (!ms->ready) {
        PyErr_SetString(PyExc_RuntimeError, "_residualstep.configure() was not called");
        return NULL;
    }
    if (nargs != 16 || !PyList_Check(args[0]) || !PyList_Check(args[1])
        || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "combine(verdicts, positions, probs, rows, states, p_fault, p_new, "
                        "min_age, persist, young, calm_readings, p_open, spike, p_spike, p_drift, "
                        "relabel)");
        return NULL;
    }
    double prm[11];
    for (int j = 0; j < 11; j++) {
        prm[j] = PyFloat_AsDouble(args[5 + j]);
        if (prm[j] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    double p_fault = prm[0], p_new = prm[1], min_age = prm[2], persist = prm[3],
           young = prm[4], calm_readings = prm[5], p_open = prm[6];
    long spike = (long)prm[7];
    double p_spike = prm[8], p_drift = prm[9];
    int relabel = prm[10] != 0.0;
    PyObject *verdicts = args[0], *positions = args[1], *sts = args[4];
    Py_ssize_t m = PyList_GET_SIZE(positions);
    Py_buffer view, rview;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &rview, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    if (view.format == NULL || strcmp(view.format, "f") != 0 || view.ndim != 2
        || view.shape[0] != m || view.shape[1] < 2 || view.shape[1] > NLAB) {
        PyErr_SetString(PyExc_ValueError, "probs must be float32 [len(positions), labels]");
        goto done;
    }
    if (rview.format == NULL || strcmp(rview.format, "f") != 0 || rview.ndim != 2
        || rview.shape[0] != m || rview.shape[1] != NF) {
        PyErr_SetString(PyExc_ValueError, "rows must be float32 [len(positions), NF]");
        goto done;
    }
    const float *R = (const float *)rview.buf;
    Py_ssize_t nlab = view.shape[1];
    const float *P = (const float *)view.buf;
    for (Py_ssize_t j = 0; j < m; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(positions, j));
        if (i == -1 && PyErr_Occurred())
            goto done;
        if (i < 0 || i >= PyList_GET_SIZE(verdicts) || i >= PyList_GET_SIZE(sts)) {
            PyErr_SetString(PyExc_IndexError, "position out of range");
            goto done;
        }
        PyObject *v = PyList_GET_ITEM(verdicts, i);
        PyObject *sto = PyList_GET_ITEM(sts, i);
        if (Py_TYPE(sto) != ms->state_type) {
            PyErr_SetString(PyExc_TypeError, "states holds a value that is not a State");
            goto done;
        }
        rs_t *st = (rs_t *)sto;
        /* the reading's age, from its row (exact while young) */
        long long age = llround(expm1((double)R[j * NF]));
        if (age != st->last_n + 1) {
            st->fault = st->same = 0;
            st->opened = st->open = 0;
        }
        st->last_n = age;
        const float *pr = P + j * nlab;
        double pf = 1.0 - (double)pr[0];
        int fault = pf > p_fault, nw = pf > p_new;
        int opens, in_episode;
        double vlik;
        if (get_bool(v, ms->s_opens, &opens) < 0 || get_bool(v, ms->s_in_episode, &in_episode) < 0
            || get_double(v, ms->s_likelihood, &vlik) < 0)
            goto done;
        int by_detector = opens;
        Py_ssize_t best = 1;
        for (Py_ssize_t c = 2; c < nlab; c++)
            if ((double)pr[c] > (double)pr[best])
                best = c;
        if (nw) {
            st->fault += 1;
            if ((long long)best == st->label)
                st->same += 1;
            else {
                st->label = best;
                st->same = 1;
            }
            if (!opens && min_age < (double)(age + 1) && (double)(age + 1) <= young
                && ((!st->opened && (double)st->fault >= persist
                     && (best != DRIFT || pf > p_drift))
                    || (relabel && st->opened && (long long)best != st->open_label
                        && (double)st->same >= persist && (best != DRIFT || pf > p_drift))
                    || (best == spike && pf > p_spike
                        && (!st->opened || (relabel && st->same == 1))))) {
                opens = 1;
                if (PyObject_SetAttr(v, ms->s_opens, Py_True) < 0)
                    goto done;
                st->opened = 1;
                st->open_label = best;
            }
        }
        else {
            st->fault = st->same = 0;
            st->opened = 0;
        }
        if (opens && !in_episode) {
            st->open = 1;
            st->calm = 0;
        }
        else if (st->open) {
            if (fault)
                st->calm = 0;
            else {
                st->calm += 1;
                if ((double)st->calm >= calm_readings)
                    st->open = 0;
            }
        }
        double lik = 1.0 - pow(p_open, pf / p_fault);
        if (by_detector && vlik > lik)
            lik = vlik;
        if (set_double(v, ms->s_likelihood, lik) < 0)
            goto done;
        if (fault) {
            if (PyObject_SetAttr(v, ms->s_kind, ms->labels[best]) < 0)
                goto done;
        }
        else if (!opens) {
            if (PyObject_SetAttr(v, ms->s_kind, ms->none) < 0)
                goto done;
        }
        if (st->open && PyObject_SetAttr(v, ms->s_in_episode, Py_True) < 0)
            goto done;
        if (set_double(v, ms->s_score, opens ? 0.5 + 0.5 * lik : 0.49 * lik) < 0)
            goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&view);
    PyBuffer_Release(&rview);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyObject *
rs_configure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    mod_state *ms = get_state(mod);
    if (nargs != 3 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != NKIND
        || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != NLAB
        || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "configure(KINDS, LABEL_KIND, none)");
        return NULL;
    }
    for (int k = 0; k < NKIND; k++) {
        PyObject *o = PyTuple_GET_ITEM(args[0], k);
        Py_INCREF(o);
        Py_XSETREF(ms->kinds[k], o);
    }
    for (int k = 0; k < NLAB; k++) {
        PyObject *o = PyTuple_GET_ITEM(args[1], k);
        Py_INCREF(o);
        Py_XSETREF(ms->labels[k], o);
    }
    Py_INCREF(args[2]);
    Py_XSETREF(ms->none, args[2]);
    ms->ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef rs_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))rs_configure, METH_FASTCALL,
     "configure(KINDS, LABEL_KIND, none): fault_classifier.py's kind names"},
    {"rows", (PyCFunction)(void (*)(void))rs_rows, METH_FASTCALL,
     "rows(states, keys, ts, xs, verdicts, young) -> (positions, float32 bytes, states)"},
    {"combine", (PyCFunction)(void (*)(void))rs_combine, METH_FASTCALL,
     "combine(verdicts, positions, probs, rows, states, p_fault, p_new, min_age, persist, "
     "young, calm_readings, p_open, spike, p_spike, p_drift, relabel): "
     "fault_classifier.combine for "
     "each "
     "position"},
    {NULL, NULL, 0, NULL},
};

static int
rs_exec(PyObject *mod)
{
    mod_state *ms = get_state(mod);
    ms->state_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &state_spec, NULL);
    if (ms->state_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(mod, "State", (PyObject *)ms->state_type) < 0)
        return -1;
    const char *names[8] = {"score", "likelihood", "opens", "in_episode", "kind", "expected",
                            "lo", "hi"};
    PyObject **slots[8] = {&ms->s_score, &ms->s_likelihood, &ms->s_opens, &ms->s_in_episode,
                           &ms->s_kind, &ms->s_expected, &ms->s_lo, &ms->s_hi};
    for (int j = 0; j < 8; j++) {
        *slots[j] = PyUnicode_InternFromString(names[j]);
        if (*slots[j] == NULL)
            return -1;
    }
    return 0;
}

static int
rs_traverse(PyObject *mod, visitproc visit, void *arg)
{
    mod_state *ms = get_state(mod);
    for (int k = 0; k < NKIND; k++)
        Py_VISIT(ms->kinds[k]);
    for (int k = 0; k < NLAB; k++)
        Py_VISIT(ms->labels[k]);
    Py_VISIT(ms->none);
    Py_VISIT(ms->state_type);
    return 0;
}

static int
rs_clear(PyObject *mod)
{
    mod_state *ms = get_state(mod);
    for (int k = 0; k < NKIND; k++)
        Py_CLEAR(ms->kinds[k]);
    for (int k = 0; k < NLAB; k++)
        Py_CLEAR(ms->labels[k]);
    Py_CLEAR(ms->none);
    Py_CLEAR(ms->state_type);
    Py_CLEAR(ms->s_score);
    Py_CLEAR(ms->s_likelihood);
    Py_CLEAR(ms->s_opens);
    Py_CLEAR(ms->s_in_episode);
    Py_CLEAR(ms->s_kind);
    Py_CLEAR(ms->s_expected);
    Py_CLEAR(ms->s_lo);
    Py_CLEAR(ms->s_hi);
    return 0;
}

static void
rs_free(void *mod)
{
    rs_clear((PyObject *)mod);
}

static PyModuleDef_Slot rs_mod_slots[] = {
    {Py_mod_exec, rs_exec},
    {0, NULL},
};

static struct PyModuleDef rs_module = {
    PyModuleDef_HEAD_INIT, "_residualstep",
    "fault_classifier.py's residual rows and combination, in C", sizeof(mod_state),
    rs_methods, rs_mod_slots, rs_traverse, rs_clear, rs_free,
};

PyMODINIT_FUNC
PyInit__residualstep(void)
{
    return PyModuleDef_Init(&rs_module);
}
