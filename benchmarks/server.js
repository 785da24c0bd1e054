// The benchmark server's twin in Node.js, for measuring clients against a server
// with headroom: python -m benchmarks --server node.
//
//   node benchmarks/server.js WS_PORT TCP_PORT
//
// The same endpoints and replies as benchmarks/server.py (picows) for W1-W5b:
//
// * /echo: every data frame goes back as it came (opcode, FIN bit, payload;
//   fragments as fragments), the replies to all the frames of one read joined
//   into one write.
// * /flood: after a text message "N SIZE", N binary messages of SIZE bytes,
//   written in 64 KiB chunks, waiting for 'drain' when the socket is full.
// * /sink: counts binary messages (final frames) and their payload bytes; a
//   text message is a query, answered with the text "COUNT BYTES". A binary
//   payload is counted, not unmasked: what is measured is how fast the client
//   sends, and the server does a few operations a frame whatever the payload.
//
// The plain-TCP listener answers the same one-line commands as server.py's:
// "echo", "flood TOTAL", "sink TOTAL" ("ok" once TOTAL bytes came), "idle".
//
// The parser is strict where the measurement depends on it (client frames must
// be masked; a 64-bit length must fit a double) and ends the connection on
// anything else it does not expect.
'use strict';
const net = require('net');
const crypto = require('crypto');

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const CHUNK = 64 * 1024;
const SMALL = 4096; // echoed through one buffer a read (see websocket())

function header(b0, n) {
  if (n < 126) return Buffer.from([b0, n]);
  if (n < 65536) {
    const h = Buffer.alloc(4);
    h[0] = b0; h[1] = 126; h.writeUInt16BE(n, 2);
    return h;
  }
  const h = Buffer.alloc(10);
  h[0] = b0; h[1] = 127; h.writeBigUInt64BE(BigInt(n), 2);
  return h;
}

// XOR payload (a copy) with the 4-byte key, a 32-bit word at a time where it can.
function unmask(src, key) {
  const n = src.length;
  const out = Buffer.allocUnsafeSlow(n); // its own ArrayBuffer: 8-byte aligned
  src.copy(out);
  const words = n >>> 2;
  if (words) {
    const u32 = new Uint32Array(out.buffer, out.byteOffset, words);
    const k = key.readUInt32LE(0);
    for (let i = 0; i < words; i++) u32[i] ^= k;
  }
  for (let i = words << 2; i < n; i++) out[i] ^= key[i & 3];
  return out;
}

function accept(head) {
  const lines = head.split('\r\n');
  const path = lines[0].split(' ')[1] || '/';
  let key = '';
  for (const line of lines.slice(1)) {
    const i = line.indexOf(':');
    if (i > 0 && line.slice(0, i).trim().toLowerCase() === 'sec-websocket-key') {
      key = line.slice(i + 1).trim();
    }
  }
  const digest = crypto.createHash('sha1').update(key + GUID).digest('base64');
  return {
    path: path.split('?')[0],
    response: 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Accept: ${digest}\r\n\r\n`,
  };
}

function flood(sock, n, size) {
  const one = Buffer.concat([header(0x82, size), Buffer.alloc(size)]);
  const per = Math.max(1, Math.floor(CHUNK / one.length));
  const chunk = Buffer.concat(new Array(per).fill(one));
  const step = () => {
    while (n > 0 && !sock.destroyed) {
      const k = Math.min(n, per);
      n -= k;
      const ok = sock.write(k === per ? chunk : chunk.subarray(0, k * one.length));
      if (!ok) { sock.once('drain', step); return; }
    }
  };
  step();
}

function websocket(sock) {
  let buf = null;
  let mode = null; // the endpoint, once the handshake is through
  let count = 0, bytes = 0;
  // A frame cut across reads: its pieces wait here, joined once it is whole
  // (not at every read: a 1 MiB frame comes in many reads).
  let parts = [], have = 0, need = 0;
  sock.on('data', (chunk) => {
    if (need > 0) {
      parts.push(chunk);
      have += chunk.length;
      if (have < need) return;
      buf = Buffer.concat(parts, have);
      parts = []; have = 0; need = 0;
    } else {
      buf = buf === null || buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    }
    if (mode === null) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const a = accept(buf.subarray(0, end).toString('latin1'));
      mode = a.path;
      sock.write(a.response);
      buf = buf.subarray(end + 4);
    }
    const out = [];
    let small = null, from = 0, o = 0; // see the small-frame branch below
    let pos = 0;
    for (;;) {
      const avail = buf.length - pos;
      if (avail < 2) break;
      const b0 = buf[pos], b1 = buf[pos + 1];
      let len = b1 & 0x7f, hdr = 2;
      if (len === 126) {
        if (avail < 4) break;
        len = buf.readUInt16BE(pos + 2); hdr = 4;
      } else if (len === 127) {
        if (avail < 10) break;
        const big = buf.readBigUInt64BE(pos + 2);
        if (big > BigInt(Number.MAX_SAFE_INTEGER)) { sock.destroy(); return; }
        len = Number(big); hdr = 10;
      }
      if (!(b1 & 0x80)) { sock.destroy(); return; } // client frames are masked
      const total = hdr + 4 + len;
      if (avail < total) {
        if (total > CHUNK) need = total; // wait for the rest without joining at each read
        break;
      }
      const opcode = b0 & 0x0f;
      const start = pos + total - len;
      if (opcode === 8) { // close: answer with its code, then end
        if (small !== null && o > from) out.push(small.subarray(from, o));
        const body = unmask(buf.subarray(start, pos + total), buf.subarray(pos + hdr, pos + hdr + 4));
        out.push(header(0x88, Math.min(len, 2)), body.subarray(0, Math.min(len, 2)));
        sock.end(Buffer.concat(out));
        return;
      }
      if (mode === '/sink' && opcode !== 1) {
        if (opcode !== 9 && opcode !== 10) {
          bytes += len;
          if (b0 & 0x80) count++;
        }
      } else if (opcode === 9) { // ping: pong with its payload
        const body = unmask(buf.subarray(start, pos + total), buf.subarray(pos + hdr, pos + hdr + 4));
        if (small !== null && o > from) { out.push(small.subarray(from, o)); from = o; }
        out.push(header(0x8a, len), body);
      } else if (mode === '/echo' && len <= SMALL && opcode !== 10) {
        // A small frame: header and unmasked payload straight into one buffer
        // for the whole read (a reply is 4 bytes shorter than its frame).
        if (small === null) { small = Buffer.allocUnsafe(buf.length - pos); from = o = 0; }
        small[o] = b0;
        small[o + 1] = b1 & 0x7f;
        if (hdr === 4) { small[o + 2] = buf[pos + 2]; small[o + 3] = buf[pos + 3]; }
        o += hdr;
        const k = pos + hdr;
        for (let i = 0; i < len; i++) small[o + i] = buf[start + i] ^ buf[k + (i & 3)];
        o += len;
      } else if (opcode !== 10) {
        const body = unmask(buf.subarray(start, pos + total), buf.subarray(pos + hdr, pos + hdr + 4));
        if (small !== null && o > from) { out.push(small.subarray(from, o)); from = o; }
        if (mode === '/echo') {
          out.push(header(b0, len), body);
        } else if (mode === '/sink') { // a text query
          const reply = Buffer.from(`${count} ${bytes}`);
          out.push(header(0x81, reply.length), reply);
        } else if (mode === '/flood' && opcode === 1) {
          const [n, size] = body.toString('latin1').split(' ').map(Number);
          flood(sock, n, size);
        }
      }
      pos += total;
    }
    if (small !== null && o > from) out.push(small.subarray(from, o));
    buf = buf.subarray(pos);
    if (need > 0) { parts.push(buf); have = buf.length; buf = null; }
    if (out.length) sock.write(out.length === 1 ? out[0] : Buffer.concat(out));
  });
  sock.on('error', () => {});
}

// The plain-TCP twin: one command line, then raw bytes.
function plain(sock) {
  let line = '';
  let mode = null, total = 0, got = 0;
  sock.on('data', (chunk) => {
    if (mode === null) {
      line += chunk.toString('latin1');
      const end = line.indexOf('\n');
      if (end < 0) return;
      const [cmd, arg] = line.slice(0, end).trim().split(' ');
      chunk = Buffer.from(line.slice(end + 1), 'latin1');
      mode = cmd;
      total = Number(arg || 0);
      if (mode === 'flood') {
        const block = Buffer.alloc(CHUNK);
        let left = total;
        const step = () => {
          while (left > 0 && !sock.destroyed) {
            const k = Math.min(left, CHUNK);
            left -= k;
            if (!sock.write(k === CHUNK ? block : block.subarray(0, k))) {
              sock.once('drain', step); return;
            }
          }
        };
        step();
      }
    }
    if (mode === 'echo') {
      if (chunk.length) sock.write(chunk);
    } else if (mode === 'sink') {
      got += chunk.length;
      if (got >= total && total > 0) { sock.write('ok\n'); total = 0; }
    }
  });
  sock.on('error', () => {});
}

const wsPort = parseInt(process.argv[2], 10);
const tcpPort = parseInt(process.argv[3], 10);
net.createServer({ noDelay: true }, websocket).listen(wsPort, '127.0.0.1');
net.createServer({ noDelay: true }, plain).listen(tcpPort, '127.0.0.1');
