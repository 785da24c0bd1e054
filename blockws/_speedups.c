/* Optional C speedups for blockws (built by setup.py when a compiler is present).
 *
 * apply_mask(data, key) -> bytes: XOR ``data`` with the 4-byte ``key`` repeated
 * (RFC 6455 section 5.3). The pure-Python version in blockws/frames.py is the
 * reference and stays complete and tested; this one is used when importable.
 * The loop works a machine word at a time and releases the GIL for large
 * payloads, so the reader, the writer and the game thread can overlap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define RELEASE_GIL_ABOVE 65536

static void
mask_into(unsigned char *out, const unsigned char *in, Py_ssize_t n, const unsigned char *key)
{
    uint64_t k8;
    unsigned char kb[8];
    Py_ssize_t i = 0;
    for (int j = 0; j < 8; j++) kb[j] = key[j & 3];
    memcpy(&k8, kb, 8);
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, in + i, 8);
        w ^= k8;
        memcpy(out + i, &w, 8);
    }
    for (; i < n; i++) out[i] = in[i] ^ key[i & 3];
}

static PyObject *
apply_mask(PyObject *self, PyObject *args)
{
    Py_buffer data, key;
    PyObject *result;
    if (!PyArg_ParseTuple(args, "y*y*:apply_mask", &data, &key)) return NULL;
    if (key.len != 4) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "mask key must be 4 bytes");
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result != NULL) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
        if (data.len > RELEASE_GIL_ABOVE) {
            Py_BEGIN_ALLOW_THREADS
            mask_into(out, data.buf, data.len, key.buf);
            Py_END_ALLOW_THREADS
        } else {
            mask_into(out, data.buf, data.len, key.buf);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return result;
}

static PyMethodDef methods[] = {
    {"apply_mask", apply_mask, METH_VARARGS, "XOR data with a repeated 4-byte key."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blockws._speedups", "Optional C speedups for blockws.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
