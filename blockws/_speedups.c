/* Optional C speedups for blockws (built by setup.py when a compiler is present).
 *
 * apply_mask(data, key) -> bytes: XOR ``data`` with the 4-byte ``key`` repeated
 * (RFC 6455 section 5.3). The pure-Python version in blockws/frames.py is the
 * reference and stays complete and tested; this one is used when importable.
 * The loop works a machine word at a time and releases the GIL for large
 * payloads, so the reader, the writer and the game thread can overlap.
 *
 * encode_frame(first_byte, payload, key) -> bytes: one whole masked frame, a
 * client's: the header for ``len(payload)`` with the MASK bit and ``key``,
 * then the payload masked with it, made in one allocation (the pure-Python
 * frames.py_encode_frame joins the header to apply_mask's result: a second
 * copy of every byte sent, and for a small message three more objects).
 *
 * encode_frames(first, payload, start, limit, keys, budget) -> (frames, next):
 * a large message's masked frames, a batch at a time (the pure-Python
 * frames.py_encode_frames is the reference; the two must agree byte for byte).
 * From ``payload[start:]``, frame after frame of at most ``limit`` bytes of
 * payload, each made as encode_frame makes it with the key ``keys()`` returns
 * for it, until the frames hold ``budget`` bytes or more, or the payload ends
 * (at least one frame: an empty payload gives one empty frame). The frame at
 * offset 0 has ``first`` (RSV bits and opcode) as its first byte, the others
 * a continuation's 0; the last one has FIN. Returns the frames and where the
 * next batch starts (``len(payload)`` after the last). One call for what the
 * writer sends between two looks at its control frames, instead of a
 * generator step, a slice and a call per frame.
 *
 * encode_frames_into(first, payload, start, limit, keys, budget, out) -> (n, next):
 * the same batch written one frame after the other into the writable buffer
 * ``out`` (ValueError if shorter than the batch): ``n`` bytes, nothing
 * allocated (frames.py_encode_frames_into is the reference). A sender that
 * reuses ``out`` sends a large message without a fresh heap block per batch.
 *
 * encode_piece_into(first, payload, start, limit, key, budget, out) -> (n, next):
 * one piece of a frame larger than a batch into ``out`` (its header and key at
 * the frame's start, then at most ``budget`` bytes of its payload masked at
 * their offset in the frame): a fragment of any size goes out through a
 * buffer of a batch (frames.py_encode_piece_into is the reference).
 *
 * lend_each(messages, ws, segment, progress) -> int: on_binary for a run of
 * small binary messages (the pure-Python loop is in blockws/delivery.py, the
 * reference; the two must behave alike). From messages[0] on, while each is
 * an exact ``bytes`` no longer than the segment's buffer and ``ws.on_binary``
 * (looked up per message) is not None: what ``ScratchSegment.lend(message)``
 * does (copy it to the start of the buffer, set ``count``, clear the
 * released mark; lend() is the reference), then
 * ``progress[0]`` becomes the count handed over, then ``on_binary(ws,
 * segment)``. It stops after a callback that kept a reference to the segment
 * (its reference count is not what it was on entry), before any other
 * message, and returns how many it handed over. An exception from lend() or a
 * callback propagates; ``progress[0]`` then tells how many were handed over
 * (the failing callback's message included). No Python code runs between the
 * count and the callback's call, so an interrupt cannot land between them.
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
 *
 * copy_continuations(buf, pos, end, target, m_len, limit, m_frames) -> (pos,
 * m_len, m_frames): a fragmented binary message's continuation frames into
 * its pooled buffer (frames.py_copy_continuations is the reference; the two
 * must agree byte for byte). Takes the whole, non-final, unmasked
 * continuation frames without RSV bits at buf[pos:end] while they fit in
 * ``target`` after ``m_len`` and within ``limit``, copying each payload
 * there; stops before anything else, for Protocol._binary_run's own loop.
 * A 1 MiB message in the default 32 KiB fragments was 30 turns of that loop.
 *
 * scatter_views(into, spare, start, base, length, frames, head) -> list and
 * scan_scattered(headers, head, more, last, n, length, frames) -> (matched, n,
 * take, fin, stop): a scatter plan's places for one ``recvmsg_into`` (the
 * rest of a frame, then a header's and a payload's place a frame), and the
 * frames that read filled whose headers are the guessed ones
 * (Protocol.payload_target; frames.py_scatter_views and py_scan_scattered are
 * the references). A 1 MiB echo in 32 KiB fragments: 6,627 -> 3,796
 * bytecodes a message on the calling thread.
 *
 * BytesBuffer(size): a ``bytes`` object of ``size`` bytes under construction,
 * written through the buffer protocol (writable, as a bytearray is) and then
 * handed out whole by ``take(n)``: its first ``n`` bytes, as that very
 * ``bytes`` object (shrunk in place with _PyBytes_Resize when ``n`` is
 * less). A message that ``receive()`` returns as ``bytes`` is thus read
 * straight into the object it returns: no read of its own per ``recv``, no
 * pieces, no join (the copy that a bytearray assembly would need at its end).
 * The object is nobody else's until ``take()``: it holds the only reference,
 * and ``take()`` refuses (BufferError) while a view of it is still exported,
 * so nothing can write into the ``bytes`` once it is out. After ``take()`` it
 * is empty: its length is 0 and a new view fails (ValueError).
 *
 * inflate_run(buf, pos, decomp, room, limit, budget, inflated, out, wrap,
 * wrap_binary, join_max) -> (pos, inflated, error, detail): the receive path's
 * loop for whole compressed messages, each in one frame (permessage-deflate
 * with context takeover; the pure-Python loop is Protocol._split_deflated
 * with PerMessageDeflate.decode, the reference: the two must agree, errors
 * and their order included). From ``buf[pos:]``, while a frame's first byte
 * is 0xC1 or 0xC2 (FIN, RSV1, text or binary), its MASK bit clear, its
 * length 7- or 16-bit, its payload whole and 1 to ``join_max`` bytes long,
 * and ``budget`` (-1: none) not spent (``inflated`` is what this read
 * inflated so far): it calls ``decomp.decompress(payload + 00 00 ff ff, n)``
 * on the zlib decompress object ``decomp``, for at most ``room`` + 1 bytes
 * in all, adds the length inflated to ``inflated``, checks it, decodes text
 * as UTF-8, appends the message to ``out`` (text through ``wrap(text)``,
 * binary as bytes through ``wrap_binary(data, len(data))``, unless those are
 * None), and goes on; after a message that ended the deflate stream
 * (``decomp.eof``) it stops, as the next one needs a new stream. ``error``
 * is 0, or the first fault found, with the frame that had it consumed (the
 * connection fails on it, so the stream's state after it does not matter):
 * 1, more than ``room`` bytes (or input left over); 2, data after the final
 * deflate block; 3, zlib refused the data (``detail``: its message); 4, more
 * than ``limit`` bytes (-1: no limit); 5, text not UTF-8 (``detail``: the
 * decoder's reason). Other exceptions propagate.
 *
 * SendQueue(lock, owner, refused, control, rest, direct_max, batch,
 * uncompressed): a socket's send queue with ``buffered_amount`` and the flags
 * ``send()`` decides on (blockws.sendqueue.PySendQueue is the reference; the
 * two must behave alike). ``push(opcode, payload, segment, size)`` is all a
 * ``send()`` runs: it takes the socket's lock (``lock.acquire()``, so an
 * interrupted wait raises without holding it), raises ``refused()``'s
 * exception when not open, else claims a direct write or queues the
 * message, counts it and calls ``owner.kick_locked()`` (still under the
 * lock) for a writer that waits or does not run; it releases the lock and,
 * for a direct write, calls ``owner.direct_write(opcode, payload, segment)``.
 * The lock's and the owner's methods are called by name, not kept as bound
 * methods (an idle socket would carry four more objects). No Python code runs
 * while it holds the lock but ``refused`` and ``kick_locked``, and an
 * exception from either propagates with the lock released. The flags are
 * bool members (a byte each; setting one to anything but a bool is a
 * TypeError). The messages are a ring of tuples, let go of when a
 * large one empties (a flood's ring would stay as large as the flood).
 * ``set_fast(transport, fd)`` (a client without extensions on plain TCP,
 * masking with the shared keys: see Sender.attach) lets push() write a claimed
 * direct message of up to 125 bytes itself: framed and masked with a key read
 * from the kernel (getentropy, 64 keys at a time; reset_keys() drops them in a
 * forked child), send(2) with MSG_DONTWAIT, counted in
 * ``transport.bytes_written``, then ``writing`` cleared and the writer kicked
 * for what was queued meanwhile (the lock taken again whatever interrupt
 * lands, which is raised after) and ``owner.close_late()`` once no longer
 * open; a cut write goes to ``owner.direct_part(rest, written)``, one the
 * kernel took nothing of to ``owner.direct_write`` as usual. (PySendQueue's
 * path is the reference: the same steps, keys from frames.shared_mask_keys.)
 *
 * run_pending(dispatcher, pending, run_lock, running, plain): Dispatcher.run()
 * without a budget (blockws.dispatcher's loop is the reference): the items
 * pending at its start, each made ``dispatcher.held`` as it leaves the deque
 * and run; re-entrancy marks set and undone; an uncommitted item put back on
 * an exception; ``_armed`` set and ``_announce()`` called at the end. No
 * eval-breaker point between its steps: interrupts land in callbacks only.
 *
 * receive_whole(conn, data, clock) -> bool: Connection.data_received(data)
 * for a read of nothing but whole small text and binary messages (at most
 * 4 KiB; a request/response exchange's every read), split, counted and posted
 * in one call; False, having changed nothing the Python code does not set
 * again, for any other read (the Python code is the reference; without C,
 * Connection._receive_one takes a read of exactly one small message).
 *
 * read_here(token, read, sink, timeout, wake, held) -> bool:
 * ReadToken.read_here (the Python method is the reference, and what it calls
 * for a token of a class without the slots): a caller's read with the reading
 * lent to it, its bytes held until parsed, what ended the stream handed to
 * the reader thread. Interrupts land only inside the Python calls it makes.
 *
 * gated_recv(sock, size) -> bytes and gated_recv_into(sock, buffer) -> int: a
 * reader thread's blocking recv() (POSIX), which, once data has come, waits
 * for the GIL behind one process-wide gate. A thread waiting for the GIL wakes
 * every switch interval (5 ms) to ask for it; with thousands of sockets, each
 * with a reader thread, a burst of messages left hundreds of threads doing
 * that at once, and the process spent its CPU in the kernel passing the GIL
 * round (W8: 2,000 sockets, 79 % system time, a quarter of the messages
 * delivered). Behind the gate at most one reader waits for the GIL; the rest
 * sleep on the gate without timeouts. The gate is taken only without the GIL
 * and released just after the GIL is taken, so it cannot deadlock with it.
 * Errors are raised as socket.recv raises them (OSError by errno: EAGAIN, from
 * SO_RCVTIMEO, as BlockingIOError); EINTR runs the signal handlers and retries.
 * reset_gate() makes a new gate (after fork(), in the child).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#define HAVE_GATED_RECV 1
#include <sys/types.h>
#include <sys/socket.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
/* SendQueue's small direct writes: send(2) on the descriptor, keys from getentropy(3). */
#define HAVE_FAST_WRITE 1
#include <unistd.h>
#ifdef __APPLE__
#include <sys/random.h>
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* (macOS: SO_NOSIGPIPE; CPython ignores SIGPIPE anyway) */
#endif
#endif

#define RELEASE_GIL_ABOVE 65536

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_MASK 1
#include <immintrin.h>

/* 32 bytes a step with AVX2, chosen at run time (__builtin_cpu_supports):
   the plain loop below does 8, and masking is a tenth of a large send. */
__attribute__((target("avx2"))) static Py_ssize_t
mask_avx2(unsigned char *out, const unsigned char *in, Py_ssize_t n, const unsigned char *key)
{
    Py_ssize_t i = 0;
    uint32_t k4;
    memcpy(&k4, key, 4);
    __m256i k = _mm256_set1_epi32((int)k4);
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(in + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(in + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(in + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(in + i + 96));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_xor_si256(a, k));
        _mm256_storeu_si256((__m256i *)(out + i + 32), _mm256_xor_si256(b, k));
        _mm256_storeu_si256((__m256i *)(out + i + 64), _mm256_xor_si256(c, k));
        _mm256_storeu_si256((__m256i *)(out + i + 96), _mm256_xor_si256(d, k));
    }
    for (; i + 32 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(in + i));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_xor_si256(a, k));
    }
    return i; /* a multiple of 4: the key lines up again */
}

static int use_avx2 = -1;
#endif

static void
mask_into(unsigned char *out, const unsigned char *in, Py_ssize_t n, const unsigned char *key)
{
    uint64_t k8;
    unsigned char kb[8];
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_MASK
    if (n >= 256) {
        if (use_avx2 < 0) {
            __builtin_cpu_init();
            use_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
        }
        if (use_avx2) i = mask_avx2(out, in, n, key);
    }
#endif
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

/* One whole masked frame as a new bytes: the header for n bytes with the MASK
 * bit and the 4-byte key, then src masked with it (the GIL released above
 * RELEASE_GIL_ABOVE). encode_frame's and encode_frames' one way to make one. */
#define HEAD_SIZE(n) ((n) < 126 ? 2 : (n) < 65536 ? 4 : 10)

/* A masked frame's header for n bytes of payload, then its 4-byte key, at
 * out (HEAD_SIZE(n) + 4 bytes); returns HEAD_SIZE(n). */
static Py_ssize_t
write_head(unsigned char *out, int first, Py_ssize_t n, const unsigned char *key)
{
    Py_ssize_t head = HEAD_SIZE(n);
    out[0] = (unsigned char)first;
    if (head == 2) {
        out[1] = (unsigned char)(0x80 | n);
    } else if (head == 4) {
        out[1] = 0x80 | 126;
        out[2] = (unsigned char)(n >> 8);
        out[3] = (unsigned char)n;
    } else {
        uint64_t len = (uint64_t)n;
        out[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++) out[2 + i] = (unsigned char)(len >> (56 - 8 * i));
    }
    memcpy(out + head, key, 4);
    return head;
}

static PyObject *
masked_frame(int first, const unsigned char *src, Py_ssize_t n, const unsigned char *key)
{
    PyObject *frame = PyBytes_FromStringAndSize(NULL, HEAD_SIZE(n) + 4 + n);
    unsigned char *out;
    Py_ssize_t head;
    if (frame == NULL) return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(frame);
    head = write_head(out, first, n, key);
    if (n > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        mask_into(out + head + 4, src, n, key);
        Py_END_ALLOW_THREADS
    } else {
        mask_into(out + head + 4, src, n, key);
    }
    return frame;
}

static PyObject *
encode_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long first;
    Py_buffer data, key;
    PyObject *result = NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_frame() takes 3 arguments");
        return NULL;
    }
    first = PyLong_AsLong(args[0]);
    if (first == -1 && PyErr_Occurred()) return NULL;
    if (first < 0 || first > 255) {
        PyErr_SetString(PyExc_ValueError, "first_byte must be in range(256)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (key.len != 4) {
        PyErr_SetString(PyExc_ValueError, "mask key must be 4 bytes");
        goto done;
    }
    result = masked_frame((int)first, data.buf, data.len, key.buf);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return result;
}

/* encode_frames' and encode_frames_into's first six arguments: first, payload
 * (as data), start, limit, (take: args[4]) and budget; then the batch's frames
 * from payload[start:] counted (at least one), their bytes in *total, and
 * their keys from one take(count) in *keys (*k holds the object). Returns the
 * count, or -1 with an exception set (and nothing held). */
static Py_ssize_t
batch_start(PyObject *const *args, long *first, Py_buffer *data, Py_ssize_t *start,
            Py_ssize_t *limit, Py_ssize_t *total, PyObject **k, Py_buffer *keys)
{
    Py_ssize_t budget, size, count = 0, pos;
    PyObject *n_obj;
    *first = PyLong_AsLong(args[0]);
    if (*first == -1 && PyErr_Occurred()) return -1;
    if (*first < 0 || *first > 0x7F) {
        PyErr_SetString(PyExc_ValueError, "first must be in range(128): RSV bits and opcode");
        return -1;
    }
    *start = PyLong_AsSsize_t(args[2]);
    if (*start == -1 && PyErr_Occurred()) return -1;
    *limit = PyLong_AsSsize_t(args[3]);
    if (*limit == -1 && PyErr_Occurred()) return -1;
    budget = PyLong_AsSsize_t(args[5]);
    if (budget == -1 && PyErr_Occurred()) return -1;
    if (*limit < 1) {
        PyErr_SetString(PyExc_ValueError, "limit must be at least 1");
        return -1;
    }
    if (PyObject_GetBuffer(args[1], data, PyBUF_SIMPLE) < 0) return -1;
    size = data->len;
    if (*start < 0 || *start > size) {
        PyErr_SetString(PyExc_ValueError, "start must be in range(len(payload) + 1)");
        goto fail;
    }
    /* The batch's frames, counted first: their keys come from one take(count). */
    *total = 0;
    pos = *start;
    do {
        Py_ssize_t n = size - pos < *limit ? size - pos : *limit;
        *total += HEAD_SIZE(n) + 4 + n;
        pos += n;
        count++;
    } while (pos < size && *total < budget);
    n_obj = PyLong_FromSsize_t(count);
    if (n_obj == NULL) goto fail;
    *k = PyObject_CallOneArg(args[4], n_obj);
    Py_DECREF(n_obj);
    if (*k == NULL) goto fail;
    if (PyObject_GetBuffer(*k, keys, PyBUF_SIMPLE) < 0) goto fail_k;
    if (keys->len != 4 * count) {
        PyErr_SetString(PyExc_ValueError, "take(count) must give 4 * count bytes of mask keys");
        PyBuffer_Release(keys);
        goto fail_k;
    }
    return count;
fail_k:
    Py_CLEAR(*k);
fail:
    PyBuffer_Release(data);
    return -1;
}

static PyObject *
encode_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long first;
    Py_ssize_t start, limit, size, count, total, i;
    Py_buffer data, keys;
    PyObject *k = NULL, *frames, *result = NULL;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "encode_frames() takes 6 arguments");
        return NULL;
    }
    count = batch_start(args, &first, &data, &start, &limit, &total, &k, &keys);
    if (count < 0) return NULL;
    size = data.len;
    frames = PyList_New(count);
    if (frames == NULL) goto done;
    for (i = 0; i < count; i++) {
        Py_ssize_t n = size - start < limit ? size - start : limit;
        PyObject *frame = masked_frame(
            (start + n >= size ? 0x80 : 0) | (start == 0 ? (int)first : 0),
            (const unsigned char *)data.buf + start, n, (const unsigned char *)keys.buf + 4 * i);
        if (frame == NULL) {
            Py_CLEAR(frames);
            goto done;
        }
        PyList_SET_ITEM(frames, i, frame);
        start += n;
    }
    result = Py_BuildValue("(Nn)", frames, start);
done:
    PyBuffer_Release(&keys);
    Py_XDECREF(k);
    PyBuffer_Release(&data);
    return result;
}

/* encode_frames' batch written one frame after the other into ``out`` (a
 * writable buffer at least as long as the batch) instead of made as new bytes
 * objects; returns (bytes written, next). The GIL is released while a batch
 * of more than RELEASE_GIL_ABOVE bytes is masked. */
static PyObject *
encode_frames_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long first;
    Py_ssize_t start, limit, size, count, total, i, at = 0;
    Py_buffer data, keys, out;
    PyObject *k = NULL, *result = NULL;
    PyThreadState *ts = NULL;
    unsigned char *o;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "encode_frames_into() takes 7 arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[6], &out, PyBUF_WRITABLE) < 0) return NULL;
    count = batch_start(args, &first, &data, &start, &limit, &total, &k, &keys);
    if (count < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (out.len < total) {
        PyErr_SetString(PyExc_ValueError, "out is shorter than the batch");
        goto done;
    }
    size = data.len;
    o = (unsigned char *)out.buf;
    if (total > RELEASE_GIL_ABOVE) ts = PyEval_SaveThread();
    for (i = 0; i < count; i++) {
        Py_ssize_t n = size - start < limit ? size - start : limit;
        const unsigned char *key = (const unsigned char *)keys.buf + 4 * i;
        Py_ssize_t head = write_head(
            o + at, (start + n >= size ? 0x80 : 0) | (start == 0 ? (int)first : 0), n, key);
        mask_into(o + at + head + 4, (const unsigned char *)data.buf + start, n, key);
        at += head + 4 + n;
        start += n;
    }
    if (ts != NULL) PyEval_RestoreThread(ts);
    result = Py_BuildValue("(nn)", at, start);
done:
    PyBuffer_Release(&keys);
    Py_XDECREF(k);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

/* encode_piece_into(first, payload, start, limit, key, budget, out) -> (n, next):
 * one piece of a masked frame larger than a batch, written into out. The
 * message's frames are its payload cut every ``limit`` bytes; ``start`` is in
 * one of them. At a frame's start the piece begins with the frame's header and
 * ``key`` (a fresh key for every frame: the caller's); then at most ``budget``
 * bytes of the frame's payload from ``start``, masked with ``key`` at their
 * offset in the frame, never past the frame's end. A frame of any size then
 * goes out through a buffer of ``budget`` + 14 bytes. The GIL is released
 * while more than RELEASE_GIL_ABOVE bytes are masked. py_encode_piece_into in
 * blockws/frames.py is the reference. */
static PyObject *
encode_piece_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long first;
    Py_ssize_t start, limit, budget, size, off, frame_start, frame_len, n, at = 0;
    Py_buffer data, key, out;
    unsigned char k[4];
    PyObject *result = NULL;
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "encode_piece_into() takes 7 arguments");
        return NULL;
    }
    first = PyLong_AsLong(args[0]);
    if (first == -1 && PyErr_Occurred()) return NULL;
    if (first < 0 || first > 127) {
        PyErr_SetString(PyExc_ValueError, "first must be in range(128): RSV bits and opcode");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    budget = PyLong_AsSsize_t(args[5]);
    if (budget == -1 && PyErr_Occurred()) return NULL;
    if (limit < 1 || budget < 1) {
        PyErr_SetString(PyExc_ValueError, "limit and budget must be at least 1");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[4], &key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (PyObject_GetBuffer(args[6], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&data);
        return NULL;
    }
    size = data.len;
    if (key.len != 4) {
        PyErr_SetString(PyExc_ValueError, "mask key must be 4 bytes");
        goto done;
    }
    if (start < 0 || start >= size) {
        PyErr_SetString(PyExc_ValueError, "start must be in range(len(payload))");
        goto done;
    }
    off = start % limit;
    frame_start = start - off;
    frame_len = size - frame_start < limit ? size - frame_start : limit;
    n = frame_len - off < budget ? frame_len - off : budget;
    if (out.len < (off ? 0 : HEAD_SIZE(frame_len) + 4) + n) {
        PyErr_SetString(PyExc_ValueError, "out is shorter than the piece");
        goto done;
    }
    if (off == 0)
        at = write_head((unsigned char *)out.buf,
                        (frame_start + frame_len >= size ? 0x80 : 0) |
                            (frame_start == 0 ? (int)first : 0),
                        frame_len, (const unsigned char *)key.buf) + 4;
    /* The key turned to the piece's offset in its frame. */
    for (int j = 0; j < 4; j++) k[j] = ((const unsigned char *)key.buf)[(off + j) & 3];
    if (n > RELEASE_GIL_ABOVE) {
        Py_BEGIN_ALLOW_THREADS
        mask_into((unsigned char *)out.buf + at, (const unsigned char *)data.buf + start, n, k);
        Py_END_ALLOW_THREADS
    } else {
        mask_into((unsigned char *)out.buf + at, (const unsigned char *)data.buf + start, n, k);
    }
    result = Py_BuildValue("(nn)", at + n, start + n);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

/* view[a:b] of a memoryview, as the slice syntax makes it. */
static PyObject *
view_slice(PyObject *view, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *start = PyLong_FromSsize_t(a), *stop = NULL, *slice = NULL, *out = NULL;
    if (start == NULL) return NULL;
    stop = PyLong_FromSsize_t(b);
    if (stop != NULL) slice = PySlice_New(start, stop, NULL);
    if (slice != NULL) out = PyObject_GetItem(view, slice);
    Py_DECREF(start);
    Py_XDECREF(stop);
    Py_XDECREF(slice);
    return out;
}

/* scatter_views(into, spare, start, base, length, frames, head) -> list:
 * py_scatter_views in blockws/frames.py (the reference). */
static PyObject *
scatter_views(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *into, *spare, *views, *v;
    Py_ssize_t start, base, length, frames, head, i, k = 0;
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scatter_views() takes 7 arguments");
        return NULL;
    }
    into = args[0];
    spare = args[1];
    if (!PyMemoryView_Check(into) || !PyMemoryView_Check(spare)) {
        PyErr_SetString(PyExc_TypeError, "into and spare must be memoryviews");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    base = PyLong_AsSsize_t(args[3]);
    if (base == -1 && PyErr_Occurred()) return NULL;
    length = PyLong_AsSsize_t(args[4]);
    if (length == -1 && PyErr_Occurred()) return NULL;
    frames = PyLong_AsSsize_t(args[5]);
    if (frames == -1 && PyErr_Occurred()) return NULL;
    head = PyLong_AsSsize_t(args[6]);
    if (head == -1 && PyErr_Occurred()) return NULL;
    if (start < 0 || start > base || length < 1 || head < 1 || frames < 0) {
        PyErr_SetString(PyExc_ValueError, "start, base, length, frames or head out of range");
        return NULL;
    }
    if (frames > (PY_SSIZE_T_MAX - base) / length ||
        base + frames * length > PyObject_Length(into) ||
        frames > PyObject_Length(spare) / head) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the frames do not fit the buffers");
        return NULL;
    }
    views = PyList_New((start < base ? 1 : 0) + 2 * frames);
    if (views == NULL) return NULL;
    if (start < base) {
        v = view_slice(into, start, base);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(views, k++, v);
    }
    for (i = 0; i < frames; i++) {
        v = view_slice(spare, i * head, (i + 1) * head);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(views, k++, v);
        v = view_slice(into, base, base + length);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(views, k++, v);
        base += length;
    }
    return views;
fail:
    Py_DECREF(views); /* (the unset items are NULL: list_dealloc skips them) */
    return NULL;
}

/* scan_scattered(headers, head, more, last, n, length, frames) ->
 * (matched, n, take, fin, stop): py_scan_scattered in blockws/frames.py (the
 * reference, whose docstring says what it returns), without a view or a
 * comparison object a frame. */
static PyObject *
scan_scattered(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer headers, more, last;
    Py_ssize_t head, n, length, frames, matched = 0, take = 0;
    int fin = 0, stop = 0; /* SCAN_MORE */
    PyObject *result = NULL;
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan_scattered() takes 7 arguments");
        return NULL;
    }
    head = PyLong_AsSsize_t(args[1]);
    if (head == -1 && PyErr_Occurred()) return NULL;
    n = PyLong_AsSsize_t(args[4]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    length = PyLong_AsSsize_t(args[5]);
    if (length == -1 && PyErr_Occurred()) return NULL;
    frames = PyLong_AsSsize_t(args[6]);
    if (frames == -1 && PyErr_Occurred()) return NULL;
    if (PyObject_GetBuffer(args[0], &headers, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &more, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&headers);
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &last, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&more);
        PyBuffer_Release(&headers);
        return NULL;
    }
    if (head < 1 || length < 1 || frames < 0 || n < 0 || more.len != head || last.len != head) {
        PyErr_SetString(PyExc_ValueError, "head, length, frames or n out of range");
        goto done;
    }
    if (frames > headers.len / head) {
        PyErr_SetString(PyExc_ValueError, "headers is shorter than the frames");
        goto done;
    }
    while (n >= head && matched < frames) {
        const char *header = (const char *)headers.buf + matched * head;
        if (memcmp(header, more.buf, (size_t)head) == 0) {
            fin = 0;
        } else if (memcmp(header, last.buf, (size_t)head) == 0) {
            fin = 1;
        } else {
            stop = 1; /* SCAN_MISMATCH */
            break;
        }
        n -= head;
        take = n < length ? n : length;
        n -= take;
        matched++;
        if (take < length) {
            stop = 2; /* SCAN_PARTIAL */
            break;
        }
        if (fin) {
            stop = 3; /* SCAN_FIN */
            break;
        }
    }
    result = Py_BuildValue("(nnnOi)", matched, n, take, fin ? Py_True : Py_False, stop);
done:
    PyBuffer_Release(&last);
    PyBuffer_Release(&more);
    PyBuffer_Release(&headers);
    return result;
}

/* The length of items[i]'s payload, or -1 with an exception set. */
static Py_ssize_t
payload_len(PyObject *payload)
{
    Py_buffer view;
    Py_ssize_t n;
    if (PyBytes_CheckExact(payload)) return PyBytes_GET_SIZE(payload);
    if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) return -1;
    n = view.len;
    PyBuffer_Release(&view);
    return n;
}

/* items[i] as (opcode, payload) with the run's rules; 0 when the run stops
 * there, 1 when it goes on (n set), -1 on an error. */
static int
run_item(PyObject *items, Py_ssize_t i, Py_ssize_t limit, long *opcode, PyObject **payload,
         Py_ssize_t *n)
{
    PyObject *item = PyList_GET_ITEM(items, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2) {
        PyErr_SetString(PyExc_TypeError, "each item must be a tuple (opcode, payload, ...)");
        return -1;
    }
    *opcode = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
    if (*opcode == -1 && PyErr_Occurred()) return -1;
    if (*opcode < 0) return 0;
    *payload = PyTuple_GET_ITEM(item, 1);
    *n = payload_len(*payload);
    if (*n < 0) return -1;
    return *n <= limit;
}

/* py_encode_messages in one call: a first pass finds the run and its size,
 * take(count) gives the keys, a second pass writes every frame into one
 * bytes. take() is Python code: the second pass checks again that every item
 * is what the first found, and fails rather than write past the end. */
static PyObject *
encode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *items, *keys = NULL, *out = NULL, *result = NULL;
    Py_ssize_t start, limit, end, total = 0, pos = 0;
    Py_buffer kb;
    long opcode;
    PyObject *payload;
    Py_ssize_t n;
    int r = 0;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "encode_messages() takes 4 arguments");
        return NULL;
    }
    items = args[0];
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "items must be a list");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (start < 0 || start > PyList_GET_SIZE(items)) {
        PyErr_SetString(PyExc_ValueError, "start must be in range(len(items) + 1)");
        return NULL;
    }
    for (end = start; end < PyList_GET_SIZE(items); end++) {
        r = run_item(items, end, limit, &opcode, &payload, &n);
        if (r < 0) return NULL;
        if (r == 0) break;
        total += HEAD_SIZE(n) + 4 + n;
    }
    if (end == start) return Py_BuildValue("(yn)", "", start);
    keys = PyObject_CallFunction(args[3], "n", end - start);
    if (keys == NULL) return NULL;
    if (PyObject_GetBuffer(keys, &kb, PyBUF_SIMPLE) < 0) {
        Py_DECREF(keys);
        return NULL;
    }
    if (kb.len != 4 * (end - start)) {
        PyErr_SetString(PyExc_ValueError, "take(count) must return 4 * count bytes");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) goto done;
    for (Py_ssize_t i = start; i < end; i++) {
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out) + pos;
        const unsigned char *key = (const unsigned char *)kb.buf + 4 * (i - start);
        Py_ssize_t head;
        Py_buffer view;
        if (i >= PyList_GET_SIZE(items) ||
            (r = run_item(items, i, limit, &opcode, &payload, &n)) != 1) {
            if (!PyErr_Occurred() || r >= 0)
                PyErr_SetString(PyExc_RuntimeError, "items changed during encode_messages");
            goto error;
        }
        if (pos + HEAD_SIZE(n) + 4 + n > total) {
            PyErr_SetString(PyExc_RuntimeError, "items changed during encode_messages");
            goto error;
        }
        head = write_head(o, 0x80 | (int)(opcode & 0x0F), n, key);
        if (PyBytes_CheckExact(payload)) {
            mask_into(o + head + 4, (const unsigned char *)PyBytes_AS_STRING(payload), n, key);
        } else {
            if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) goto error;
            if (view.len != n) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_RuntimeError, "items changed during encode_messages");
                goto error;
            }
            mask_into(o + head + 4, view.buf, n, key);
            PyBuffer_Release(&view);
        }
        pos += head + 4 + n;
    }
    if (pos != total) {
        PyErr_SetString(PyExc_RuntimeError, "items changed during encode_messages");
        goto error;
    }
    result = Py_BuildValue("(On)", out, end);
error:
    Py_XDECREF(out);
done:
    PyBuffer_Release(&kb);
    Py_DECREF(keys);
    return result;
}

/* sum(map(len, messages)) for a list: a bytes' or a str's length read in C,
 * anything else's through len() (which may run Python code: the list is
 * read again at every step). */
static PyObject *
total_length(PyObject *self, PyObject *messages)
{
    Py_ssize_t total = 0;
    if (!PyList_Check(messages)) {
        PyErr_SetString(PyExc_TypeError, "total_length() takes a list");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(messages); i++) {
        PyObject *item = PyList_GET_ITEM(messages, i);
        Py_ssize_t n;
        if (PyBytes_CheckExact(item)) {
            n = PyBytes_GET_SIZE(item);
        } else if (PyUnicode_CheckExact(item)) {
            n = PyUnicode_GET_LENGTH(item);
        } else {
            Py_INCREF(item);
            n = PyObject_Size(item);
            Py_DECREF(item);
            if (n < 0) return NULL;
        }
        total += n;
    }
    return PyLong_FromSsize_t(total);
}

static PyObject *str_on_binary = NULL, *str_data = NULL, *str_count = NULL, *str_released = NULL;

static PyObject *
lend_each(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *messages, *ws, *segment, *progress, *data;
    PyObject *out = NULL, *d_count = NULL, *d_released = NULL;
    Py_ssize_t i = 0, base, handed = -1;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "lend_each() takes 4 arguments");
        return NULL;
    }
    messages = args[0];
    ws = args[1];
    segment = args[2];
    progress = args[3];
    if (!PyList_CheckExact(messages) || !PyList_CheckExact(progress) ||
        PyList_GET_SIZE(progress) != 1) {
        PyErr_SetString(PyExc_TypeError, "lend_each(list, ws, segment, [int])");
        return NULL;
    }
    /* The segment's buffer (ScratchSegment keeps a memoryview of it, so a
       callback cannot resize it; its size is checked for each message all the
       same). */
    data = PyObject_GetAttr(segment, str_data);
    if (data == NULL) return NULL;
    if (!PyByteArray_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "lend_each: the segment's data is not a bytearray");
        goto done;
    }
    /* count and _released are set through their descriptors, found once
       (PyObject_SetAttr looks them up for every message), unless the
       segment's type has a __setattr__ of its own. */
    if (Py_TYPE(segment)->tp_setattro == PyObject_GenericSetAttr) {
        d_count = _PyType_Lookup(Py_TYPE(segment), str_count);
        d_released = _PyType_Lookup(Py_TYPE(segment), str_released);
        if (d_count == NULL || Py_TYPE(d_count)->tp_descr_set == NULL || d_released == NULL ||
            Py_TYPE(d_released)->tp_descr_set == NULL) {
            d_count = d_released = NULL;
        } else { /* held: a callback could take them off the class */
            Py_INCREF(d_count);
            Py_INCREF(d_released);
        }
    }
    base = Py_REFCNT(segment);
    while (i < PyList_GET_SIZE(messages)) {
        PyObject *message = PyList_GET_ITEM(messages, i);
        PyObject *handler, *result, *count, *call[3];
        Py_ssize_t n;
        if (!PyBytes_CheckExact(message)) break;
        n = PyBytes_GET_SIZE(message);
        if (n > PyByteArray_GET_SIZE(data)) break;
        /* Looking on_binary up may run Python code (a property), which could
           change the list: the message is held meanwhile. */
        Py_INCREF(message);
        handler = PyObject_GetAttr(ws, str_on_binary);
        if (handler == NULL) {
            Py_DECREF(message);
            goto done;
        }
        if (handler == Py_None || PyByteArray_GET_SIZE(data) < n) {
            Py_DECREF(message);
            Py_DECREF(handler);
            break;
        }
        /* segment.lend(message), in C: ScratchSegment.lend is the reference. */
        memcpy(PyByteArray_AS_STRING(data), PyBytes_AS_STRING(message), n);
        Py_DECREF(message);
        count = PyLong_FromSsize_t(n);
        if (count == NULL ||
            (d_count != NULL
                 ? Py_TYPE(d_count)->tp_descr_set(d_count, segment, count) < 0 ||
                       Py_TYPE(d_released)->tp_descr_set(d_released, segment, Py_False) < 0
                 : PyObject_SetAttr(segment, str_count, count) < 0 ||
                       PyObject_SetAttr(segment, str_released, Py_False) < 0)) {
            Py_XDECREF(count);
            Py_DECREF(handler);
            goto done;
        }
        Py_DECREF(count);
        call[0] = NULL;
        call[1] = ws;
        call[2] = segment;
        result = PyObject_Vectorcall(handler, call + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(handler);
        if (result == NULL) {
            handed = i + 1; /* the failing callback's message was handed over */
            goto done;
        }
        Py_DECREF(result);
        i++;
        if (Py_REFCNT(segment) != base) break; /* kept by the callback */
    }
    out = PyLong_FromSsize_t(i);
done:
    /* progress[0]: how many were handed over, for the caller's put-back when
       an exception leaves -- the call's own, or an interrupt as it returns.
       Set once, here, not before each callback (an exception is kept). */
    {
        PyObject *type, *value, *traceback, *number;
        PyErr_Fetch(&type, &value, &traceback);
        number = PyLong_FromSsize_t(handed < 0 ? i : handed);
        if (number != NULL) {
            PyList_SetItem(progress, 0, number); /* steals number */
        } else if (type == NULL) {
            Py_CLEAR(out); /* the count could not be kept: fail the call */
            PyErr_Fetch(&type, &value, &traceback);
        } else {
            PyErr_Clear(); /* (the first error stands) */
        }
        PyErr_Restore(type, value, traceback);
    }
    Py_XDECREF(d_count);
    Py_XDECREF(d_released);
    Py_DECREF(data);
    return out;
}

static PyObject *
split_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *buf, *out, *wrap_binary, *wrap_text;
    Py_ssize_t pos, small, end;
    Py_buffer view;
    const unsigned char *p;
    /* METH_FASTCALL, the arguments taken by hand: PyArg_ParseTuple's format
       parsing was about 2 k instructions a call, once a read (a W1 round trip
       is about 60 k). */
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "split_messages() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    buf = args[0];
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) return NULL;
    small = PyLong_AsSsize_t(args[2]);
    if (small == -1 && PyErr_Occurred()) return NULL;
    out = args[3];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "split_messages() argument 4 must be list");
        return NULL;
    }
    wrap_binary = args[4];
    wrap_text = args[5];
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

/* inflate_run's first output size for a message (see there). */
#define FIRST_INFLATE 4096

static PyObject *str_decompress = NULL, *str_unconsumed_tail = NULL, *str_eof = NULL,
                *str_unused_data = NULL, *str_reason = NULL, *zlib_error = NULL;

/* The fault found in a message, with the detail (a str) or NULL. */
static PyObject *
run_result(Py_ssize_t pos, Py_ssize_t inflated, int error, PyObject *detail)
{
    if (detail == NULL) {
        detail = Py_None;
        Py_INCREF(detail);
    }
    return Py_BuildValue("nniN", pos, inflated, error, detail);
}

static PyObject *
inflate_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *buf, *decomp, *out, *wrap, *wrap_binary, *first_length = NULL, *result = NULL;
    Py_ssize_t pos, end, room, limit, budget, inflated, join_max, first;
    int followed;
    Py_buffer view;
    const unsigned char *p;
    int error = 0;
    PyObject *detail = NULL;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "inflate_run() takes 11 arguments");
        return NULL;
    }
    buf = args[0];
    decomp = args[2];
    out = args[7];
    wrap = args[8];
    wrap_binary = args[9];
    if (!PyList_CheckExact(out)) {
        PyErr_SetString(PyExc_TypeError, "inflate_run: out must be a list");
        return NULL;
    }
    if (wrap == Py_None) wrap = NULL;
    if (wrap_binary == Py_None) wrap_binary = NULL;
    pos = PyLong_AsSsize_t(args[1]);
    room = PyLong_AsSsize_t(args[3]);
    limit = PyLong_AsSsize_t(args[4]);
    budget = PyLong_AsSsize_t(args[5]);
    inflated = PyLong_AsSsize_t(args[6]);
    join_max = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (room < 0 || room >= PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "inflate_run: room out of range");
        return NULL;
    }
    if (zlib_error == NULL) {
        /* The zlib module's error, found once (decomp's module is zlib). */
        PyObject *zlib = PyImport_ImportModule("zlib");
        if (zlib == NULL) return NULL;
        zlib_error = PyObject_GetAttrString(zlib, "error");
        Py_DECREF(zlib);
        if (zlib_error == NULL) return NULL;
    }
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) return NULL;
    end = view.len;
    if (pos < 0 || pos > end) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto done;
    }
    first_length = PyLong_FromSsize_t(room + 1 < FIRST_INFLATE ? room + 1 : FIRST_INFLATE);
    if (first_length == NULL) goto done;
    first = PyLong_AsSsize_t(first_length);
    p = (const unsigned char *)view.buf;
    while (end - pos >= 2 && (p[pos] == 0xC1 || p[pos] == 0xC2)) {
        Py_ssize_t n = p[pos + 1], start = pos + 2, got;
        PyObject *data, *chunk, *attr, *text, *call[3];
        int eof, binary = p[pos] == 0xC2;
        if (budget >= 0 && inflated && inflated >= budget) break;
        if (n >= 126) {
            if (n != 126 || end - pos < 4) break; /* a mask bit, a 64-bit length, or cut short */
            n = ((Py_ssize_t)p[pos + 2] << 8) | p[pos + 3];
            start = pos + 4;
        }
        if (n > end - start || n < 1 || n > join_max) break;
        data = PyBytes_FromStringAndSize(NULL, n + 4);
        if (data == NULL) goto done;
        memcpy(PyBytes_AS_STRING(data), p + start, n);
        memcpy(PyBytes_AS_STRING(data) + n, "\x00\x00\xff\xff", 4);
        /* At most ``first`` bytes at first: zlib's first output buffer is
           as large as the limit allows, up to 32 KiB, and allocating that
           for every small message was a third of its inflating. Output that
           fills it is followed up from the unconsumed input, up to the room. */
        call[0] = decomp;
        call[1] = data;
        call[2] = first_length;
        chunk = PyObject_VectorcallMethod(str_decompress, call,
                                          3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(data);
        pos = start + n;
        followed = 0;
        if (chunk != NULL && PyBytes_Check(chunk) && PyBytes_GET_SIZE(chunk) == first &&
            first < room + 1) {
            /* The first buffer is full: the rest, up to the room, in one more
               call (the same as one call with the room as the limit). */
            PyObject *rest, *more, *ask;
            followed = 1;
            rest = PyObject_GetAttr(decomp, str_unconsumed_tail);
            ask = rest != NULL ? PyLong_FromSsize_t(room + 1 - first) : NULL;
            more = NULL;
            if (ask != NULL) {
                call[1] = rest;
                call[2] = ask;
                more = PyObject_VectorcallMethod(str_decompress, call,
                                                 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            }
            Py_XDECREF(rest);
            Py_XDECREF(ask);
            if (more != NULL && !PyBytes_Check(more)) {
                Py_CLEAR(more);
                PyErr_SetString(PyExc_TypeError, "inflate_run: decompress() returned no bytes");
            }
            if (more == NULL && !PyErr_ExceptionMatches(zlib_error))
                Py_CLEAR(chunk); /* raised: propagates */
            else
                PyBytes_ConcatAndDel(&chunk, more); /* NULL more: chunk too (zlib's error) */
        }
        if (chunk == NULL) {
            PyObject *type, *value, *tb;
            if (!PyErr_ExceptionMatches(zlib_error)) goto done;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            detail = value != NULL ? PyObject_Str(value) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (detail == NULL) goto done;
            error = 3;
            break;
        }
        if (!PyBytes_Check(chunk)) {
            Py_DECREF(chunk);
            PyErr_SetString(PyExc_TypeError, "inflate_run: decompress() returned no bytes");
            goto done;
        }
        got = PyBytes_GET_SIZE(chunk);
        attr = PyObject_GetAttr(decomp, str_unconsumed_tail);
        if (attr == NULL) {
            Py_DECREF(chunk);
            goto done;
        }
        eof = PyObject_IsTrue(attr); /* input left over: the room was filled */
        Py_DECREF(attr);
        if (eof > 0 && followed && got <= room) {
            /* A follow-up call that reached the stream's end keeps its input
               there as well as in unused_data (CPython's zlib): what counts
               is whether the end came. */
            int ended;
            attr = PyObject_GetAttr(decomp, str_eof);
            ended = attr == NULL ? -1 : PyObject_IsTrue(attr);
            Py_XDECREF(attr);
            eof = ended < 0 ? -1 : !ended;
        }
        if (eof < 0) {
            Py_DECREF(chunk);
            goto done;
        }
        if (eof || got > room) {
            Py_DECREF(chunk);
            error = 1;
            break;
        }
        attr = PyObject_GetAttr(decomp, str_eof);
        if (attr == NULL) {
            Py_DECREF(chunk);
            goto done;
        }
        eof = PyObject_IsTrue(attr);
        Py_DECREF(attr);
        if (eof < 0) {
            Py_DECREF(chunk);
            goto done;
        }
        if (eof) {
            /* A block with BFINAL set: only the tail may follow it. */
            int tail_only;
            attr = PyObject_GetAttr(decomp, str_unused_data);
            if (attr == NULL) {
                Py_DECREF(chunk);
                goto done;
            }
            tail_only = PyBytes_Check(attr) && PyBytes_GET_SIZE(attr) == 4 &&
                        memcmp(PyBytes_AS_STRING(attr), "\x00\x00\xff\xff", 4) == 0;
            Py_DECREF(attr);
            if (!tail_only) {
                Py_DECREF(chunk);
                error = 2;
                break;
            }
        }
        inflated += got;
        if (limit >= 0 && got > limit) {
            Py_DECREF(chunk);
            error = 4;
            break;
        }
        if (binary) {
            if (wrap_binary != NULL) {
                PyObject *length = PyLong_FromSsize_t(got);
                text = NULL;
                if (length != NULL) {
                    call[0] = NULL;
                    call[1] = chunk;
                    call[2] = length;
                    text = PyObject_Vectorcall(wrap_binary, call + 1,
                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
                    Py_DECREF(length);
                }
                Py_DECREF(chunk);
                if (text == NULL) goto done;
            } else {
                text = chunk; /* the message, as bytes: the reference gives zlib's bytes */
            }
            if (PyList_Append(out, text) < 0) {
                Py_DECREF(text);
                goto done;
            }
            Py_DECREF(text);
            if (eof) break; /* the stream ended: the next message starts a new one */
            continue;
        }
        text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(chunk), got, NULL);
        Py_DECREF(chunk);
        if (text == NULL) {
            PyObject *type, *value, *tb;
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) goto done;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            detail = value != NULL ? PyObject_GetAttr(value, str_reason) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (detail == NULL) goto done;
            error = 5;
            break;
        }
        if (wrap != NULL) {
            PyObject *wrapped = PyObject_CallOneArg(wrap, text);
            Py_DECREF(text);
            if (wrapped == NULL) goto done;
            text = wrapped;
        }
        if (PyList_Append(out, text) < 0) {
            Py_DECREF(text);
            goto done;
        }
        Py_DECREF(text);
        if (eof) break; /* the stream ended: the next message starts a new one */
    }
    result = run_result(pos, inflated, error, detail);
    detail = NULL;
done:
    Py_XDECREF(detail);
    Py_XDECREF(first_length);
    PyBuffer_Release(&view);
    return result;
}

#ifdef HAVE_GATED_RECV
static PyThread_type_lock gate = NULL;

/* Reads up to this size go through a buffer on the stack (see gated_recv). */
#define GATED_SMALL 512

/* recv() into buf without the GIL; then the gate, then the GIL. Returns what
   recv() returned; *err is its errno. */
static Py_ssize_t
recv_gated(int fd, char *buf, Py_ssize_t size, int *err)
{
    Py_ssize_t n;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = recv(fd, buf, (size_t)size, 0);
        *err = errno;
        PyThread_acquire_lock(gate, WAIT_LOCK);
        Py_END_ALLOW_THREADS
        PyThread_release_lock(gate);
        if (n >= 0 || *err != EINTR)
            return n;
        if (PyErr_CheckSignals() < 0)
            return -2;
    }
}

static PyObject *
gated_recv(PyObject *self, PyObject *args)
{
    PyObject *sock, *out;
    Py_ssize_t size, n;
    int fd, err;
    if (!PyArg_ParseTuple(args, "On:gated_recv", &sock, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffersize in gated_recv");
        return NULL;
    }
    fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    if (size <= GATED_SMALL) {
        /* A quiet socket's read (RECV_QUIET bytes): into this frame's buffer,
           so that no bytes object is held while the thread blocks, which may
           be for the socket's life (an idle socket kept its 448-byte bytes,
           537 bytes with its header and allocator slack). */
        char small[GATED_SMALL];
        n = recv_gated(fd, small, size, &err);
        if (n < 0) {
            if (n == -1) {
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
            }
            return NULL;
        }
        return PyBytes_FromStringAndSize(small, n);
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    n = recv_gated(fd, PyBytes_AS_STRING(out), size, &err);
    if (n < 0) {
        Py_DECREF(out);
        if (n == -1) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        return NULL;
    }
    if (n != size && _PyBytes_Resize(&out, n) < 0)
        return NULL;
    return out;
}

static PyObject *
gated_recv_into(PyObject *self, PyObject *args)
{
    PyObject *sock;
    Py_buffer view;
    Py_ssize_t n;
    int fd, err;
    if (!PyArg_ParseTuple(args, "Ow*:gated_recv_into", &sock, &view))
        return NULL;
    fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    n = recv_gated(fd, (char *)view.buf, view.len, &err);
    PyBuffer_Release(&view);
    if (n < 0) {
        if (n == -1) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        return NULL;
    }
    return PyLong_FromSsize_t(n);
}

static PyObject *
reset_gate(PyObject *self, PyObject *unused)
{
    /* After fork() the gate may be held by a thread the child does not have:
       a new one (the old one is left as it is). */
    PyThread_type_lock fresh = PyThread_allocate_lock();
    if (fresh == NULL)
        return PyErr_NoMemory();
    gate = fresh;
    Py_RETURN_NONE;
}
#endif

/* copy_continuations(buf, pos, end, target, m_len, limit, m_frames)
   -> (pos, m_len, m_frames): py_copy_continuations in one call (see there,
   blockws/frames.py): the payloads of the whole, non-final, unmasked
   continuation frames with RSV clear at buf[pos:end], copied one after the
   other into target[m_len:] while they fit in it and within limit (-1: no
   limit). Stops before any other frame, which the caller's loop handles. */
static PyObject *
copy_continuations(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view, dest;
    Py_ssize_t pos, end, m_len, limit, m_frames, room;
    const unsigned char *p;
    unsigned char *out;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "copy_continuations takes 7 arguments");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    end = PyLong_AsSsize_t(args[2]);
    m_len = PyLong_AsSsize_t(args[4]);
    limit = PyLong_AsSsize_t(args[5]);
    m_frames = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[3], &dest, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (pos < 0 || end < pos || end > view.len || m_len < 0 || m_len > dest.len) {
        PyBuffer_Release(&dest);
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos, end or m_len out of range");
        return NULL;
    }
    p = (const unsigned char *)view.buf;
    out = (unsigned char *)dest.buf;
    room = dest.len;
    while (end - pos >= 2) {
        Py_ssize_t n = p[pos + 1], start = pos + 2;
        if (p[pos] != 0x00) break; /* not a non-final continuation frame with RSV clear */
        if (n >= 126) {
            if (n == 126) {
                if (end - start < 2) break;
                n = ((Py_ssize_t)p[start] << 8) | p[start + 1];
                start += 2;
            } else if (n == 127) {
                unsigned long long v = 0;
                int i;
                if (end - start < 8) break;
                for (i = 0; i < 8; i++) v = (v << 8) | p[start + i];
                if (v >> 63) break;
                if (v > (unsigned long long)PY_SSIZE_T_MAX) break;
                n = (Py_ssize_t)v;
                start += 8;
            } else {
                break; /* masked (from a server) */
            }
        }
        if (limit >= 0 && (n > limit - m_len || m_frames >= limit)) break;
        if (n > end - start || n > room - m_len) break; /* cut short, or no room */
        memcpy(out + m_len, p + start, (size_t)n);
        m_len += n;
        if (limit >= 0) m_frames += 1;
        pos = start + n;
    }
    PyBuffer_Release(&dest);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnn)", pos, m_len, m_frames);
}

/* -- BytesBuffer (see the module's doc) ----------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *bytes; /* owned, the only reference; NULL once taken */
    Py_ssize_t exports;
} BytesBufferObject;

static PyObject *
BytesBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t size;
    BytesBufferObject *self;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "BytesBuffer() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "n:BytesBuffer", &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "BytesBuffer size must not be negative");
        return NULL;
    }
    self = (BytesBufferObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->exports = 0;
    self->bytes = PyBytes_FromStringAndSize(NULL, size);
    if (self->bytes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
BytesBuffer_dealloc(BytesBufferObject *self)
{
    Py_XDECREF(self->bytes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
BytesBuffer_getbuffer(BytesBufferObject *self, Py_buffer *view, int flags)
{
    if (self->bytes == NULL) {
        PyErr_SetString(PyExc_ValueError, "BytesBuffer already taken");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, PyBytes_AS_STRING(self->bytes),
                          PyBytes_GET_SIZE(self->bytes), 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
BytesBuffer_releasebuffer(BytesBufferObject *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static Py_ssize_t
BytesBuffer_length(BytesBufferObject *self)
{
    return self->bytes == NULL ? 0 : PyBytes_GET_SIZE(self->bytes);
}

static PyObject *
BytesBuffer_take(BytesBufferObject *self, PyObject *arg)
{
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    PyObject *b;
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (self->bytes == NULL) {
        PyErr_SetString(PyExc_ValueError, "BytesBuffer already taken");
        return NULL;
    }
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "BytesBuffer still has views: cannot take it");
        return NULL;
    }
    if (n < 0 || n > PyBytes_GET_SIZE(self->bytes)) {
        PyErr_Format(PyExc_ValueError, "take(%zd) outside a BytesBuffer of %zd bytes", n,
                     PyBytes_GET_SIZE(self->bytes));
        return NULL;
    }
    b = self->bytes;
    self->bytes = NULL;
    if (n != PyBytes_GET_SIZE(b) && _PyBytes_Resize(&b, n) < 0)
        return NULL; /* (b was freed) */
    return b;
}

static PyMethodDef BytesBuffer_methods[] = {
    {"take", (PyCFunction)BytesBuffer_take, METH_O,
     "take(n) -> bytes: the first n bytes, as the bytes object written; the buffer is then empty."},
    {NULL, NULL, 0, NULL},
};

static PyBufferProcs BytesBuffer_as_buffer = {
    (getbufferproc)BytesBuffer_getbuffer,
    (releasebufferproc)BytesBuffer_releasebuffer,
};

static PySequenceMethods BytesBuffer_as_sequence = {
    (lenfunc)BytesBuffer_length, /* sq_length */
};

static PyTypeObject BytesBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0) "blockws._speedups.BytesBuffer", /* tp_name */
    sizeof(BytesBufferObject),                                        /* tp_basicsize */
};

/* -- Dispatcher.run (blockws.dispatcher: the Python loop is the reference) ------------- */

/* (lock and owner methods: shared with SendQueue below) */
static PyObject *str_acquire = NULL, *str_release = NULL, *str_kick_locked = NULL,
                *str_direct_write = NULL, *str_direct_part = NULL, *str_close_late = NULL,
                *str_bytes_written = NULL;

static PyObject *str_running_in = NULL, *str_held = NULL, *str_armed = NULL,
                *str_announce = NULL, *str_popleft = NULL, *str_appendleft = NULL;

/* The Dispatcher's slots run_pending reads and writes (running_in, held,
 * _armed), found once for its type: their offsets in the object, as the
 * type's member descriptors give them. A store there is what setattr does
 * for a slot, without looking the name up (five a run: about a third of an
 * update() with one item pending). Any other type (a subclass that moved
 * them, a Python object without the slots) goes through setattr. */
static PyTypeObject *run_type = NULL; /* (a borrowed pointer, checked by identity) */
static Py_ssize_t off_running_in = -1, off_held = -1, off_armed = -1;

static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name); /* (a slot: its descriptor) */
    PyMemberDef *member;
    Py_ssize_t offset = -1;
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (Py_TYPE(descr) == &PyMemberDescr_Type) {
        member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY)) offset = member->offset;
    }
    Py_DECREF(descr);
    return offset;
}

/* Whether dispatcher's slots are at the cached offsets (found on first use). */
static int
run_slots(PyObject *dispatcher)
{
    PyTypeObject *type = Py_TYPE(dispatcher);
    if (type == run_type) return 1;
    if (run_type != NULL) return 0; /* (one type is cached: the Dispatcher's) */
    off_running_in = slot_offset(type, str_running_in);
    off_held = slot_offset(type, str_held);
    off_armed = slot_offset(type, str_armed);
    if (off_running_in < 0 || off_held < 0 || off_armed < 0) return 0;
    run_type = type; /* (Dispatcher is a module-level class: it outlives every call) */
    Py_INCREF(type);
    return 1;
}

static void
slot_store(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject **addr = (PyObject **)((char *)obj + offset);
    PyObject *old = *addr;
    Py_INCREF(value);
    *addr = value;
    Py_XDECREF(old);
}

/* Set dispatcher.<name> = value; on failure the error is set and -1 returned. */
#define RUN_SET(name, value)                                                            \
    (fast ? (slot_store(dispatcher, off_##name, (value)), 0)                            \
          : PyObject_SetAttr(dispatcher, str_##name, (value)))

/* run_pending(dispatcher, pending, run_lock, running, plain) -> int: what
   Dispatcher.run() does without a budget, in C. The items pending when it
   starts are taken from the front of ``pending`` (a deque) one at a time, each
   becoming ``dispatcher.held`` as it leaves the deque (no Python code runs in
   between), and run as ``fn(arg)``; its result counts (None: 1). With
   ``run_lock`` held and ``running[ident]`` (the module's thread -> depth map)
   and ``dispatcher.running_in`` marking this thread, both undone at the end.
   A callback's exception propagates, and the item still ``held`` (not
   committed) goes back to the front unless it is a ``plain`` one (a post()
   item: entered is run). Then, whatever happened, ``dispatcher._armed`` is set
   and ``dispatcher._announce()`` called if items are pending: as run()'s
   ``finally``. Returns 0 at once with nothing pending, or from inside a run on
   this thread (re-entrant). No eval-breaker point lies between any of these
   steps: an interrupt lands inside a callback, or in the lock's wait. */
static PyObject *
run_pending(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *dispatcher, *pending, *lock, *running, *plain;
    PyObject *me = NULL, *depth = NULL, *res, *ptype = NULL, *pvalue = NULL, *ptb = NULL;
    Py_ssize_t n, i, count = 0;
    long depth_value = 0;
    int failed = 0, fast;
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "run_pending() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    dispatcher = args[0];
    pending = args[1];
    lock = args[2];
    running = args[3];
    plain = args[4];
    fast = run_slots(dispatcher);
    if (!PyDict_CheckExact(running)) {
        PyErr_SetString(PyExc_TypeError, "running must be a dict");
        return NULL;
    }
    n = PyObject_Length(pending);
    if (n <= 0)
        return n < 0 ? NULL : PyLong_FromLong(0);
    me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    if (me == NULL)
        return NULL;
    {
        PyObject *in;
        int same;
        if (fast) {
            in = *(PyObject **)((char *)dispatcher + off_running_in);
            if (in == NULL) { /* (unset: as getattr raises) */
                Py_DECREF(me);
                PyErr_SetString(PyExc_AttributeError, "running_in");
                return NULL;
            }
            Py_INCREF(in);
        } else {
            in = PyObject_GetAttr(dispatcher, str_running_in);
        }
        if (in == NULL) {
            Py_DECREF(me);
            return NULL;
        }
        same = PyObject_RichCompareBool(in, me, Py_EQ);
        Py_DECREF(in);
        if (same != 0) {
            Py_DECREF(me);
            return same < 0 ? NULL : PyLong_FromLong(0);
        }
    }
    res = PyObject_CallMethodNoArgs(lock, str_acquire); /* (interrupted: raises, not held) */
    if (res == NULL) {
        failed = 1;
        goto rearm;
    }
    Py_DECREF(res);
    depth = PyDict_GetItemWithError(running, me); /* borrowed */
    if (depth == NULL && PyErr_Occurred()) {
        failed = 1;
        goto unlock;
    }
    if (depth != NULL) {
        depth_value = PyLong_AsLong(depth);
        if (depth_value == -1 && PyErr_Occurred()) {
            failed = 1;
            goto unlock;
        }
    }
    depth = PyLong_FromLong(depth_value + 1);
    if (depth == NULL || RUN_SET(running_in, me) < 0 ||
        PyDict_SetItem(running, me, depth) < 0) {
        Py_XDECREF(depth);
        failed = 1;
        goto unmark;
    }
    Py_DECREF(depth);
    for (i = 0; i < n; i++) {
        PyObject *item = PyObject_CallMethodNoArgs(pending, str_popleft);
        if (item == NULL) {
            failed = 1;
            break;
        }
        if (RUN_SET(held, item) < 0) { /* (cannot fail on a slot) */
            Py_DECREF(item);
            failed = 1;
            break;
        }
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_DECREF(item);
            PyErr_SetString(PyExc_TypeError, "a dispatcher item is a (function, argument) pair");
            failed = 1;
            break;
        }
        res = PyObject_CallOneArg(PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1));
        Py_DECREF(item);
        if (res == NULL) {
            failed = 1;
            break;
        }
        if (RUN_SET(held, Py_None) < 0) {
            Py_DECREF(res);
            failed = 1;
            break;
        }
        if (res == Py_None) {
            count += 1;
        }
        else {
            Py_ssize_t handled = PyNumber_AsSsize_t(res, PyExc_OverflowError);
            if (handled == -1 && PyErr_Occurred()) {
                Py_DECREF(res);
                failed = 1;
                break;
            }
            count += handled;
        }
        Py_DECREF(res);
    }
    if (failed) {
        /* The item being run goes back to the front unless it committed. */
        PyObject *held;
        PyErr_Fetch(&ptype, &pvalue, &ptb);
        held = PyObject_GetAttr(dispatcher, str_held);
        if (held != NULL && held != Py_None) {
            if (RUN_SET(held, Py_None) == 0 && Py_TYPE(held) != (PyTypeObject *)plain) {
                res = PyObject_CallMethodOneArg(pending, str_appendleft, held);
                Py_XDECREF(res);
            }
        }
        Py_XDECREF(held);
        PyErr_Clear(); /* (the callback's exception is the one raised) */
        PyErr_Restore(ptype, pvalue, ptb);
    }
unmark:
    PyErr_Fetch(&ptype, &pvalue, &ptb);
    if (RUN_SET(running_in, Py_None) < 0)
        PyErr_Clear();
    if (depth_value) {
        depth = PyLong_FromLong(depth_value);
        if (depth == NULL || PyDict_SetItem(running, me, depth) < 0)
            PyErr_Clear();
        Py_XDECREF(depth);
    }
    else if (PyDict_DelItem(running, me) < 0) {
        PyErr_Clear();
    }
    PyErr_Restore(ptype, pvalue, ptb);
unlock:
    PyErr_Fetch(&ptype, &pvalue, &ptb);
    res = PyObject_CallMethodNoArgs(lock, str_release);
    Py_XDECREF(res);
    if (res == NULL)
        PyErr_Clear(); /* (cannot happen while held) */
    PyErr_Restore(ptype, pvalue, ptb);
rearm:
    /* run()'s finally: armed again, and told of what is still pending. */
    PyErr_Fetch(&ptype, &pvalue, &ptb);
    Py_DECREF(me);
    if (RUN_SET(armed, Py_True) < 0) {
        Py_XDECREF(ptype);
        Py_XDECREF(pvalue);
        Py_XDECREF(ptb);
        return NULL;
    }
    n = PyObject_Length(pending);
    if (n > 0) {
        res = PyObject_CallMethodNoArgs(dispatcher, str_announce);
        if (res == NULL) { /* (as a raise in a finally: it replaces the first) */
            Py_XDECREF(ptype);
            Py_XDECREF(pvalue);
            Py_XDECREF(ptb);
            return NULL;
        }
        Py_DECREF(res);
    }
    else if (n < 0) {
        PyErr_Clear();
    }
    if (ptype != NULL || failed) {
        if (ptype == NULL) /* (a failure whose error was cleared: cannot happen) */
            PyErr_SetString(PyExc_SystemError, "run_pending failed without an error");
        else
            PyErr_Restore(ptype, pvalue, ptb);
        return NULL;
    }
    return PyLong_FromSsize_t(count);
}
#undef RUN_SET

/* -- SendQueue (blockws.sendqueue.PySendQueue is the reference) ----------------------- */


typedef struct {
    PyObject_HEAD
    PyObject *lock;    /* the socket's lock: its acquire() and release() */
    PyObject *owner;   /* owner.kick_locked() under the lock: wake or start the writer;
                          owner.direct_write(opcode, payload, segment), lock not held */
    PyObject *refused; /* refused() -> exception, under the lock */
    /* Members Python reads and sets (under the lock): */
    PyObject *control, *rest; /* a list; a list or a tuple (empty: ()) */
    Py_ssize_t buffered, compress_from;
    int direct_max, batch, uncompressed; /* (ints: an idle socket's queue stays in 160 bytes) */
    int fd;          /* the fast path's descriptor (with ``fast``) */
    PyObject *fast;  /* NULL, or the TCP transport small direct writes go to in C */
    char open, direct, direct_ok, writing, waiting, running, large_direct; /* T_BOOL */
    /* The messages: a ring of (opcode, payload, segment, size) tuples. */
    PyObject **items;
    Py_ssize_t head, count, cap;
} SendQueueObject;

static int
sq_true(PyObject *o)
{
    if (o == Py_True)
        return 1;
    if (o == NULL || o == Py_False || o == Py_None)
        return 0;
    {
        int r = PyObject_IsTrue(o);
        if (r < 0) {
            PyErr_Clear(); /* (the members hold bools; anything else counts as true) */
            return 1;
        }
        return r;
    }
}

static int
sq_nonempty(PyObject *o)
{
    if (o != NULL && PyList_CheckExact(o))
        return PyList_GET_SIZE(o) != 0;
    if (o != NULL && PyTuple_CheckExact(o))
        return PyTuple_GET_SIZE(o) != 0;
    return sq_true(o);
}

static void
sq_set(PyObject **field, PyObject *value)
{
    Py_INCREF(value);
    Py_XSETREF(*field, value);
}

static PyObject *
SendQueue_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lock",       "owner", "refused",      "control", "rest",
                             "direct_max", "batch", "uncompressed", NULL};
    PyObject *lock, *owner, *refused, *control, *rest = NULL;
    int direct_max, batch, uncompressed;
    SendQueueObject *self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!Oiii:SendQueue", kwlist, &lock, &owner,
                                     &refused, &PyList_Type, &control, &rest, &direct_max,
                                     &batch, &uncompressed))
        return NULL;
    self = (SendQueueObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    sq_set(&self->lock, lock);
    sq_set(&self->owner, owner);
    sq_set(&self->refused, refused);
    sq_set(&self->control, control);
    sq_set(&self->rest, rest);
    self->open = self->direct = self->writing = self->waiting = self->running = 0;
    self->large_direct = 0;
    self->direct_ok = 1;
    self->buffered = 0;
    self->compress_from = PY_SSIZE_T_MAX;
    self->direct_max = direct_max;
    self->batch = batch;
    self->uncompressed = uncompressed;
    self->items = NULL;
    self->head = self->count = self->cap = 0;
    self->fast = NULL;
    self->fd = -1;
    return (PyObject *)self;
}

static int
SendQueue_traverse(SendQueueObject *self, visitproc visit, void *arg)
{
    Py_ssize_t i;
    Py_VISIT(self->lock);
    Py_VISIT(self->owner);
    Py_VISIT(self->refused);
    Py_VISIT(self->control);
    Py_VISIT(self->rest);
    Py_VISIT(self->fast);
    for (i = 0; i < self->count; i++)
        Py_VISIT(self->items[(self->head + i) % self->cap]);
    return 0;
}

static void
sq_free_items(SendQueueObject *self)
{
    /* Detach the ring first: a payload's finalizer could come back here. */
    PyObject **items = self->items;
    Py_ssize_t head = self->head, count = self->count, cap = self->cap, i;
    self->items = NULL;
    self->head = self->count = self->cap = 0;
    for (i = 0; i < count; i++)
        Py_DECREF(items[(head + i) % cap]);
    PyMem_Free(items);
}

static int
SendQueue_clear(SendQueueObject *self)
{
    Py_CLEAR(self->lock);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->refused);
    Py_CLEAR(self->control);
    Py_CLEAR(self->rest);
    Py_CLEAR(self->fast);
    sq_free_items(self);
    return 0;
}

static void
SendQueue_dealloc(SendQueueObject *self)
{
    PyObject_GC_UnTrack(self);
    SendQueue_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Append ``item`` (a new reference, stolen); -1 on error (the item is released). */
static int
sq_append(SendQueueObject *self, PyObject *item)
{
    if (self->count == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 8, i;
        PyObject **items = PyMem_New(PyObject *, cap);
        if (items == NULL) {
            Py_DECREF(item);
            PyErr_NoMemory();
            return -1;
        }
        for (i = 0; i < self->count; i++)
            items[i] = self->items[(self->head + i) % self->cap];
        PyMem_Free(self->items);
        self->items = items;
        self->head = 0;
        self->cap = cap;
    }
    self->items[(self->head + self->count) % self->cap] = item;
    self->count++;
    return 0;
}

/* Pop the first item (a new reference); the queue must not be empty. An
 * emptied ring larger than its first size is let go of (a flood's ring would
 * otherwise stay as large as the flood was). */
static PyObject *
sq_popleft(SendQueueObject *self)
{
    PyObject *item = self->items[self->head];
    self->head = (self->head + 1) % self->cap;
    self->count--;
    if (self->count == 0) {
        self->head = 0;
        if (self->cap > 64) {
            PyMem_Free(self->items);
            self->items = NULL;
            self->cap = 0;
        }
    }
    return item;
}

/* The body of push_locked: 1 if the caller may write now, 0 if queued, -1 on error. */
static int
sq_push_locked(SendQueueObject *self, PyObject *const *args, long opcode, Py_ssize_t size)
{
    PyObject *item;
    if (self->direct && self->direct_ok && !self->writing && self->count == 0 &&
        !sq_nonempty(self->control) && !sq_nonempty(self->rest) && size <= self->direct_max &&
        (size <= self->batch || self->large_direct) &&
        ((opcode & self->uncompressed) || size < self->compress_from)) {
        self->writing = 1;
        self->direct_ok = 0;
        return 1;
    }
    item = PyTuple_Pack(4, args[0], args[1], args[2], args[3]);
    if (item == NULL || sq_append(self, item) < 0)
        return -1;
    self->buffered += size;
    if (self->waiting || !self->running) {
        PyObject *r = PyObject_CallMethodNoArgs(self->owner, str_kick_locked);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

static int
sq_parse(PyObject *const *args, Py_ssize_t nargs, const char *name, long *opcode,
         Py_ssize_t *size)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s() takes 4 arguments (%zd given)", name, nargs);
        return -1;
    }
    *opcode = PyLong_AsLong(args[0]);
    if (*opcode == -1 && PyErr_Occurred())
        return -1;
    *size = PyLong_AsSsize_t(args[3]);
    if (*size == -1 && PyErr_Occurred())
        return -1;
    if (*size < 0) {
        PyErr_SetString(PyExc_ValueError, "a message's size must not be negative");
        return -1;
    }
    return 0;
}

static PyObject *
SendQueue_push_locked(SendQueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long opcode;
    Py_ssize_t size;
    int r;
    if (sq_parse(args, nargs, "push_locked", &opcode, &size) < 0)
        return NULL;
    r = sq_push_locked(self, args, opcode, size);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* The largest payload the fast path writes: one frame with a 2-byte header. */
#define SQ_FAST_MAX 125

#ifdef HAVE_FAST_WRITE
/* Mask keys for the fast path, read from the kernel 64 at a time (getentropy:
   the source os.urandom reads). Only touched with the GIL held; after fork()
   the child drops what is left (reset_keys, see blockws.sendqueue), so parent
   and child never use the same key. */
static unsigned char sq_keys[256];
static size_t sq_keys_pos = sizeof(sq_keys);

/* 0 with 4 fresh bytes at key, -1 if the kernel gave none (no exception set). */
static int
sq_draw_key(unsigned char *key)
{
    if (sq_keys_pos + 4 > sizeof(sq_keys)) {
        if (getentropy(sq_keys, sizeof(sq_keys)) != 0)
            return -1;
        sq_keys_pos = 0;
    }
    memcpy(key, sq_keys + sq_keys_pos, 4);
    memset(sq_keys + sq_keys_pos, 0, 4); /* (a key is used once) */
    sq_keys_pos += 4;
    return 0;
}
#endif

static PyObject *
sq_reset_keys(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
#ifdef HAVE_FAST_WRITE
    memset(sq_keys, 0, sizeof(sq_keys));
    sq_keys_pos = sizeof(sq_keys);
#endif
    Py_RETURN_NONE;
}

/* An exception kept aside while the lock is taken (see sq_acquire_surely). */
typedef struct {
    PyObject *type, *value, *tb;
} SqPending;

/* Take the lock whatever lands meanwhile: an exception from acquire() (a
   signal handler's, Ctrl-C) is kept in *pending (the first one) and the acquire
   retried, so the bookkeeping after a write always happens. */
static void
sq_acquire_surely(SendQueueObject *self, SqPending *pending)
{
    for (;;) {
        PyObject *res = PyObject_CallMethodNoArgs(self->lock, str_acquire);
        if (res != NULL) {
            Py_DECREF(res);
            return;
        }
        if (pending->type == NULL)
            PyErr_Fetch(&pending->type, &pending->value, &pending->tb);
        else
            PyErr_Clear();
    }
}

/* A cut frame whose rest could not be kept (memory exhausted): the stream is
   broken, so the write is let go of (``writing`` cleared under the lock) and
   the transport aborted (the reader then meets the end: on_closed, 1006), and
   the error propagates from send(). Never leaves the socket stuck writing. */
static int
sq_fast_abandon(SendQueueObject *self, PyObject *transport)
{
    SqPending pending = {NULL, NULL, NULL};
    PyObject *res;
    PyErr_Fetch(&pending.type, &pending.value, &pending.tb);
    sq_acquire_surely(self, &pending);
    self->writing = 0;
    res = PyObject_CallMethodNoArgs(self->lock, str_release);
    Py_XDECREF(res);
    res = PyObject_CallMethod(transport, "abort", NULL);
    Py_XDECREF(res);
    PyErr_Clear();
    PyErr_Restore(pending.type, pending.value, pending.tb);
    return -1;
}

/* A direct write of a small message from a client without extensions, in C:
   frame, mask and send(2) it without blocking, then the bookkeeping
   Sender.direct_write does. 0: done (or handed on); 1: nothing was written, the
   caller goes the usual way (Sender.direct_write writes it, or meets and
   reports the error itself); -1: an error is set. */
static int
sq_fast_write(SendQueueObject *self, PyObject *transport, int fd, long opcode, PyObject *payload)
{
#ifdef HAVE_FAST_WRITE
    unsigned char frame[6 + SQ_FAST_MAX];
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(payload);
    Py_ssize_t n = PyBytes_GET_SIZE(payload), i, total = 6 + n;
    ssize_t sent;
    PyObject *res, *count, *sum;
    SqPending pending = {NULL, NULL, NULL};
    int kick, failed = 0;
    frame[0] = (unsigned char)(0x80 | (opcode & 0x0F));
    frame[1] = (unsigned char)(0x80 | n);
    if (sq_draw_key(frame + 2) < 0)
        return 1;
    for (i = 0; i < n; i++)
        frame[6 + i] = data[i] ^ frame[2 + (i & 3)];
    /* Non-blocking, so the GIL stays held (a few microseconds at most). */
    sent = send(fd, frame, (size_t)total, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent <= 0)
        return 1; /* full, interrupted or failed: nothing written */
    if (sent < total) {
        /* The kernel took part of it: the Sender keeps the rest for its writer. */
        PyObject *rest = PyBytes_FromStringAndSize((const char *)frame + sent, total - sent);
        PyObject *call[3] = {self->owner, rest, NULL};
        if (rest == NULL)
            return sq_fast_abandon(self, transport);
        call[2] = PyLong_FromSsize_t(sent);
        if (call[2] == NULL) {
            Py_DECREF(rest);
            return sq_fast_abandon(self, transport);
        }
        res = PyObject_VectorcallMethod(str_direct_part, call, 3, NULL);
        Py_DECREF(rest);
        Py_DECREF(call[2]);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
        return 0;
    }
    /* Written whole: counted (as try_write counts, while this thread alone
       writes), then as Sender.direct_write ends. */
    {
        PyObject *add = PyLong_FromSsize_t(total);
        count = add == NULL ? NULL : PyObject_GetAttr(transport, str_bytes_written);
        sum = count == NULL ? NULL : PyNumber_Add(count, add);
        Py_XDECREF(add);
        Py_XDECREF(count);
        if (sum == NULL || PyObject_SetAttr(transport, str_bytes_written, sum) < 0)
            failed = 1;
        Py_XDECREF(sum);
    }
    if (failed) { /* (memory exhausted) kept aside while the writing is let go of */
        PyErr_Fetch(&pending.type, &pending.value, &pending.tb);
        failed = 0;
    }
    sq_acquire_surely(self, &pending);
    self->writing = 0;
    kick = self->count != 0 || sq_nonempty(self->control) || sq_nonempty(self->rest);
    if (kick) {
        res = PyObject_CallMethodNoArgs(self->owner, str_kick_locked);
        if (res == NULL)
            failed = 1;
        Py_XDECREF(res);
    }
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        res = PyObject_CallMethodNoArgs(self->lock, str_release);
        Py_XDECREF(res);
        if (res == NULL)
            PyErr_Clear(); /* (cannot happen while held) */
        PyErr_Restore(type, value, tb);
    }
    if (!failed && !self->open) {
        /* Stopped meanwhile: close the transport if the teardown left that to us. */
        res = PyObject_CallMethodNoArgs(self->owner, str_close_late);
        if (res == NULL)
            failed = 1;
        Py_XDECREF(res);
    }
    if (pending.type != NULL) {
        if (failed)
            PyErr_Clear(); /* (the interrupt comes first) */
        PyErr_Restore(pending.type, pending.value, pending.tb);
        return -1;
    }
    return failed ? -1 : 0;
#else
    (void)self;
    (void)transport;
    (void)fd;
    (void)opcode;
    (void)payload;
    return 1;
#endif
}

static PyObject *
SendQueue_set_fast(SendQueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "set_fast() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    {
        long value = PyLong_AsLong(args[1]);
        if (value == -1 && PyErr_Occurred())
            return NULL;
        fd = value < 0 || value > INT_MAX ? -1 : (int)value;
    }
#ifdef HAVE_FAST_WRITE
    if (args[0] != Py_None && fd >= 0) {
        sq_set(&self->fast, args[0]);
        self->fd = fd;
        Py_RETURN_TRUE;
    }
#endif
    Py_CLEAR(self->fast);
    self->fd = -1;
    Py_RETURN_FALSE;
}

static PyObject *
SendQueue_push(SendQueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long opcode;
    Py_ssize_t size;
    int r, fd = -1;
    PyObject *res, *exc = NULL, *type, *value, *tb, *fast = NULL;
    if (sq_parse(args, nargs, "push", &opcode, &size) < 0)
        return NULL;
    res = PyObject_CallMethodNoArgs(self->lock, str_acquire); /* (interrupted: raises) */
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    /* No Python code runs from here to the release but refused() and kick(). */
    if (!self->open) {
        exc = PyObject_CallNoArgs(self->refused);
        r = -1;
    }
    else {
        r = sq_push_locked(self, args, opcode, size);
        if (r == 1 && self->fast != NULL && size <= SQ_FAST_MAX && args[2] == Py_None &&
            PyBytes_CheckExact(args[1]) && PyBytes_GET_SIZE(args[1]) == size) {
            fast = self->fast; /* (read with the lock held: set and cleared under it) */
            Py_INCREF(fast);
            fd = self->fd;
        }
    }
    PyErr_Fetch(&type, &value, &tb);
    res = PyObject_CallMethodNoArgs(self->lock, str_release);
    if (res == NULL) {
        /* (cannot happen while held; keep the first error if there was one) */
        if (type != NULL) {
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        Py_XDECREF(exc);
        Py_XDECREF(fast);
        return NULL;
    }
    Py_DECREF(res);
    PyErr_Restore(type, value, tb);
    if (fast != NULL) { /* claimed, small: the fast path (r == 1, no error) */
        r = sq_fast_write(self, fast, fd, opcode, args[1]);
        Py_DECREF(fast);
        if (r < 0)
            return NULL;
        if (r == 0)
            Py_RETURN_NONE;
    }
    if (exc != NULL) {
        if (PyExceptionInstance_Check(exc))
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        else
            PyErr_SetString(PyExc_TypeError, "refused() must return an exception");
        Py_DECREF(exc);
        return NULL;
    }
    if (r < 0)
        return NULL;
    if (r == 1) { /* claimed: write it now, on this thread, without the lock */
        PyObject *call[4] = {self->owner, args[0], args[1], args[2]};
        return PyObject_VectorcallMethod(str_direct_write, call, 4, NULL);
    }
    Py_RETURN_NONE;
}

static PyObject *
SendQueue_append(SendQueueObject *self, PyObject *item)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 4) {
        PyErr_SetString(PyExc_TypeError, "append() takes an (opcode, payload, segment, size) tuple");
        return NULL;
    }
    Py_INCREF(item);
    if (sq_append(self, item) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
SendQueue_take(SendQueueObject *self, PyObject *arg)
{
    Py_ssize_t limit = PyNumber_AsSsize_t(arg, PyExc_OverflowError), size = 0;
    int closing = 0, segments = 0;
    PyObject *batch;
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    batch = PyList_New(0);
    if (batch == NULL)
        return NULL;
    while (self->count && size < limit) {
        PyObject *item = sq_popleft(self);
        Py_ssize_t n;
        long opcode;
        if (PyList_Append(batch, item) < 0) {
            Py_DECREF(item);
            Py_DECREF(batch);
            return NULL; /* (the item is lost: only on memory exhaustion) */
        }
        Py_DECREF(item);
        n = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 3));
        opcode = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if ((n == -1 || opcode == -1) && PyErr_Occurred()) {
            Py_DECREF(batch);
            return NULL;
        }
        size += n;
        if (opcode < 0)
            closing = 1;
        if (PyTuple_GET_ITEM(item, 2) != Py_None)
            segments = 1;
    }
    return Py_BuildValue("(NnNN)", batch, size, PyBool_FromLong(closing),
                         PyBool_FromLong(segments));
}

static PyObject *
SendQueue_drain(SendQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(self->count);
    Py_ssize_t i = 0;
    if (out == NULL)
        return NULL;
    while (self->count)
        PyList_SET_ITEM(out, i++, sq_popleft(self));
    return out;
}

static Py_ssize_t
SendQueue_length(SendQueueObject *self)
{
    return self->count;
}

static PyMethodDef SendQueue_methods[] = {
    {"push", (PyCFunction)(void (*)(void))SendQueue_push, METH_FASTCALL,
     "push(opcode, payload, segment, size): queue a message, or write it now; see blockws.sendqueue."},
    {"push_locked", (PyCFunction)(void (*)(void))SendQueue_push_locked, METH_FASTCALL,
     "push_locked(opcode, payload, segment, size) -> bool: push's body, lock held; True: write now."},
    {"append", (PyCFunction)SendQueue_append, METH_O,
     "append(item): queue an (opcode, payload, segment, size) tuple as it is."},
    {"take", (PyCFunction)SendQueue_take, METH_O,
     "take(limit) -> (items, size, closing, segments): the writer's next batch."},
    {"drain", (PyCFunction)SendQueue_drain, METH_NOARGS, "drain() -> list: every item, removed."},
    {"set_fast", (PyCFunction)(void (*)(void))SendQueue_set_fast, METH_FASTCALL,
     "set_fast(transport, fd) -> bool: small direct writes in C to fd (None: none)."},
    {NULL, NULL, 0, NULL},
};

#define SQ_MEMBER(name, type) {#name, type, offsetof(SendQueueObject, name), 0, NULL}
static PyMemberDef SendQueue_members[] = {
    SQ_MEMBER(control, T_OBJECT_EX),
    SQ_MEMBER(rest, T_OBJECT_EX),
    SQ_MEMBER(open, T_BOOL),
    SQ_MEMBER(direct, T_BOOL),
    SQ_MEMBER(direct_ok, T_BOOL),
    SQ_MEMBER(writing, T_BOOL),
    SQ_MEMBER(waiting, T_BOOL),
    SQ_MEMBER(running, T_BOOL),
    SQ_MEMBER(large_direct, T_BOOL),
    SQ_MEMBER(buffered, T_PYSSIZET),
    SQ_MEMBER(compress_from, T_PYSSIZET),
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods SendQueue_as_sequence = {
    (lenfunc)SendQueue_length, /* sq_length */
};

static PyTypeObject SendQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0) "blockws._speedups.SendQueue", /* tp_name */
    sizeof(SendQueueObject),                                        /* tp_basicsize */
};

/* -- receive_whole: Connection.data_received's common case, in C ------------------- */

/* The slots receive_whole reads and writes in a Connection, its WSProtocol,
 * Delivery and Dispatcher: their offsets, found once for each class (as
 * run_slots does for the Dispatcher), for up to RX_TYPES classes each (a
 * subclass's may differ). An object of a class without them as plain slots
 * (a test's stand-in), or of one more class, is not taken: the call returns
 * False and the Python code does the work. */
#define RX_MAX 12
#define RX_TYPES 4
typedef struct {
    const char *names[RX_MAX];
    PyTypeObject *types[RX_TYPES];   /* the classes found (strong references) */
    Py_ssize_t offs[RX_TYPES][RX_MAX];
    PyTypeObject *refused[RX_TYPES]; /* classes without them (compared by identity only) */
} SlotTable;

enum { C_PROTO, C_PROTO_LOCK, C_INFLATE_LIMIT, C_QUEUE, C_DELIVERY, C_DISPATCHER, C_TO_INBOX,
       C_HANDLERS, C_LAST_RECEIVED, C_POST, C_DELIVER, C_NUDGE };
static SlotTable conn_slots = {{"_proto", "proto_lock", "_inflate_limit", "queue", "delivery",
                                "dispatcher", "_to_inbox", "handlers", "last_received", "_post",
                                "_deliver", "_nudge"}};
enum { P_BUF, P_FAST, P_PHASE, P_M_OPCODE, P_COMPACT, P_WHOLE_DECODE, P_MAX_SIZE, P_AS_BYTES,
       P_OTHER, P_MORE, P_INFLATED, P_OUTGOING };
static SlotTable proto_slots = {{"_buf", "_fast", "_phase", "_m_opcode", "compact_messages",
                                 "_whole_decode", "max_message_size", "binary_as_bytes",
                                 "other_events", "more", "_inflated", "_outgoing"}};
enum { D_RECEIVED, D_LIMIT, D_DELIVERED, D_TAKEN };
static SlotTable delivery_slots = {{"_received", "limit", "_delivered", "taken"}};
enum { S_PENDING, S_RUNNING_IN };
static SlotTable dispatcher_slots = {{"pending", "running_in"}};

/* The offsets of the table's slots in obj's class, or NULL if it lacks them. */
static const Py_ssize_t *
slot_table_for(SlotTable *table, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    int i, k;
    for (k = 0; k < RX_TYPES && table->types[k] != NULL; k++) {
        if (table->types[k] == type) return table->offs[k];
    }
    if (k == RX_TYPES) return NULL;
    for (i = 0; i < RX_TYPES; i++) {
        if (table->refused[i] == type) return NULL;
    }
    for (i = 0; i < RX_MAX && table->names[i] != NULL; i++) {
        PyObject *name = PyUnicode_InternFromString(table->names[i]);
        if (name == NULL) {
            PyErr_Clear();
            return NULL;
        }
        table->offs[k][i] = slot_offset(type, name);
        Py_DECREF(name);
        if (table->offs[k][i] < 0) {
            for (i = 0; i < RX_TYPES && table->refused[i] != NULL; i++) {
            }
            if (i < RX_TYPES) table->refused[i] = type;
            return NULL;
        }
    }
    Py_INCREF(type); /* (the offsets are this class's: it must outlive them) */
    table->types[k] = type;
    return table->offs[k];
}

/* obj's slot (NULL when unset), a borrowed reference. */
#define SLOT(obj, off, i) (*(PyObject **)((char *)(obj) + (off)[i]))

/* Whether a slot holds the int 0. */
static int
is_zero(PyObject *v)
{
    return v != NULL && PyLong_CheckExact(v) && PyObject_Not(v) == 1;
}

/* Whether data[0:n] is nothing but whole unmasked final text or binary frames
 * of at most 65535 bytes: what split_messages takes in one go. */
static int
whole_small_frames(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_ssize_t len, start;
        if (n - pos < 2 || (p[pos] != 0x81 && p[pos] != 0x82)) return 0;
        len = p[pos + 1];
        start = pos + 2;
        if (len >= 126) {
            if (len != 126 || n - pos < 4) return 0;
            len = ((Py_ssize_t)p[pos + 2] << 8) | p[pos + 3];
            start = pos + 4;
        }
        if (len > n - start) return 0;
        pos = start + len;
    }
    return 1;
}

/* receive_whole(conn, data, clock) -> bool: Connection.data_received(data) for a
 * read of whole small messages (every read of a request/response exchange),
 * or False having done nothing that data_received would not do again.
 *
 * Taken when ``data`` is a ``bytes`` of at most RX_WHOLE_MAX bytes holding
 * only whole unmasked final text and binary frames, each within the
 * protocol's max_message_size, text valid UTF-8; the socket inflates nothing
 * (no ``_inflate_limit``); its protocol is between messages with nothing
 * held, without extensions, set for compact messages and with no frame of
 * its own to send. Then, as the Python code: ``last_received = clock()``,
 * ``queue.direct_ok = True``, the protocol's ``binary_as_bytes`` from the
 * handlers, the messages split under ``proto_lock`` (as receive_data's first
 * step, setting other_events, more and _inflated as it does), counted with
 * the delivery (its slow path, at the limit, is ``delivery.received(size)``),
 * and posted: straight to receive()'s inbox when data_received would put them
 * there, else ``conn._post(conn._deliver, messages)``; ``conn._pause_reading()``
 * when the delivery is full. An exception from a Python call (the lock's
 * acquire, the post) propagates, as it would from data_received. */
#define RX_WHOLE_MAX 4096
static PyObject *str_new_inbox = NULL, *str_extend = NULL, *str_on_message = NULL,
                *str_pause_reading = NULL, *str_direct_ok = NULL;

static PyObject *
receive_whole(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *conn, *data, *proto, *lock, *v, *handlers, *on_binary, *events = NULL, *res;
    PyObject *delivery, *dispatcher;
    const Py_ssize_t *coff, *poff = NULL, *doff = NULL, *soff = NULL;
    const unsigned char *p;
    Py_ssize_t n, pos = 0, small = 65535, size = 0;
    int full = 0, inbox = 0, ok = 0;
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "receive_whole() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    conn = args[0];
    data = args[1];
    if (!PyBytes_CheckExact(data)) Py_RETURN_FALSE;
    n = PyBytes_GET_SIZE(data);
    p = (const unsigned char *)PyBytes_AS_STRING(data);
    if (n == 0 || n > RX_WHOLE_MAX || !whole_small_frames(p, n)) Py_RETURN_FALSE;
    coff = slot_table_for(&conn_slots, conn);
    if (coff == NULL) Py_RETURN_FALSE;
    proto = SLOT(conn, coff, C_PROTO);
    lock = SLOT(conn, coff, C_PROTO_LOCK);
    delivery = SLOT(conn, coff, C_DELIVERY);
    dispatcher = SLOT(conn, coff, C_DISPATCHER);
    handlers = SLOT(conn, coff, C_HANDLERS);
    if (proto == NULL || proto == Py_None || lock == NULL || delivery == NULL ||
        dispatcher == NULL || handlers == NULL || SLOT(conn, coff, C_QUEUE) == NULL ||
        SLOT(conn, coff, C_INFLATE_LIMIT) != Py_None ||
        SLOT(conn, coff, C_POST) == NULL || SLOT(conn, coff, C_DELIVER) == NULL ||
        (poff = slot_table_for(&proto_slots, proto)) == NULL ||
        (doff = slot_table_for(&delivery_slots, delivery)) == NULL ||
        (soff = slot_table_for(&dispatcher_slots, dispatcher)) == NULL)
        Py_RETURN_FALSE;
    /* Held across the calls below, which could run Python code. */
    Py_INCREF(proto);
    Py_INCREF(lock);
    Py_INCREF(delivery);
    Py_INCREF(dispatcher);
    Py_INCREF(handlers);
    v = PyObject_CallNoArgs(args[2]);
    if (v == NULL) goto error;
    slot_store(conn, coff[C_LAST_RECEIVED], v);
    Py_DECREF(v);
    v = SLOT(conn, coff, C_QUEUE); /* (set: clock() is time.monotonic, or a test's clock) */
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "queue");
        goto error;
    }
    if (Py_TYPE(v) == &SendQueueType) {
        ((SendQueueObject *)v)->direct_ok = 1;
    } else if (PyObject_SetAttr(v, str_direct_ok, Py_True) < 0) {
        goto error;
    }
    on_binary = PyObject_GetAttr(handlers, str_on_binary);
    if (on_binary == NULL) goto error;
    slot_store(proto, poff[P_AS_BYTES], on_binary == Py_None ? Py_True : Py_False);
    Py_DECREF(on_binary);
    res = PyObject_CallMethodNoArgs(lock, str_acquire);
    if (res == NULL) goto error;
    Py_DECREF(res);
    /* -- under proto_lock -- */
    v = SLOT(proto, poff, P_BUF);
    if (v == NULL || !PyBytes_CheckExact(v) || PyBytes_GET_SIZE(v) != 0) goto release;
    if (SLOT(proto, poff, P_FAST) != Py_True ||
        SLOT(proto, poff, P_COMPACT) != Py_True ||
        SLOT(proto, poff, P_WHOLE_DECODE) != Py_None ||
        !is_zero(SLOT(proto, poff, P_PHASE)) ||
        !is_zero(SLOT(proto, poff, P_M_OPCODE)))
        goto release;
    v = SLOT(proto, poff, P_OUTGOING);
    if (v == NULL || !PyList_CheckExact(v) || PyList_GET_SIZE(v) != 0) goto release;
    v = SLOT(proto, poff, P_MAX_SIZE);
    if (v == NULL) goto release;
    if (v != Py_None) {
        Py_ssize_t limit;
        if (!PyLong_CheckExact(v)) goto release;
        limit = PyLong_AsSsize_t(v);
        if (limit == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto release;
        }
        if (limit < small) small = limit;
    }
    events = PyList_New(0);
    if (events == NULL) goto release;
    while (pos < n) {
        unsigned char b0 = p[pos];
        Py_ssize_t len = p[pos + 1], start = pos + 2;
        PyObject *item;
        if (len == 126) {
            len = ((Py_ssize_t)p[pos + 2] << 8) | p[pos + 3];
            start = pos + 4;
        }
        if (len > small) break; /* the general parser fails the connection on it */
        if (b0 == 0x82) {
            item = PyBytes_FromStringAndSize((const char *)p + start, len);
        } else {
            item = PyUnicode_DecodeUTF8((const char *)p + start, len, NULL);
            if (item == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                break; /* (as above) */
            }
        }
        if (item == NULL) break;
        if (PyList_Append(events, item) < 0) {
            Py_DECREF(item);
            break;
        }
        size += b0 == 0x82 ? len : PyUnicode_GET_LENGTH(item);
        Py_DECREF(item);
        pos = start + len;
    }
    if (pos == n) {
        PyObject *zero = PyLong_FromLong(0);
        if (zero != NULL) {
            ok = 1;
            slot_store(proto, poff[P_OTHER], zero);
            slot_store(proto, poff[P_INFLATED], zero);
            slot_store(proto, poff[P_MORE], Py_False);
            Py_DECREF(zero);
        }
    }
release:
    {
        /* The lock is let go whatever happened; an error kept meanwhile stands. */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        res = PyObject_CallMethodNoArgs(lock, str_release);
        if (type != NULL) {
            Py_XDECREF(res);
            PyErr_Restore(type, value, traceback);
            goto error;
        }
        if (res == NULL) goto error;
        Py_DECREF(res);
    }
    if (!ok) {
        Py_XDECREF(events);
        events = NULL;
        goto declined;
    }
    /* delivery.received(size), its common case: under the limit. */
    {
        PyObject *received = SLOT(delivery, doff, D_RECEIVED),
                 *limit = SLOT(delivery, doff, D_LIMIT),
                 *delivered = SLOT(delivery, doff, D_DELIVERED),
                 *taken = SLOT(delivery, doff, D_TAKEN);
        long long r, d, t, l = 0;
        int slow = received == NULL || limit == NULL || delivered == NULL || taken == NULL ||
                   !PyLong_CheckExact(received) || !PyLong_CheckExact(delivered) ||
                   !PyLong_CheckExact(taken) || (limit != Py_None && !PyLong_CheckExact(limit));
        if (!slow) {
            r = PyLong_AsLongLong(received);
            d = PyLong_AsLongLong(delivered);
            t = PyLong_AsLongLong(taken);
            if (limit != Py_None) l = PyLong_AsLongLong(limit);
            if (PyErr_Occurred()) {
                PyErr_Clear();
                slow = 1;
            } else if (limit != Py_None && r + size - d - t >= l) {
                slow = 1;
            }
        }
        if (slow) {
            res = PyObject_CallMethod(delivery, "received", "n", size);
            if (res == NULL) goto error;
            full = PyObject_IsTrue(res);
            Py_DECREF(res);
            if (full < 0) goto error;
        } else {
            v = PyLong_FromLongLong(r + size);
            if (v == NULL) goto error;
            slot_store(delivery, doff[D_RECEIVED], v);
            Py_DECREF(v);
        }
    }
    /* Straight to receive()'s inbox, or through the dispatcher (see data_received). */
    if (SLOT(conn, coff, C_TO_INBOX) == Py_True) {
        PyObject *pending = SLOT(dispatcher, soff, S_PENDING);
        Py_ssize_t queued = pending == NULL ? 1 : PyObject_Length(pending);
        if (queued < 0) goto error;
        if (queued == 0 && SLOT(dispatcher, soff, S_RUNNING_IN) == Py_None) {
            PyObject *on_message = PyObject_GetAttr(handlers, str_on_message);
            int no_handler;
            if (on_message == NULL) goto error;
            no_handler = on_message == Py_None;
            Py_DECREF(on_message);
            if (no_handler) {
                on_binary = PyObject_GetAttr(handlers, str_on_binary);
                if (on_binary == NULL) goto error;
                inbox = on_binary == Py_None;
                Py_DECREF(on_binary);
            }
        }
    }
    if (inbox) {
        PyObject *box = PyObject_CallMethodNoArgs(delivery, str_new_inbox);
        if (box == NULL) goto error;
        res = PyObject_CallMethodOneArg(box, str_extend, events);
        Py_DECREF(box);
        if (res == NULL) goto error;
        Py_DECREF(res);
        v = SLOT(conn, coff, C_NUDGE);
        if (v == NULL) {
            PyErr_SetString(PyExc_AttributeError, "_nudge");
            goto error;
        }
        Py_INCREF(v);
        res = PyObject_CallNoArgs(v);
        Py_DECREF(v);
    } else {
        PyObject *call[3], *post = SLOT(conn, coff, C_POST), *deliver = SLOT(conn, coff, C_DELIVER);
        if (post == NULL || deliver == NULL) {
            PyErr_SetString(PyExc_AttributeError, post == NULL ? "_post" : "_deliver");
            goto error;
        }
        Py_INCREF(post);
        Py_INCREF(deliver);
        call[0] = NULL;
        call[1] = deliver;
        call[2] = events;
        res = PyObject_Vectorcall(post, call + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(post);
        Py_DECREF(deliver);
    }
    if (res == NULL) goto error;
    Py_DECREF(res);
    if (full) {
        res = PyObject_CallMethodNoArgs(conn, str_pause_reading);
        if (res == NULL) goto error;
        Py_DECREF(res);
    }
    Py_DECREF(events);
    Py_DECREF(proto);
    Py_DECREF(lock);
    Py_DECREF(delivery);
    Py_DECREF(dispatcher);
    Py_DECREF(handlers);
    Py_RETURN_TRUE;
declined:
    Py_DECREF(proto);
    Py_DECREF(lock);
    Py_DECREF(delivery);
    Py_DECREF(dispatcher);
    Py_DECREF(handlers);
    Py_RETURN_FALSE;
error:
    Py_XDECREF(events);
    Py_DECREF(proto);
    Py_DECREF(lock);
    Py_DECREF(delivery);
    Py_DECREF(dispatcher);
    Py_DECREF(handlers);
    return NULL;
}

/* -- read_here: ReadToken.read_here, in C ------------------------------------------- */

/* The ReadToken's slots read_here reads and writes (see SlotTable). */
enum { T_LOCK, T_COND, T_LENT, T_BUSY, T_READS, T_ENDED, T_WAKE, T_CANCELLED, T_HELD,
       T_WANTED };
static SlotTable token_slots = {{"_lock", "_cond", "_lent", "_busy", "_reads", "_ended",
                                 "_wake", "_cancelled", "_held", "wanted"}};
static PyObject *str_read_here = NULL, *str_notify_all = NULL, *str_data_received = NULL,
                *connection_lost = NULL, *py_read_here = NULL;

/* token._reads += 1 (an int slot); -1 with an error set on failure. */
static int
token_count_read(PyObject *token, const Py_ssize_t *toff)
{
    PyObject *reads = SLOT(token, toff, T_READS), *v;
    if (reads == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_reads");
        return -1;
    }
    {
        long long r = PyLong_AsLongLong(reads);
        if (r == -1 && PyErr_Occurred()) return -1;
        v = PyLong_FromLongLong(r + 1);
    }
    if (v == NULL) return -1;
    slot_store(token, toff[T_READS], v);
    Py_DECREF(v);
    return 0;
}

/* ConnectionLost("interrupted (Name) while parsing incoming data") from exc,
 * its __cause__; NULL with an error set if it cannot be made. */
static PyObject *
interrupted_while_parsing(PyObject *exc)
{
    PyObject *lost;
    if (connection_lost == NULL) {
        PyObject *mod = PyImport_ImportModule("blockws.exceptions");
        if (mod == NULL) return NULL;
        connection_lost = PyObject_GetAttrString(mod, "ConnectionLost");
        Py_DECREF(mod);
        if (connection_lost == NULL) return NULL;
    }
    lost = PyObject_CallFunction(connection_lost, "N",
                                 PyUnicode_FromFormat("interrupted (%s) while parsing incoming data",
                                                      _PyType_Name(Py_TYPE(exc))));
    if (lost == NULL) return NULL;
    Py_INCREF(exc);
    PyException_SetCause(lost, exc); /* (steals the reference) */
    return lost;
}

/* The exception being raised as a 1-tuple, (exc,) with its traceback, and the
 * error cleared: what ``except Exception as exc: ended = (exc,)`` keeps. NULL
 * with an error set if the tuple cannot be made. */
static PyObject *
caught_as_ended(void)
{
    PyObject *type, *value, *tb, *ended;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    ended = PyTuple_Pack(1, value);
    Py_DECREF(value);
    return ended;
}

/* A step of read_here's ``finally`` failed: its error is the one raised if no
 * error is kept yet (*type NULL), else it is dropped for the one kept. */
static void
keep_first_error(PyObject **type, PyObject **value, PyObject **tb, int *failed)
{
    if (*type == NULL) {
        *failed = 1;
        PyErr_Fetch(type, value, tb);
    } else {
        PyErr_Clear();
    }
}

/* read_here(token, read, sink, timeout, wake, held) -> bool: what
 * ReadToken.read_here(token, read, sink, timeout, wake, held) does (the Python
 * method is the reference, and is what this calls for a token of a class
 * without the slots, or a ``held`` that is not a list). The steps are the
 * same; between them no eval-breaker point comes, so an interrupt lands only
 * inside the Python calls it makes (the lock's acquire, ``read``,
 * ``sink.data_received``, the condition's notify), each handled where the
 * Python method handles it. */
static PyObject *
read_here(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *token, *read, *sink, *timeout, *wake, *held, *lock, *res, *data = NULL;
    PyObject *ended = NULL; /* (what ended the stream: a tuple, as the Python code's) */
    const Py_ssize_t *toff;
    int busy = 0, parsing = 0, failed = 0;
    (void)module;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "read_here() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    token = args[0];
    read = args[1];
    sink = args[2];
    timeout = args[3];
    wake = args[4];
    held = args[5];
    toff = slot_table_for(&token_slots, token);
    if (toff == NULL || (held != Py_None && !PyList_CheckExact(held)) ||
        SLOT(token, toff, T_LOCK) == NULL) {
        /* The reference: blockws.readtoken.ReadToken.read_here (the function, not
         * the token's method, which may be this one). */
        if (py_read_here == NULL) {
            PyObject *mod = PyImport_ImportModule("blockws.readtoken"), *cls;
            if (mod == NULL) return NULL;
            cls = PyObject_GetAttrString(mod, "ReadToken");
            Py_DECREF(mod);
            if (cls == NULL) return NULL;
            py_read_here = PyObject_GetAttr(cls, str_read_here);
            Py_DECREF(cls);
            if (py_read_here == NULL) return NULL;
        }
        return PyObject_Vectorcall(py_read_here, args, 6, NULL);
    }
    lock = SLOT(token, toff, T_LOCK);
    Py_INCREF(lock);
    /* with lock: lent to a caller, and no caller inside a read? */
    res = PyObject_CallMethodNoArgs(lock, str_acquire); /* (interrupted: raises, not held) */
    if (res == NULL) {
        Py_DECREF(lock);
        return NULL;
    }
    Py_DECREF(res);
    if (SLOT(token, toff, T_LENT) != Py_True || SLOT(token, toff, T_BUSY) != Py_False ||
        SLOT(token, toff, T_CANCELLED) != Py_False) {
        int wish = 0;
        if (SLOT(token, toff, T_LENT) == Py_False && SLOT(token, toff, T_ENDED) == Py_None &&
            SLOT(token, toff, T_CANCELLED) == Py_False) {
            if (timeout == Py_None) {
                wish = 1;
            } else {
                PyObject *zero = PyLong_FromLong(0);
                wish = zero == NULL ? -1 : PyObject_RichCompareBool(timeout, zero, Py_NE);
                Py_XDECREF(zero);
            }
        }
        if (wish > 0) {
            slot_store(token, toff[T_WANTED], Py_True);
            slot_store(token, toff[T_WAKE], wake);
        }
        /* (the lock is let go whatever happened; an error kept meanwhile stands) */
        {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            res = PyObject_CallMethodNoArgs(lock, str_release);
            Py_DECREF(lock);
            if (type != NULL) {
                Py_XDECREF(res);
                PyErr_Restore(type, value, tb);
                return NULL;
            }
            if (res == NULL) return NULL;
            Py_DECREF(res);
        }
        Py_RETURN_FALSE;
    }
    busy = 1;
    slot_store(token, toff[T_BUSY], Py_True);
    res = PyObject_CallMethodNoArgs(lock, str_release);
    if (res == NULL) {
        failed = 1;
        goto done;
    }
    Py_DECREF(res);
    if (held == Py_None) {
        held = SLOT(token, toff, T_HELD);
        if (held == NULL || held == Py_None) {
            PyObject *fresh = PyList_New(0);
            if (fresh == NULL) {
                failed = 1;
                goto done;
            }
            slot_store(token, toff[T_HELD], fresh);
            Py_DECREF(fresh);
            held = SLOT(token, toff, T_HELD);
        } else if (!PyList_CheckExact(held)) {
            PyErr_SetString(PyExc_TypeError, "ReadToken._held must be a list");
            failed = 1;
            goto done;
        }
    }
    Py_INCREF(held);
    /* data = held[0] if held else read(timeout); a network failure is handed on. */
    if (PyList_GET_SIZE(held) > 0) {
        data = PyList_GET_ITEM(held, 0);
        Py_INCREF(data);
    } else {
        data = PyObject_CallOneArg(read, timeout);
        if (data == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                /* (A KeyboardInterrupt while waiting propagates; what was read stays held.) */
                failed = 1;
                goto done_held;
            }
            ended = caught_as_ended();
            if (ended == NULL) {
                failed = 1;
                goto done_held;
            }
        }
    }
    if (data != NULL) {
        int truth = PyObject_IsTrue(data);
        Py_ssize_t k = PyList_GET_SIZE(held);
        if (truth < 0) {
            failed = 1;
            goto done_held;
        }
        if (truth && (k == 0 || (PyList_GET_ITEM(held, k - 1) != data &&
                                 PyList_GET_ITEM(held, 0) != data))) {
            if (PyList_Append(held, data) < 0) {
                failed = 1;
                goto done_held;
            }
        } else if (!truth && data != Py_None && ended == NULL) {
            ended = PyTuple_Pack(1, Py_None); /* end of stream */
            if (ended == NULL) {
                failed = 1;
                goto done_held;
            }
        }
    }
    if (PyList_GET_SIZE(held) > 0 && ended == NULL) {
        PyObject *first = PyList_GET_ITEM(held, 0);
        Py_INCREF(first);
        parsing = 1;
        res = PyObject_CallMethodOneArg(sink, str_data_received, first);
        Py_DECREF(first);
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                /* Interrupted inside the parser: the stream cannot be resumed. */
                PyObject *type, *value, *tb, *lost;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_NormalizeException(&type, &value, &tb);
                if (tb != NULL) PyException_SetTraceback(value, tb);
                lost = interrupted_while_parsing(value);
                if (lost == NULL) {
                    PyErr_Clear();
                    lost = Py_NewRef(value); /* (cannot make it: the interrupt itself) */
                }
                ended = PyTuple_Pack(1, lost);
                Py_DECREF(lost);
                if (ended == NULL) PyErr_Clear(); /* (the interrupt still propagates) */
                PyErr_Restore(type, value, tb);
                failed = 1;
                goto done_held; /* (raised, as the Python method does: held not dropped) */
            }
            ended = caught_as_ended();
            if (ended == NULL) {
                failed = 1;
                goto done_held;
            }
        } else {
            Py_DECREF(res);
        }
        if (PyList_GET_SIZE(held) > 0 && PyList_SetSlice(held, 0, 1, NULL) < 0) {
            failed = 1;
            goto done_held;
        }
        parsing = 0;
    }
done_held:
    Py_XDECREF(data);
    Py_DECREF(held);
done:
    (void)parsing;
    /* finally: the read counted and the right kept, or handed to the reader thread. */
    if (busy) {
        PyObject *type = NULL, *value = NULL, *tb = NULL;
        if (failed) PyErr_Fetch(&type, &value, &tb);
        if (ended == NULL) {
            /* The common case, without the lock: only the holder writes these two,
             * and in this order (see the Python method). */
            if (token_count_read(token, toff) < 0) keep_first_error(&type, &value, &tb, &failed);
            slot_store(token, toff[T_BUSY], Py_False);
        } else {
            res = PyObject_CallMethodNoArgs(lock, str_acquire);
            if (res == NULL) {
                keep_first_error(&type, &value, &tb, &failed);
            } else {
                PyObject *cond;
                int counted = token_count_read(token, toff);
                Py_DECREF(res);
                slot_store(token, toff[T_BUSY], Py_False);
                slot_store(token, toff[T_ENDED], ended);
                slot_store(token, toff[T_LENT], Py_False);
                cond = SLOT(token, toff, T_COND);
                res = NULL;
                if (counted == 0 && cond != NULL && cond != Py_None) {
                    Py_INCREF(cond);
                    res = PyObject_CallMethodNoArgs(cond, str_notify_all);
                    Py_DECREF(cond);
                } else if (counted == 0) {
                    PyErr_SetString(PyExc_AssertionError, "lend() made the condition");
                }
                if (res == NULL) keep_first_error(&type, &value, &tb, &failed);
                Py_XDECREF(res);
                res = PyObject_CallMethodNoArgs(lock, str_release);
                if (res == NULL) keep_first_error(&type, &value, &tb, &failed);
                Py_XDECREF(res);
            }
        }
        if (type != NULL) PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(ended);
    Py_DECREF(lock);
    if (failed) return NULL;
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"apply_mask", apply_mask, METH_VARARGS, "XOR data with a repeated 4-byte key."},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL,
     "One whole masked frame: the header for the payload with the key, then the masked payload."},
    {"encode_frames", (PyCFunction)(void (*)(void))encode_frames, METH_FASTCALL,
     "A large message's masked frames from payload[start:], until they hold budget bytes."},
    {"encode_frames_into", (PyCFunction)(void (*)(void))encode_frames_into, METH_FASTCALL,
     "encode_frames' batch written into out, one frame after the other; (length, next)."},
    {"encode_piece_into", (PyCFunction)(void (*)(void))encode_piece_into, METH_FASTCALL,
     "one piece of a frame larger than a batch, written into out; (length, next)."},
    {"scatter_views", (PyCFunction)(void (*)(void))scatter_views, METH_FASTCALL,
     "a scatter plan's places, in the order one read fills them."},
    {"scan_scattered", (PyCFunction)(void (*)(void))scan_scattered, METH_FASTCALL,
     "the frames a scattered read filled; (matched, n, take, fin, stop)."},
    {"encode_messages", (PyCFunction)(void (*)(void))encode_messages, METH_FASTCALL,
     "A run of whole messages from items[start:] as masked frames, joined; and where it stopped."},
    {"total_length", total_length, METH_O, "sum(map(len, messages)) for a list of messages."},
    {"lend_each", (PyCFunction)(void (*)(void))lend_each, METH_FASTCALL,
     "on_binary for a run of small binary messages through one lent segment."},
    {"inflate_run", (PyCFunction)(void (*)(void))inflate_run, METH_FASTCALL,
     "Inflate the whole compressed messages at buf[pos:] into out; see the module's doc."},
    {"copy_continuations", (PyCFunction)(void (*)(void))copy_continuations, METH_FASTCALL,
     "Copy the whole non-final continuation frames at buf[pos:end] into target[m_len:]."},
    {"run_pending", (PyCFunction)(void (*)(void))run_pending, METH_FASTCALL,
     "Dispatcher.run() without a budget; see blockws.dispatcher."},
    {"reset_keys", sq_reset_keys, METH_NOARGS,
     "Drop the mask keys SendQueue's fast path has read ahead (after fork, in the child)."},
    {"read_here", (PyCFunction)(void (*)(void))read_here, METH_FASTCALL,
     "ReadToken.read_here(token, read, sink, timeout, wake, held), in C."},
    {"receive_whole", (PyCFunction)(void (*)(void))receive_whole, METH_FASTCALL,
     "Connection.data_received(data) for a read of whole small messages, or False."},
    {"split_messages", (PyCFunction)(void (*)(void))split_messages, METH_FASTCALL,
     "Append the whole small unfragmented data messages at buf[pos:] to out; return the end."},
#ifdef HAVE_GATED_RECV
    {"gated_recv", gated_recv, METH_VARARGS,
     "A reader thread's blocking sock.recv(size): waits for the GIL behind one gate."},
    {"gated_recv_into", gated_recv_into, METH_VARARGS,
     "A reader thread's blocking sock.recv_into(buffer): waits for the GIL behind one gate."},
    {"reset_gate", reset_gate, METH_NOARGS, "A new gate (after fork, in the child)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blockws._speedups", "Optional C speedups for blockws.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (str_on_binary == NULL) {
        str_on_binary = PyUnicode_InternFromString("on_binary");
        str_data = PyUnicode_InternFromString("data");
        str_count = PyUnicode_InternFromString("count");
        str_released = PyUnicode_InternFromString("_released");
        if (str_on_binary == NULL || str_data == NULL || str_count == NULL ||
            str_released == NULL)
            return NULL;
    }
    if (str_running_in == NULL) {
        str_running_in = PyUnicode_InternFromString("running_in");
        str_held = PyUnicode_InternFromString("held");
        str_armed = PyUnicode_InternFromString("_armed");
        str_announce = PyUnicode_InternFromString("_announce");
        str_popleft = PyUnicode_InternFromString("popleft");
        str_appendleft = PyUnicode_InternFromString("appendleft");
        if (str_running_in == NULL || str_held == NULL || str_armed == NULL ||
            str_announce == NULL || str_popleft == NULL || str_appendleft == NULL)
            return NULL;
    }
    if (str_acquire == NULL) {
        str_acquire = PyUnicode_InternFromString("acquire");
        str_release = PyUnicode_InternFromString("release");
        str_kick_locked = PyUnicode_InternFromString("kick_locked");
        str_direct_write = PyUnicode_InternFromString("direct_write");
        str_direct_part = PyUnicode_InternFromString("direct_part");
        str_close_late = PyUnicode_InternFromString("close_late");
        str_bytes_written = PyUnicode_InternFromString("bytes_written");
        if (str_acquire == NULL || str_release == NULL || str_kick_locked == NULL ||
            str_direct_write == NULL || str_direct_part == NULL || str_close_late == NULL ||
            str_bytes_written == NULL)
            return NULL;
    }
    if (str_read_here == NULL) {
        str_read_here = PyUnicode_InternFromString("read_here");
        str_notify_all = PyUnicode_InternFromString("notify_all");
        str_data_received = PyUnicode_InternFromString("data_received");
        if (str_read_here == NULL || str_notify_all == NULL || str_data_received == NULL)
            return NULL;
    }
    if (str_new_inbox == NULL) {
        str_new_inbox = PyUnicode_InternFromString("new_inbox");
        str_extend = PyUnicode_InternFromString("extend");
        str_on_message = PyUnicode_InternFromString("on_message");
        str_pause_reading = PyUnicode_InternFromString("_pause_reading");
        str_direct_ok = PyUnicode_InternFromString("direct_ok");
        if (str_new_inbox == NULL || str_extend == NULL || str_on_message == NULL ||
            str_pause_reading == NULL || str_direct_ok == NULL)
            return NULL;
    }
    if (str_decompress == NULL) {
        str_decompress = PyUnicode_InternFromString("decompress");
        str_unconsumed_tail = PyUnicode_InternFromString("unconsumed_tail");
        str_eof = PyUnicode_InternFromString("eof");
        str_unused_data = PyUnicode_InternFromString("unused_data");
        str_reason = PyUnicode_InternFromString("reason");
        if (str_decompress == NULL || str_unconsumed_tail == NULL || str_eof == NULL ||
            str_unused_data == NULL || str_reason == NULL)
            return NULL;
    }
#ifdef HAVE_GATED_RECV
    if (gate == NULL) {
        gate = PyThread_allocate_lock();
        if (gate == NULL)
            return PyErr_NoMemory();
    }
#endif
    BytesBufferType.tp_dealloc = (destructor)BytesBuffer_dealloc;
    BytesBufferType.tp_as_sequence = &BytesBuffer_as_sequence;
    BytesBufferType.tp_as_buffer = &BytesBuffer_as_buffer;
    BytesBufferType.tp_flags = Py_TPFLAGS_DEFAULT;
    BytesBufferType.tp_doc = "A bytes object under construction: written through a view, then take(n).";
    BytesBufferType.tp_methods = BytesBuffer_methods;
    BytesBufferType.tp_new = BytesBuffer_new;
    if (PyType_Ready(&BytesBufferType) < 0)
        return NULL;
    SendQueueType.tp_dealloc = (destructor)SendQueue_dealloc;
    SendQueueType.tp_as_sequence = &SendQueue_as_sequence;
    SendQueueType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
    SendQueueType.tp_doc = "A socket's send queue and the state send() reads; see blockws.sendqueue.";
    SendQueueType.tp_traverse = (traverseproc)SendQueue_traverse;
    SendQueueType.tp_clear = (inquiry)SendQueue_clear;
    SendQueueType.tp_methods = SendQueue_methods;
    SendQueueType.tp_members = SendQueue_members;
    SendQueueType.tp_new = SendQueue_new;
    if (PyType_Ready(&SendQueueType) < 0)
        return NULL;
    {
        PyObject *m = PyModule_Create(&module);
        if (m == NULL)
            return NULL;
        Py_INCREF(&BytesBufferType);
        if (PyModule_AddObject(m, "BytesBuffer", (PyObject *)&BytesBufferType) < 0) {
            Py_DECREF(&BytesBufferType);
            Py_DECREF(m);
            return NULL;
        }
        Py_INCREF(&SendQueueType);
        if (PyModule_AddObject(m, "SendQueue", (PyObject *)&SendQueueType) < 0) {
            Py_DECREF(&SendQueueType);
            Py_DECREF(m);
            return NULL;
        }
        return m;
    }
}
