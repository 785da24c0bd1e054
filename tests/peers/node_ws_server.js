#!/usr/bin/env node
// Echo server built on Node's `ws` package (installed into tests/peers/node_modules by .ci/run).
//
// Test peer for blockws; same behaviour as ws_echo_server.py. Usage:
//
//   node tests/peers/node_ws_server.js --port PORT [--deflate] [--certfile cert.pem --keyfile key.pem]
//        [--server-no-context-takeover] [--client-no-context-takeover]
//        [--server-max-window-bits N] [--client-max-window-bits N]
//
// --deflate enables permessage-deflate with {threshold: 0} (ws's default threshold of 1024
// bytes would send small messages uncompressed). The four parameter flags imply --deflate and
// set perMessageDeflate's serverNoContextTakeover, clientNoContextTakeover,
// serverMaxWindowBits and clientMaxWindowBits; ws then imposes them on the client, and answers
// 400 to an offer it cannot accept (e.g. server_max_window_bits below its own setting, or no
// client_max_window_bits when clientMaxWindowBits is set).
//
// Binds 127.0.0.1 only. Echoes text as text and binary as binary, except these text commands:
//   !stats                  reply JSON {"frames": N, "messages": M}: data frames (text, binary,
//                           continuation) and messages received before the command message
//   !close [CODE [REASON]]  close with that code (default 1000) and reason
//   !ping                   send a ping with payload "srv"; nothing is echoed
//   !headers                reply JSON {"headers": {...}, "path": PATH} of the handshake request
//                           (names lower-cased, repeated headers joined with ", ")
//   !subprotocol            reply the negotiated subprotocol, or an empty string
// Subprotocols "chat" and "superchat" are accepted when offered (the first of them in the
// client's order wins); a client offering neither still connects, without a subprotocol.
'use strict';

const fs = require('fs');
const https = require('https');
const { WebSocketServer } = require('ws');

const SUBPROTOCOLS = new Set(['chat', 'superchat']);

function parseArgs(argv) {
  const args = { port: null, deflate: false, certfile: null, keyfile: null, deflateOptions: {} };
  const bits = (text) => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < 8 || n > 15) {
      console.error(`window bits must be 8-15, not ${text}`);
      process.exit(2);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    switch (argv[i]) {
      case '--port': args.port = Number(argv[++i]); break;
      case '--deflate': args.deflate = true; break;
      case '--server-no-context-takeover':
        args.deflate = true; args.deflateOptions.serverNoContextTakeover = true; break;
      case '--client-no-context-takeover':
        args.deflate = true; args.deflateOptions.clientNoContextTakeover = true; break;
      case '--server-max-window-bits':
        args.deflate = true; args.deflateOptions.serverMaxWindowBits = bits(argv[++i]); break;
      case '--client-max-window-bits':
        args.deflate = true; args.deflateOptions.clientMaxWindowBits = bits(argv[++i]); break;
      case '--certfile': args.certfile = argv[++i]; break;
      case '--keyfile': args.keyfile = argv[++i]; break;
      default:
        console.error(`unknown argument: ${argv[i]}`);
        process.exit(2);
    }
  }
  if (!Number.isInteger(args.port)) {
    console.error('usage: node_ws_server.js --port PORT [--deflate] [--certfile F --keyfile F]');
    process.exit(2);
  }
  return args;
}

// Count data frames as the receiver parses them. ws's Receiver reads every frame header in
// getInfo(), which consumes the first two bytes of the frame when at least two are buffered
// (else it returns and is called again when more data arrives). The first byte holds FIN and
// the opcode; getInfo() rewrites a continuation's opcode to the message's, so peek at the raw
// byte before calling it. Wrapped per instance, on the 'connection' event, which ws emits
// synchronously after the handshake, before it reads any frame from the socket.
function countFrames(receiver) {
  const stats = { frames: 0, messages: 0, messageStart: 0, beforeMessage: [] };
  const getInfo = receiver.getInfo;
  receiver.getInfo = function (cb) {
    let header = null;
    if (this._bufferedBytes >= 2) header = this._buffers[0][0];
    const result = getInfo.call(this, cb);
    if (header !== null && !this._errored) {
      const opcode = header & 0x0f;
      const fin = (header & 0x80) !== 0;
      if (opcode <= 0x02) {
        if (opcode !== 0x00) stats.messageStart = stats.frames;
        stats.frames++;
        if (fin) {
          // One snapshot per message, in order: the 'message' handler takes one each time,
          // so frames parsed ahead of it (pipelining, async inflate) can't skew !stats.
          stats.beforeMessage.push({ frames: stats.messageStart, messages: stats.messages });
          stats.messages++;
        }
      }
    }
    return result;
  };
  return stats;
}

function headersOf(req) {
  const headers = {};
  const raw = req.rawHeaders;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i].toLowerCase();
    headers[name] = name in headers ? `${headers[name]}, ${raw[i + 1]}` : raw[i + 1];
  }
  return headers;
}

function handleCommand(ws, req, text, snapshot) {
  const space = text.indexOf(' ');
  const name = space < 0 ? text : text.slice(0, space);
  const rest = space < 0 ? '' : text.slice(space + 1);
  switch (name) {
    case '!stats':
      ws.send(JSON.stringify({ frames: snapshot.frames, messages: snapshot.messages }));
      return true;
    case '!close': {
      const sp = rest.indexOf(' ');
      const codeText = sp < 0 ? rest : rest.slice(0, sp);
      const reason = sp < 0 ? '' : rest.slice(sp + 1);
      try {
        ws.close(codeText ? Number(codeText) : 1000, reason);
      } catch (err) {
        ws.send(`error: ${err.message}`);
      }
      return true;
    }
    case '!ping':
      ws.ping(Buffer.from('srv'));
      return true;
    case '!headers':
      ws.send(JSON.stringify({ headers: headersOf(req), path: req.url }));
      return true;
    case '!subprotocol':
      ws.send(ws.protocol || '');
      return true;
    default:
      return false;
  }
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const options = {
    maxPayload: 64 * 1024 * 1024,
    perMessageDeflate: args.deflate ? { ...args.deflateOptions, threshold: 0 } : false,
    handleProtocols(protocols) {
      for (const protocol of protocols) {
        if (SUBPROTOCOLS.has(protocol)) return protocol;
      }
      return false;
    },
  };

  let wss;
  if (args.certfile) {
    const server = https.createServer({
      cert: fs.readFileSync(args.certfile),
      key: fs.readFileSync(args.keyfile),
      ALPNProtocols: ['http/1.1'],
    });
    wss = new WebSocketServer({ server, ...options });
    server.listen(args.port, '127.0.0.1');
  } else {
    wss = new WebSocketServer({ host: '127.0.0.1', port: args.port, ...options });
  }

  wss.on('connection', (ws, req) => {
    const stats = countFrames(ws._receiver);
    ws.on('error', () => {}); // protocol errors close the socket; nothing to report
    ws.on('message', (data, isBinary) => {
      const snapshot = stats.beforeMessage.shift() || { frames: 0, messages: 0 };
      if (!isBinary) {
        const text = data.toString('utf8');
        if (text.startsWith('!') && handleCommand(ws, req, text, snapshot)) return;
      }
      ws.send(data, { binary: isBinary });
    });
  });
}

main();
