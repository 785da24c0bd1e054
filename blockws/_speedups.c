/* Optional C speedups for blockws (built by setup.py when a compiler is present).
 *
 * apply_mask(data, key) -> bytes: XOR ``data`` with the 4-byte ``key`` repeated
 * (RFC 6455 section 5.3). The pure-Python version in blockws/frames.py is the
 * reference and stays complete and tested; this one is used when importable.
 * The loop works a machine word at a time and releases the GIL for large
 * payloads, so the reader, the writer and the game thread can overlap.
 *
 * split_messages(buf, pos, small, out, wrap_binary, wrap_text) -> int: the
 * receive path's fast loop (the pure-Python one is frames.py_split_messages,
 * the reference; the two must agree byte for byte). From ``buf[pos:]`` it
 * takes frame after frame while each is whole, final, unmasked, without RSV
 * bits, text or binary, and at most ``small`` (<= 65535) bytes long; it
 * appends each message to the list ``out`` (binary as ``bytes``, text as a
 * decoded ``str``, passed through ``wrap_binary(data, length)`` and
 * ``wrap_text(text)`` unless those are None) and returns where it stopped.
 * Anything else -- a frame cut short, a control frame, a fragment, a mask,
 * RSV bits, a longer frame, text that is not valid UTF-8 -- stops it before
 * that frame, for the general parser to handle (and to fail on): so it never
 * raises a protocol error itself, and cannot change the order errors are found in.
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

static PyObject *
split_messages(PyObject *self, PyObject *args)
{
    PyObject *buf, *out, *wrap_binary, *wrap_text;
    Py_ssize_t pos, small, end;
    Py_buffer view;
    const unsigned char *p;
    if (!PyArg_ParseTuple(args, "OnnO!OO:split_messages", &buf, &pos, &small, &PyList_Type, &out,
                          &wrap_binary, &wrap_text))
        return NULL;
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) return NULL;
    end = view.len;
    if (pos < 0 || pos > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    if (wrap_binary == Py_None) wrap_binary = NULL;
    if (wrap_text == Py_None) wrap_text = NULL;
    p = (const unsigned char *)view.buf;
    while (end - pos >= 2) {
        unsigned char b0 = p[pos];
        Py_ssize_t n = p[pos + 1], start = pos + 2;
        PyObject *item;
        if (b0 != 0x82 && b0 != 0x81) break;
        if (n >= 126) {
            if (n != 126 || end - pos < 4) break; /* MASK set, a 64-bit length, or cut short */
            n = ((Py_ssize_t)p[start] << 8) | p[pos + 3];
            start = pos + 4;
        }
        if (n > small || n > end - start) break;
        if (b0 == 0x82) {
            item = PyBytes_FromStringAndSize((const char *)p + start, n);
            if (item != NULL && wrap_binary != NULL) {
                PyObject *wrapped = PyObject_CallFunction(wrap_binary, "On", item, n);
                Py_DECREF(item);
                item = wrapped;
            }
        } else {
            item = PyUnicode_DecodeUTF8((const char *)p + start, n, NULL);
            if (item == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                break; /* the general parser fails the connection on it */
            }
            if (item != NULL && wrap_text != NULL) {
                PyObject *wrapped = PyObject_CallOneArg(wrap_text, item);
                Py_DECREF(item);
                item = wrapped;
            }
        }
        if (item == NULL) goto error;
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            goto error;
        }
        Py_DECREF(item);
        pos = start + n;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
error:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"apply_mask", apply_mask, METH_VARARGS, "XOR data with a repeated 4-byte key."},
    {"split_messages", split_messages, METH_VARARGS,
     "Append the whole small unfragmented data messages at buf[pos:] to out; return the end."},
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
