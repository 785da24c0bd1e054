// A WebSocket "reflector" for benchmarks: it sends every frame back as it came,
// unmasked, RSV bits and opcode kept. When the client offers permessage-deflate
// it accepts with no parameters, so each client compresses with its own
// settings; reflecting a compressed frame byte for byte is valid because the
// client's inflater then sees exactly the stream its own deflater made. The
// server does no compression work of its own, so it costs the same for every
// client and stays far from being the bottleneck.
//
//   node benchmarks/reflector.js PORT
'use strict';
const net = require('net');
const crypto = require('crypto');

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const port = parseInt(process.argv[2], 10);

function handshake(head) {
  const lines = head.split('\r\n');
  const headers = {};
  for (const line of lines.slice(1)) {
    const i = line.indexOf(':');
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  const accept = crypto.createHash('sha1').update(headers['sec-websocket-key'] + GUID).digest('base64');
  let resp = 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    `Sec-WebSocket-Accept: ${accept}\r\n`;
  if ((headers['sec-websocket-extensions'] || '').includes('permessage-deflate')) {
    resp += 'Sec-WebSocket-Extensions: permessage-deflate\r\n';
  }
  return resp + '\r\n';
}

net.createServer((sock) => {
  sock.setNoDelay(true);
  let buf = Buffer.alloc(0);
  let open = false;
  sock.on('data', (chunk) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    if (!open) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      sock.write(handshake(buf.slice(0, end).toString('latin1')));
      buf = buf.slice(end + 4);
      open = true;
    }
    const out = [];
    let pos = 0;
    for (;;) {
      if (buf.length - pos < 2) break;
      const b0 = buf[pos], b1 = buf[pos + 1];
      let len = b1 & 0x7f, hdr = 2;
      if (len === 126) { if (buf.length - pos < 4) break; len = buf.readUInt16BE(pos + 2); hdr = 4; }
      else if (len === 127) { if (buf.length - pos < 10) break; len = Number(buf.readBigUInt64BE(pos + 2)); hdr = 10; }
      const masked = b1 & 0x80;
      const total = hdr + (masked ? 4 : 0) + len;
      if (buf.length - pos < total) break;
      const payload = Buffer.from(buf.subarray(pos + total - len, pos + total));
      if (masked) {
        const key = buf.subarray(pos + hdr, pos + hdr + 4);
        for (let i = 0; i < len; i++) payload[i] ^= key[i & 3];
      }
      let header;
      if (len < 126) header = Buffer.from([b0, len]);
      else if (len < 65536) { header = Buffer.alloc(4); header[0] = b0; header[1] = 126; header.writeUInt16BE(len, 2); }
      else { header = Buffer.alloc(10); header[0] = b0; header[1] = 127; header.writeBigUInt64BE(BigInt(len), 2); }
      out.push(header, payload);
      pos += total;
      if ((b0 & 0x0f) === 8) { sock.end(Buffer.concat(out)); return; }
    }
    buf = buf.subarray(pos);
    if (out.length) sock.write(Buffer.concat(out));
  });
  sock.on('error', () => {});
}).listen(port, '127.0.0.1');
