/*
 * Optional C fast lane of PacketReader (rapidmq_edge/mqtt/codec.py, issue 17): framing and
 * the common packets of a connection's steady state, decoded in one call per read.
 *
 *   configure(Publish, Puback, Pubcomp, Connect, Subscribe, options)  (once, from mqtt/framing.py)
 *   scan(buf, pos, version, max_size, out, topics) -> int
 *
 * scan() reads the frames of ``buf`` from ``pos`` and appends to the list ``out`` the
 * packets the Python codec would decode from them, as long as every frame is one it fully
 * understands:
 *
 *   - PUBLISH with QoS 0-2, a non-empty topic without wildcards or U+0000 that is valid
 *     UTF-8, a non-zero packet identifier at QoS 1/2, and (MQTT 5) an empty property
 *     block; a PUBLISH without flags (QoS 0, no retain) keeps its raw bytes (``raw``);
 *   - PUBACK / PUBCOMP with a 2 byte body and a non-zero packet identifier;
 *   - CONNECT (only while ``version`` is 0: the first packet; scan() then goes on with the
 *     CONNECT's level) for "MQTT" level 4 or 5 without a Will, with (MQTT 5) an empty
 *     property block, a password only after a user name, and no byte after the payload;
 *   - SUBSCRIBE (once the version is known) with (MQTT 5) an empty property block, one or
 *     more filters (UTF-8, no U+0000) whose option byte has an entry in ``options`` (the
 *     SubOptions objects of the valid option bytes, per version, built by framing.py), and
 *     no No Local on a "$share/" filter.
 *
 * It returns the position after the last frame it consumed when the rest of the buffer is
 * an incomplete frame (or nothing), and ``-pos - 1`` when the frame at ``pos`` is any other
 * packet or breaks a rule: the Python codec then decodes (or refuses) that one frame, with
 * its own errors. scan() never raises an MQTT error itself, so the packets and the errors
 * are the Python codec's by construction; tests/test_mqtt_framing.py and fuzz/mqtt_framing.py
 * check both readers against each other.
 *
 * ``topics`` is a list (of any length >= 1) used as a direct-mapped cache of topic strings
 * (ASCII ones): a PUBLISH to a topic (or a SUBSCRIBE to a filter) seen recently gets the
 * same str object (its hash already computed). The codec shares one list between all its
 * readers.
 *
 * Without a compiler the package uses the Python codec alone (same packets, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "structmember.h"

#define PUBLISH 3
#define PUBACK 4
#define PUBCOMP 7
#define CONNECT 1
#define SUBSCRIBE 8
#define MQTT_5 5

/* A packet class whose instances scan() fills directly: a slots dataclass without
 * __post_init__, whose __init__ only assigns its fields (configure() checks the slots). */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset[10]; /* of each field's slot, in field order */
    int fields;
} packet_class;

static packet_class Publish_cls = {NULL}, Puback_cls = {NULL}, Pubcomp_cls = {NULL};
static packet_class Connect_cls = {NULL}, Subscribe_cls = {NULL};
/* options[v5][byte]: the SubOptions of a valid subscription option byte, or None */
static PyObject *options_of[2][256];
static PyObject *options_table = NULL; /* keeps the objects above alive */
static PyObject *MQTT_name = NULL;     /* "MQTT": the protocol_name of a decoded CONNECT */

static const char *const PUBLISH_FIELDS[] = {
    "topic", "payload", "qos", "retain", "dup", "packet_id", "properties", "raw"};
static const char *const ACK_FIELDS[] = {"packet_id", "reason_code", "properties"};
static const char *const CONNECT_FIELDS[] = {
    "protocol_level", "client_id", "clean_start", "keep_alive", "will", "username", "password",
    "properties", "protocol_name"};
static const char *const SUBSCRIBE_FIELDS[] = {"packet_id", "topics", "properties"};

static int
resolve(packet_class *pc, PyObject *cls, const char *const names[], int fields)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes packet classes");
        return -1;
    }
    PyObject *post = PyObject_GetAttrString(cls, "__post_init__");
    if (post != NULL) {
        Py_DECREF(post);
        PyErr_Format(PyExc_TypeError, "%R has __post_init__", cls);
        return -1;
    }
    PyErr_Clear();
    /* every slot is a field scan() sets: no other slot may be left unset */
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL)
        return -1;
    int same = PyTuple_Check(slots) && PyTuple_GET_SIZE(slots) == fields;
    for (int k = 0; same && k < fields; k++) {
        PyObject *name = PyTuple_GET_ITEM(slots, k);
        same = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, names[k]) == 0;
    }
    Py_DECREF(slots);
    if (!same) {
        PyErr_Format(PyExc_TypeError, "%R: __slots__ are not the fields scan() sets", cls);
        return -1;
    }
    for (int k = 0; k < fields; k++) {
        PyObject *d = PyObject_GetAttrString(cls, names[k]);
        if (d == NULL)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            pc->offset[k] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%R.%s is not a slot", cls, names[k]);
            return -1;
        }
    }
    Py_XSETREF(pc->type, (PyTypeObject *)Py_NewRef(cls));
    pc->fields = fields;
    return 0;
}

/* An instance of ``pc`` with its fields set to ``values`` (references stolen, all of them,
 * also on failure); NULL with an exception set when one of them is NULL or on no memory. */
static PyObject *
build(packet_class *pc, PyObject **values)
{
    PyObject *obj = NULL;
    int complete = 1;
    for (int k = 0; k < pc->fields; k++)
        complete &= values[k] != NULL;
    if (complete)
        obj = pc->type->tp_alloc(pc->type, 0);
    for (int k = 0; k < pc->fields; k++) {
        if (obj != NULL)
            *(PyObject **)((char *)obj + pc->offset[k]) = values[k];
        else
            Py_XDECREF(values[k]);
    }
    return obj;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *pub, *puback, *pubcomp, *connect, *subscribe, *options;
    if (!PyArg_ParseTuple(args, "OOOOOO:configure", &pub, &puback, &pubcomp, &connect,
                          &subscribe, &options))
        return NULL;
    if (resolve(&Publish_cls, pub, PUBLISH_FIELDS, 8) < 0
        || resolve(&Puback_cls, puback, ACK_FIELDS, 3) < 0
        || resolve(&Pubcomp_cls, pubcomp, ACK_FIELDS, 3) < 0
        || resolve(&Connect_cls, connect, CONNECT_FIELDS, 9) < 0
        || resolve(&Subscribe_cls, subscribe, SUBSCRIBE_FIELDS, 3) < 0)
        return NULL;
    /* options: a tuple of two 256-tuples (3.1.1, 5.0) of SubOptions or None */
    if (!PyTuple_Check(options) || PyTuple_GET_SIZE(options) != 2) {
        PyErr_SetString(PyExc_TypeError, "configure(): options is a tuple of two tables");
        return NULL;
    }
    for (int v = 0; v < 2; v++) {
        PyObject *t = PyTuple_GET_ITEM(options, v);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 256) {
            PyErr_SetString(PyExc_TypeError, "configure(): an options table has 256 entries");
            return NULL;
        }
        for (int b = 0; b < 256; b++)
            options_of[v][b] = PyTuple_GET_ITEM(t, b);
    }
    Py_XSETREF(options_table, Py_NewRef(options));
    if (MQTT_name == NULL && (MQTT_name = PyUnicode_InternFromString("MQTT")) == NULL)
        return NULL;
    Py_RETURN_NONE;
}

/* FNV-1a over the topic bytes: the slot of the topic cache */
static Py_ssize_t
topic_slot(const unsigned char *s, Py_ssize_t len, Py_ssize_t slots)
{
    uint32_t h = 2166136261u;
    for (Py_ssize_t k = 0; k < len; k++) {
        h ^= s[k];
        h *= 16777619u;
    }
    return (Py_ssize_t)(h % (uint32_t)slots);
}

/* The topic as a str: the cached one when it has these bytes, else decoded (strict UTF-8,
 * as bytes.decode()) and cached. NULL with no exception set: not valid UTF-8. */
static PyObject *
topic_str(PyObject *topics, const unsigned char *s, Py_ssize_t len)
{
    Py_ssize_t slots = PyList_GET_SIZE(topics);
    Py_ssize_t slot = topic_slot(s, len, slots);
    PyObject *hit = PyList_GET_ITEM(topics, slot);
    if (PyUnicode_CheckExact(hit) && PyUnicode_IS_COMPACT_ASCII(hit)
        && PyUnicode_GET_LENGTH(hit) == len && memcmp(PyUnicode_DATA(hit), s, len) == 0)
        return Py_NewRef(hit);
    PyObject *topic = PyUnicode_DecodeUTF8((const char *)s, len, NULL);
    if (topic == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
        return NULL;
    }
    if (PyUnicode_IS_COMPACT_ASCII(topic)) {
        Py_INCREF(topic);
        PyList_SetItem(topics, slot, topic); /* steals; drops the old entry */
    }
    return topic;
}

static PyObject *
make_publish(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, int flags,
             PyObject *topic, Py_ssize_t payload_at, long pid)
{
    PyObject *values[8];
    values[0] = Py_NewRef(topic);
    values[1] = PyBytes_FromStringAndSize((const char *)p + payload_at, end - payload_at);
    values[2] = PyLong_FromLong((flags >> 1) & 0x03);
    values[3] = PyBool_FromLong(flags & 0x01);
    values[4] = PyBool_FromLong(flags & 0x08);
    values[5] = PyLong_FromLong(pid);
    values[6] = PyDict_New();
    values[7] = flags ? Py_NewRef(Py_None)
                      : PyBytes_FromStringAndSize((const char *)p + pos, end - pos);
    return build(&Publish_cls, values);
}

static PyObject *
make_ack(packet_class *pc, long pid)
{
    PyObject *values[3] = {PyLong_FromLong(pid), PyLong_FromLong(0), PyDict_New()};
    return build(pc, values);
}

/* A length-prefixed MQTT UTF-8 string at p[*q..end) as a str (cached in ``topics`` when
 * ``cache``), *q moved past it. NULL with no exception set: missing, runs past ``end``,
 * holds U+0000 or is not valid UTF-8 (the codec's errors); NULL with one set: no memory. */
static PyObject *
mqtt_str(PyObject *topics, const unsigned char *p, Py_ssize_t *q, Py_ssize_t end, int cache)
{
    Py_ssize_t at = *q;
    if (at + 2 > end)
        return NULL;
    Py_ssize_t len = ((Py_ssize_t)p[at] << 8) | p[at + 1];
    at += 2;
    if (at + len > end || memchr(p + at, 0, len) != NULL)
        return NULL;
    PyObject *text;
    if (cache && len) {
        text = topic_str(topics, p + at, len);
    } else {
        text = PyUnicode_DecodeUTF8((const char *)p + at, len, NULL);
        if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
    }
    if (text != NULL)
        *q = at + len;
    return text;
}

/* CONNECT in p[i..end) as a Connect, or NULL: with no exception set when it is not one the
 * lane decodes (see the top of the file), with one set on no memory. */
static PyObject *
make_connect(PyObject *topics, const unsigned char *p, Py_ssize_t i, Py_ssize_t end)
{
    if (end - i < 10 || p[i] != 0 || p[i + 1] != 4 || memcmp(p + i + 2, "MQTT", 4) != 0)
        return NULL;
    int level = p[i + 6], flags = p[i + 7];
    long keep_alive = ((long)p[i + 8] << 8) | p[i + 9];
    /* no reserved flag, no Will (flag, QoS, retain), a password only after a user name */
    if ((level != 4 && level != MQTT_5) || (flags & 0x3D) || ((flags & 0x40) && !(flags & 0x80)))
        return NULL;
    Py_ssize_t q = i + 10;
    if (level == MQTT_5) { /* only an empty property block here */
        if (q >= end || p[q] != 0)
            return NULL;
        q += 1;
    }
    PyObject *values[9] = {NULL};
    values[1] = mqtt_str(topics, p, &q, end, 0);
    if (values[1] == NULL)
        return NULL;
    int failed = 0;
    values[5] = Py_NewRef(Py_None);
    values[6] = Py_NewRef(Py_None);
    if (flags & 0x80) {
        PyObject *user = mqtt_str(topics, p, &q, end, 0);
        if (user == NULL) {
            failed = 1;
        } else {
            Py_SETREF(values[5], user);
        }
    }
    if (!failed && (flags & 0x40)) {
        Py_ssize_t len = q + 2 <= end ? (((Py_ssize_t)p[q] << 8) | p[q + 1]) : end;
        if (q + 2 + len > end) {
            failed = 1;
        } else {
            PyObject *password = PyBytes_FromStringAndSize((const char *)p + q + 2, len);
            if (password == NULL)
                failed = 1;
            else
                Py_SETREF(values[6], password);
            q += 2 + len;
        }
    }
    if (failed || q != end) {
        for (int k = 0; k < 9; k++)
            Py_XDECREF(values[k]);
        return NULL;
    }
    values[0] = PyLong_FromLong(level);
    values[2] = PyBool_FromLong(flags & 0x02);
    values[3] = PyLong_FromLong(keep_alive);
    values[4] = Py_NewRef(Py_None);
    values[7] = PyDict_New();
    values[8] = Py_NewRef(MQTT_name);
    return build(&Connect_cls, values);
}

/* SUBSCRIBE in p[i..end) as a Subscribe, or NULL as make_connect(). */
static PyObject *
make_subscribe(PyObject *topics, const unsigned char *p, Py_ssize_t i, Py_ssize_t end, int v5)
{
    if (end - i < 2)
        return NULL;
    long pid = ((long)p[i] << 8) | p[i + 1];
    Py_ssize_t q = i + 2;
    if (!pid)
        return NULL;
    if (v5) { /* only an empty property block here */
        if (q >= end || p[q] != 0)
            return NULL;
        q += 1;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    while (q < end) {
        Py_ssize_t at = q;
        PyObject *filt = mqtt_str(topics, p, &q, end, 1);
        if (filt == NULL)
            goto fail;
        PyObject *opts = q < end ? options_of[v5][p[q]] : Py_None;
        q += 1;
        if (opts == Py_None
            || (v5 && (p[q - 1] & 0x04) && q - at - 3 >= 7 && memcmp(p + at + 2, "$share/", 7) == 0)) {
            Py_DECREF(filt);
            goto fail;
        }
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(filt);
            goto fail;
        }
        PyTuple_SET_ITEM(pair, 0, filt);
        PyTuple_SET_ITEM(pair, 1, Py_NewRef(opts));
        int appended = PyList_Append(list, pair);
        Py_DECREF(pair);
        if (appended < 0)
            goto fail;
    }
    if (PyList_GET_SIZE(list) == 0)
        goto fail;
    PyObject *values[3] = {PyLong_FromLong(pid), list, PyDict_New()};
    return build(&Subscribe_cls, values);
fail:
    Py_DECREF(list);
    return NULL;
}

/* scan(buf, pos, version, max_size, out, topics) -> int (see the top of the file) */
static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 6 arguments");
        return NULL;
    }
    if (Publish_cls.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_framing.configure() was not called");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    long version = PyLong_AsLong(args[2]);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    int v5 = version == MQTT_5;
    Py_ssize_t max_size = PyLong_AsSsize_t(args[3]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    PyObject *out = args[4];
    PyObject *topics = args[5];
    if (!PyList_CheckExact(out) || !PyList_CheckExact(topics) || PyList_GET_SIZE(topics) < 1) {
        PyErr_SetString(PyExc_TypeError, "scan() needs a list out and a non-empty list topics");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    int python = 0; /* the frame at pos is for the Python codec */
    int failed = 0; /* an exception is set (memory, a class's __init__) */
    if (pos < 0 || pos > n) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan() position outside the buffer");
        return NULL;
    }
    while (n - pos >= 2) {
        int first = p[pos];
        Py_ssize_t length = p[pos + 1];
        Py_ssize_t i = pos + 2;
        if (length >= 0x80) { /* a 2-4 byte Remaining Length */
            int shift = 7, complete = 0, ran_out = 0;
            length &= 0x7F;
            for (int k = 0; k < 3; k++) {
                if (i >= n) {
                    ran_out = 1;
                    break;
                }
                int byte = p[i++];
                length |= (Py_ssize_t)(byte & 0x7F) << shift;
                if (!(byte & 0x80)) {
                    complete = 1;
                    break;
                }
                shift += 7;
            }
            if (!complete) {
                if (!ran_out) /* a continuation bit on the fourth byte: malformed */
                    python = 1;
                break;
            }
            if (p[i - 1] == 0 && v5) { /* not minimally encoded */
                python = 1;
                break;
            }
        }
        Py_ssize_t total = i - pos + length;
        if (total > max_size) {
            python = 1;
            break;
        }
        if (n - pos < total)
            break;
        Py_ssize_t end = i + length;
        int type = first >> 4, flags = first & 0x0F;
        PyObject *packet = NULL;
        if (!version) { /* the first packet: a CONNECT the lane decodes, or the codec's */
            if (type != CONNECT || flags
                || (packet = make_connect(topics, p, i, end)) == NULL) {
                if (PyErr_Occurred())
                    failed = 1;
                else
                    python = 1;
                break;
            }
            version = p[i + 6]; /* the CONNECT's level: the frames after it are read with it */
            v5 = version == MQTT_5;
        } else if (type == SUBSCRIBE && flags == 0x02) {
            packet = make_subscribe(topics, p, i, end, v5);
            if (packet == NULL) {
                if (PyErr_Occurred())
                    failed = 1;
                else
                    python = 1;
                break;
            }
        } else if (type == PUBLISH) {
            int qos = (flags >> 1) & 0x03;
            if (qos == 3 || ((flags & 0x08) && !qos) || length < 2) {
                python = 1;
                break;
            }
            Py_ssize_t tlen = ((Py_ssize_t)p[i] << 8) | p[i + 1];
            Py_ssize_t q = i + 2 + tlen;
            if (tlen == 0 || q > end) {
                python = 1;
                break;
            }
            const unsigned char *t = p + i + 2;
            int bad = 0;
            for (Py_ssize_t k = 0; k < tlen; k++) {
                unsigned char c = t[k];
                if (c == '+' || c == '#' || c == 0) {
                    bad = 1;
                    break;
                }
            }
            long pid = 0;
            if (!bad && qos) {
                if (q + 2 > end) {
                    bad = 1;
                } else {
                    pid = ((long)p[q] << 8) | p[q + 1];
                    bad = pid == 0;
                    q += 2;
                }
            }
            if (!bad && v5) { /* only an empty property block here */
                if (q >= end || p[q] != 0)
                    bad = 1;
                else
                    q += 1;
            }
            if (bad) {
                python = 1;
                break;
            }
            PyObject *topic = topic_str(topics, t, tlen);
            if (topic == NULL) {
                if (PyErr_Occurred())
                    failed = 1;
                else
                    python = 1; /* not UTF-8: the codec's error */
                break;
            }
            packet = make_publish(p, pos, end, flags, topic, q, pid);
            Py_DECREF(topic);
        } else if ((type == PUBACK || type == PUBCOMP) && !flags && length == 2) {
            long pid = ((long)p[i] << 8) | p[i + 1];
            if (!pid) {
                python = 1;
                break;
            }
            packet = make_ack(type == PUBACK ? &Puback_cls : &Pubcomp_cls, pid);
        } else {
            python = 1;
            break;
        }
        if (packet == NULL) {
            failed = 1;
            break;
        }
        int appended = PyList_Append(out, packet);
        Py_DECREF(packet);
        if (appended < 0) {
            failed = 1;
            break;
        }
        pos = end;
    }
    PyBuffer_Release(&view);
    if (failed)
        return NULL;
    return PyLong_FromSsize_t(python ? -pos - 1 : pos);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Publish, Puback, Pubcomp, Connect, Subscribe, options)"},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, pos, version, max_size, out, topics) -> int: the frames the C lane decodes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_framing",
    "C fast lane of the MQTT PacketReader (framing, PUBLISH, PUBACK, PUBCOMP, CONNECT, SUBSCRIBE).", -1, methods,
};

PyMODINIT_FUNC
PyInit__framing(void)
{
    return PyModule_Create(&module_def);
}
