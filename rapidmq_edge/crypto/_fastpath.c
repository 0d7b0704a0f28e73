/*
 * Optional accelerator for the gateway's per-message protection (issue 5).
 *
 * It implements no cryptography: it calls OpenSSL's libcrypto (AES-256-GCM through EVP,
 * SHA-256) exactly as the pure-Python path does through `cryptography` and `hashlib`, with
 * the same inputs and byte-identical outputs (tests/test_crypto_fastpath.py checks both
 * ways). What it saves is the per-call overhead of those bindings: a new cipher context and
 * key schedule per AESGCM.encrypt, an EVP digest context per hashlib.sha256, three Python
 * calls and two temporary objects per message, and one Python call per Merkle node.
 *
 * When it cannot be built (no compiler, no OpenSSL headers: a Raspberry Pi without
 * libssl-dev), `pip install` still succeeds and the package uses the Python path.
 *
 *   GcmSealer(key: bytes[32], common_iv: bytes[12], ext_head: bytes, env_head: bytes)
 *     .seal(seq, plaintext, topic_gw, message_id, leaf_prefix: bytes | None)
 *        -> (envelope, SHA-256(leaf_prefix || SHA-256(envelope)) or None)
 *        (the envelope and AEAD inputs of crypto/envelope.py's Sealer, built here)
 *   leaf(prefix, data) -> SHA-256(prefix || SHA-256(data))
 *   merkle_root(leaves: bytes) -> RFC 9162 MTH over the concatenated 32-byte leaf hashes
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Init & co.: direct, no provider dispatch */
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>

#define TAG_LEN 16
#define NONCE_LEN 12

/* SHA-256(prefix || SHA-256(data)) into out[32] */
static void
leaf_into(const unsigned char *prefix, Py_ssize_t plen, const unsigned char *data,
          Py_ssize_t dlen, unsigned char *out)
{
    unsigned char inner[SHA256_DIGEST_LENGTH];
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, data, (size_t)dlen);
    SHA256_Final(inner, &c);
    SHA256_Init(&c);
    SHA256_Update(&c, prefix, (size_t)plen);
    SHA256_Update(&c, inner, sizeof inner);
    SHA256_Final(out, &c);
}

/* ------------------------------------------------------------------------ GcmSealer */

/* One session of crypto/envelope.py's Sealer: AES-256-GCM key schedule, common IV and the
 * session's constant CBOR heads, kept between messages. */
typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    unsigned char civ[NONCE_LEN];
    PyObject *ext_head; /* bytes: external_aad head up to the Partial IV: [1, 3, sid, */
    PyObject *env_head; /* bytes: envelope head up to the Partial IV: [h'', {4: sid, 6: */
} GcmSealer;

static const unsigned char ENC0_PREFIX[] = "\x83\x68" "Encrypt0" "\x40";

/* CBOR byte-string head (major type 2) for length n into out; returns its size */
static int
bstr_head(unsigned long long n, unsigned char *out)
{
    if (n < 24) { out[0] = (unsigned char)(0x40 + n); return 1; }
    int k = n < 256 ? 1 : n < 65536 ? 2 : n < 4294967296ULL ? 4 : 8;
    out[0] = (unsigned char)(k == 1 ? 0x58 : k == 2 ? 0x59 : k == 4 ? 0x5a : 0x5b);
    for (int i = 0; i < k; i++)
        out[1 + i] = (unsigned char)(n >> (8 * (k - 1 - i)));
    return 1 + k;
}

static int
GcmSealer_init(GcmSealer *self, PyObject *args, PyObject *kwds)
{
    Py_buffer key, civ;
    PyObject *ext_head, *env_head;
    static char *kwlist[] = {"key", "common_iv", "ext_head", "env_head", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*SS", kwlist, &key, &civ, &ext_head,
                                     &env_head))
        return -1;
    int ok = key.len == 32 && civ.len == NONCE_LEN;
    if (!ok)
        PyErr_SetString(PyExc_ValueError,
                        "GcmSealer: key must be 32 bytes (AES-256), common_iv 12 bytes");
    if (ok && self->ctx == NULL && (self->ctx = EVP_CIPHER_CTX_new()) == NULL) {
        PyErr_NoMemory();
        ok = 0;
    }
    if (ok && EVP_EncryptInit_ex(self->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "GcmSealer: EVP_EncryptInit_ex failed");
        ok = 0;
    }
    if (ok) {
        memcpy(self->civ, civ.buf, NONCE_LEN);
        Py_INCREF(ext_head);
        Py_XSETREF(self->ext_head, ext_head);
        Py_INCREF(env_head);
        Py_XSETREF(self->env_head, env_head);
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&civ);
    return ok ? 0 : -1;
}

static void
GcmSealer_dealloc(GcmSealer *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->ctx != NULL)
        EVP_CIPHER_CTX_free(self->ctx);  /* clears the key schedule */
    Py_XDECREF(self->ext_head);
    Py_XDECREF(self->env_head);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* seal(seq, plaintext, topic_gw, message_id, leaf_prefix) -> (envelope, leaf or None)
 *   nonce    = common IV XOR seq (RFC 8613 §5.2, empty sender id)
 *   aad      = ["Encrypt0", h'', << ext_head || bstr(piv) || topic_gw || message_id >>]
 *   envelope = env_head || bstr(piv) || bstr(ciphertext || tag)
 *   leaf     = SHA-256(leaf_prefix || SHA-256(envelope))
 * exactly as Sealer.seal_leaf's Python path builds them. */
static PyObject *
GcmSealer_seal(GcmSealer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "seal(seq, plaintext, topic_gw, message_id, leaf_prefix): 5 arguments");
        return NULL;
    }
    if (self->ctx == NULL || self->ext_head == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "GcmSealer: not initialised");
        return NULL;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[0]);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (seq >= (1ULL << 40)) {
        PyErr_SetString(PyExc_OverflowError, "seal: seq must be below 2**40 (OSCORE)");
        return NULL;
    }
    for (int i = 1; i < 4; i++) {
        if (!PyBytes_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError,
                            "seal: plaintext, topic_gw and message_id must be bytes");
            return NULL;
        }
    }
    if (args[4] != Py_None && !PyBytes_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "seal: leaf_prefix must be bytes or None");
        return NULL;
    }
    const unsigned char *pt = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    Py_ssize_t pt_len = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t tg_len = PyBytes_GET_SIZE(args[2]), mid_len = PyBytes_GET_SIZE(args[3]);
    Py_ssize_t ext_len = PyBytes_GET_SIZE(self->ext_head);
    Py_ssize_t env_len = PyBytes_GET_SIZE(self->env_head);
    if (pt_len > INT_MAX - 64 || tg_len > INT_MAX / 4 || mid_len > INT_MAX / 4) {
        PyErr_SetString(PyExc_OverflowError, "seal: input too large");
        return NULL;
    }
    /* Partial IV: seq in the fewest big-endian bytes (0 -> h'00'), as a CBOR byte string */
    unsigned char piv[6];
    int plen = 1;
    while (plen < 5 && (seq >> (8 * plen)) != 0)
        plen++;
    piv[0] = (unsigned char)(0x40 + plen);
    for (int i = 0; i < plen; i++)
        piv[1 + i] = (unsigned char)(seq >> (8 * (plen - 1 - i)));
    unsigned char nonce[NONCE_LEN];
    memcpy(nonce, self->civ, NONCE_LEN);
    for (int i = 0; i < 5; i++)
        nonce[NONCE_LEN - 1 - i] ^= (unsigned char)(seq >> (8 * i));
    unsigned char aad_head[9], ct_head[9];
    int aad_hlen = bstr_head((unsigned long long)(ext_len + 1 + plen + tg_len + mid_len),
                             aad_head);
    int ct_hlen = bstr_head((unsigned long long)pt_len + TAG_LEN, ct_head);

    Py_ssize_t head_len = env_len + 1 + plen + ct_hlen;
    PyObject *env = PyBytes_FromStringAndSize(NULL, head_len + pt_len + TAG_LEN);
    if (env == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(env);
    memcpy(out, PyBytes_AS_STRING(self->env_head), (size_t)env_len);
    memcpy(out + env_len, piv, (size_t)(1 + plen));
    memcpy(out + env_len + 1 + plen, ct_head, (size_t)ct_hlen);
    int n = 0, fin = 0;
    EVP_CIPHER_CTX *c = self->ctx;
    if (EVP_EncryptInit_ex(c, NULL, NULL, NULL, nonce) != 1
        || EVP_EncryptUpdate(c, NULL, &n, ENC0_PREFIX, (int)sizeof ENC0_PREFIX - 1) != 1
        || EVP_EncryptUpdate(c, NULL, &n, aad_head, aad_hlen) != 1
        || EVP_EncryptUpdate(c, NULL, &n, (const unsigned char *)PyBytes_AS_STRING(
                                 self->ext_head), (int)ext_len) != 1
        || EVP_EncryptUpdate(c, NULL, &n, piv, 1 + plen) != 1
        || EVP_EncryptUpdate(c, NULL, &n, (const unsigned char *)PyBytes_AS_STRING(args[2]),
                             (int)tg_len) != 1
        || EVP_EncryptUpdate(c, NULL, &n, (const unsigned char *)PyBytes_AS_STRING(args[3]),
                             (int)mid_len) != 1
        || EVP_EncryptUpdate(c, out + head_len, &n, pt, (int)pt_len) != 1
        || EVP_EncryptFinal_ex(c, out + head_len + n, &fin) != 1
        || n + fin != pt_len
        || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG_LEN, out + head_len + pt_len) != 1) {
        Py_DECREF(env);
        PyErr_SetString(PyExc_RuntimeError, "GcmSealer: AES-256-GCM encryption failed");
        return NULL;
    }
    if (args[4] == Py_None)
        return Py_BuildValue("(NO)", env, Py_None);
    PyObject *leaf = PyBytes_FromStringAndSize(NULL, SHA256_DIGEST_LENGTH);
    if (leaf == NULL) {
        Py_DECREF(env);
        return NULL;
    }
    leaf_into((const unsigned char *)PyBytes_AS_STRING(args[4]), PyBytes_GET_SIZE(args[4]),
              out, PyBytes_GET_SIZE(env), (unsigned char *)PyBytes_AS_STRING(leaf));
    return Py_BuildValue("(NN)", env, leaf);
}

static PyMethodDef GcmSealer_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))GcmSealer_seal, METH_FASTCALL,
     "seal(seq, plaintext, topic_gw, message_id, leaf_prefix) -> (envelope, leaf or None)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot GcmSealer_slots[] = {
    {Py_tp_doc, "AES-256-GCM with the key schedule kept between messages (OpenSSL EVP)."},
    {Py_tp_init, GcmSealer_init},
    {Py_tp_dealloc, GcmSealer_dealloc},
    {Py_tp_methods, GcmSealer_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec GcmSealer_spec = {
    "rapidmq_edge.crypto._fastpath.GcmSealer", sizeof(GcmSealer), 0,
    Py_TPFLAGS_DEFAULT, GcmSealer_slots,
};

/* ------------------------------------------------------------------------ functions */

static PyObject *
fp_leaf(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "leaf(prefix: bytes, data: bytes)");
        return NULL;
    }
    PyObject *leaf = PyBytes_FromStringAndSize(NULL, SHA256_DIGEST_LENGTH);
    if (leaf == NULL)
        return NULL;
    leaf_into((const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
              (const unsigned char *)PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]),
              (unsigned char *)PyBytes_AS_STRING(leaf));
    return leaf;
}

static PyObject *
fp_merkle_root(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    if (!PyBytes_Check(arg) || PyBytes_GET_SIZE(arg) % SHA256_DIGEST_LENGTH) {
        PyErr_SetString(PyExc_ValueError, "merkle_root: leaves must be n * 32 bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(arg) / SHA256_DIGEST_LENGTH;
    PyObject *root = PyBytes_FromStringAndSize(NULL, SHA256_DIGEST_LENGTH);
    if (root == NULL)
        return NULL;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(root);
    SHA256_CTX c;
    if (n == 0) {  /* RFC 9162: the hash of the empty string */
        SHA256_Init(&c);
        SHA256_Final(dst, &c);
        return root;
    }
    unsigned char *level = PyMem_Malloc((size_t)n * SHA256_DIGEST_LENGTH);
    if (level == NULL) {
        Py_DECREF(root);
        return PyErr_NoMemory();
    }
    memcpy(level, PyBytes_AS_STRING(arg), (size_t)n * SHA256_DIGEST_LENGTH);
    static const unsigned char node_prefix = 0x01;
    /* bottom-up, an odd last node promoted unchanged: RFC 9162's MTH (see merkle.py) */
    while (n > 1) {
        Py_ssize_t pairs = n / 2;
        for (Py_ssize_t i = 0; i < pairs; i++) {
            unsigned char *l = level + 2 * i * SHA256_DIGEST_LENGTH;
            SHA256_Init(&c);
            SHA256_Update(&c, &node_prefix, 1);
            SHA256_Update(&c, l, 2 * SHA256_DIGEST_LENGTH);
            SHA256_Final(level + i * SHA256_DIGEST_LENGTH, &c);
        }
        if (n % 2)
            memmove(level + pairs * SHA256_DIGEST_LENGTH,
                    level + (n - 1) * SHA256_DIGEST_LENGTH, SHA256_DIGEST_LENGTH);
        n = pairs + n % 2;
    }
    memcpy(dst, level, SHA256_DIGEST_LENGTH);
    PyMem_Free(level);
    return root;
}

static PyMethodDef fp_methods[] = {
    {"leaf", (PyCFunction)(void (*)(void))fp_leaf, METH_FASTCALL,
     "leaf(prefix, data) -> SHA-256(prefix || SHA-256(data))"},
    {"merkle_root", fp_merkle_root, METH_O,
     "merkle_root(leaves) -> RFC 9162 Merkle tree hash over n concatenated 32-byte leaves"},
    {NULL, NULL, 0, NULL},
};

static int
fp_exec(PyObject *mod)
{
    PyObject *tp = PyType_FromModuleAndSpec(mod, &GcmSealer_spec, NULL);
    if (tp == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(mod, "GcmSealer", tp);
    Py_DECREF(tp);
    return rc;
}

static PyModuleDef_Slot fp_slots[] = {
    {Py_mod_exec, fp_exec},
    {0, NULL},
};

static struct PyModuleDef fp_module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "Optional OpenSSL fast path for per-message sealing, leaves and Merkle roots.",
    0, fp_methods, fp_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    return PyModuleDef_Init(&fp_module);
}
