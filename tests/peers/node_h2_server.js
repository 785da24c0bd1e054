#!/usr/bin/env node
// An HTTP/2 server WITHOUT RFC 8441, that also serves WebSocket over HTTP/1.1: the fallback peer.
//
// Test peer for blockws. Usage:
//
//   node tests/peers/node_h2_server.js --port PORT --certfile cert.pem --keyfile key.pem
//
// Node's http2.createSecureServer over TLS, ALPN "h2" and "http/1.1" (allowHTTP1). Its SETTINGS
// are sent with enableConnectProtocol: false, so they lack SETTINGS_ENABLE_CONNECT_PROTOCOL
// (a forced extended CONNECT gets RST_STREAM PROTOCOL_ERROR). An HTTP/1.1 connection may
// upgrade to WebSocket: the `ws` package (tests/peers/node_modules) handles the 'upgrade'
// event. Plain HTTP requests, over either version, get 404.
//
// Binds 127.0.0.1 only. Echoes text as text and binary as binary, except these text commands:
//   !version                reply the HTTP version of the handshake request ("1.1")
//   !close [CODE [REASON]]  close with that code (default 1000) and reason
//   !headers                reply JSON {"headers": {...}, "path": PATH} of the handshake request
//                           (names lower-cased, repeated headers joined with ", ")
'use strict';

const fs = require('fs');
const http2 = require('http2');
const { WebSocketServer } = require('ws');

function parseArgs(argv) {
  const args = { port: null, certfile: null, keyfile: null };
  for (let i = 0; i < argv.length; i++) {
    switch (argv[i]) {
      case '--port': args.port = Number(argv[++i]); break;
      case '--certfile': args.certfile = argv[++i]; break;
      case '--keyfile': args.keyfile = argv[++i]; break;
      default:
        console.error(`unknown argument: ${argv[i]}`);
        process.exit(2);
    }
  }
  if (!Number.isInteger(args.port) || !args.certfile || !args.keyfile) {
    console.error('usage: node_h2_server.js --port PORT --certfile F --keyfile F');
    process.exit(2);
  }
  return args;
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

function handleCommand(ws, req, text) {
  const space = text.indexOf(' ');
  const name = space < 0 ? text : text.slice(0, space);
  const rest = space < 0 ? '' : text.slice(space + 1);
  switch (name) {
    case '!version':
      ws.send(req.httpVersion);
      return true;
    case '!close': {
      const sp = rest.indexOf(' ');
      const codeText = sp < 0 ? rest : rest.slice(0, sp);
      const reason = sp < 0 ? '' : rest.slice(sp + 1);
      ws.close(codeText ? Number(codeText) : 1000, reason);
      return true;
    }
    case '!headers':
      ws.send(JSON.stringify({ headers: headersOf(req), path: req.url }));
      return true;
    default:
      return false;
  }
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const server = http2.createSecureServer({
    cert: fs.readFileSync(args.certfile),
    key: fs.readFileSync(args.keyfile),
    allowHTTP1: true,
    settings: { enableConnectProtocol: false },
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 * 1024 });

  server.on('request', (req, res) => {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('WebSocket only\n');
  });
  server.on('upgrade', (req, socket, head) => {
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  });
  server.on('sessionError', () => {}); // a client that hangs up is not our problem

  wss.on('connection', (ws, req) => {
    ws.on('error', () => {});
    ws.on('message', (data, isBinary) => {
      if (!isBinary) {
        const text = data.toString('utf8');
        if (text.startsWith('!') && handleCommand(ws, req, text)) return;
      }
      ws.send(data, { binary: isBinary });
    });
  });

  server.listen(args.port, '127.0.0.1');
}

main();
