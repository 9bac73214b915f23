// A model host that trickles its file, so that the page's "downloading n %" can be seen.
//
//   node tests/browser/slow-model-server.mjs <model-file> <seconds> <port-file>
//
// Serves GET /<file name> with its Content-Length, in 64 KiB pieces spread evenly over
// about <seconds>; writes the port it listens on (127.0.0.1, chosen by the OS) to
// <port-file> once listening. Anything else is a 404. Stops on SIGTERM.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const [file, seconds, portFile] = process.argv.slice(2);
if (!file || !seconds || !portFile) {
  process.stderr.write('usage: slow-model-server.mjs <model-file> <seconds> <port-file>\n');
  process.exit(2);
}
const bytes = fs.readFileSync(file);
const PIECE = 64 * 1024;
const pieces = Math.ceil(bytes.length / PIECE);
const pause = (Number(seconds) * 1000) / pieces;

const server = http.createServer((req, res) => {
  if (req.method !== 'GET' || req.url !== `/${path.basename(file)}`) {
    res.writeHead(404, { 'Content-Type': 'text/plain' });
    res.end('not found\n');
    return;
  }
  process.stdout.write(`[slow-model-server] ${req.method} ${req.url}: ${bytes.length} bytes over ~${seconds} s\n`);
  res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': String(bytes.length) });
  let at = 0;
  const timer = setInterval(() => {
    if (at >= bytes.length || res.destroyed) {
      clearInterval(timer);
      res.end();
      return;
    }
    res.write(bytes.subarray(at, at + PIECE));
    at += PIECE;
  }, pause);
  req.on('close', () => clearInterval(timer));
});

server.listen(0, '127.0.0.1', () => {
  fs.writeFileSync(portFile, String(server.address().port));
});
process.on('SIGTERM', () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
