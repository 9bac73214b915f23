// What the page puts on the wire, read from the requests themselves (no dependency).
//
//   parseMultipart(body, contentType)  -> { fields: {name: text}, files: {name: {filename, bytes}} }
//   captureRequests(page, glob)        -> a live list of {method, contentType, body} for that route
//   boxFromDrag(rect, from, to, size)  -> the box (working-image pixels) a drag from/to (page CSS px)
//                                         on a canvas shown at `rect` means for an image of `size`
//   isWireFraction(text)               -> "0", "0.3", "0.35", "1": a fraction 0–1, at most 2 decimals

/** Splits a multipart/form-data body into its text fields and its files. */
export function parseMultipart(body, contentType) {
  const m = /boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType || '');
  if (!m) throw new Error(`no multipart boundary in content-type "${contentType}"`);
  const boundary = `--${m[1] || m[2]}`;
  const text = Buffer.from(body).toString('latin1'); // byte-preserving
  const fields = {};
  const files = {};
  const parts = text.split(boundary);
  if (parts.length < 3 || !parts[parts.length - 1].startsWith('--')) throw new Error('multipart body is not terminated by its closing boundary');
  for (const raw of parts.slice(1, -1)) {
    const part = raw.replace(/^\r\n/, '').replace(/\r\n$/, '');
    const split = part.indexOf('\r\n\r\n');
    if (split < 0) throw new Error('multipart part without a header/body separator');
    const headers = part.slice(0, split);
    const value = part.slice(split + 4);
    const disposition = /content-disposition:\s*form-data;([^\r\n]*)/i.exec(headers);
    if (!disposition) throw new Error(`multipart part without form-data disposition: ${headers}`);
    const name = /\bname="([^"]*)"/.exec(disposition[1]);
    const filename = /\bfilename="([^"]*)"/.exec(disposition[1]);
    if (!name) throw new Error(`multipart part without a name: ${headers}`);
    if (filename) files[name[1]] = { filename: filename[1], bytes: Buffer.from(value, 'latin1').length };
    else fields[name[1]] = Buffer.from(value, 'latin1').toString('utf8');
  }
  return { fields, files };
}

/**
 * Records the body of every request matching `glob` (through page.route, so the bytes are
 * the ones Chromium sends) and lets it through unchanged. Returns the live list.
 */
export async function captureRequests(page, glob) {
  const seen = [];
  await page.route(glob, async (route) => {
    const req = route.request();
    seen.push({ method: req.method(), contentType: (await req.headerValue('content-type')) || '', body: req.postDataBuffer() });
    await route.fallback();
  });
  return seen;
}

/** The box a drag between two page points means, in pixels of an image `size` shown in `rect`. */
export function boxFromDrag(rect, from, to, size) {
  const x = (p) => Math.min(size.width, Math.max(0, ((p.x - rect.left) / rect.width) * size.width));
  const y = (p) => Math.min(size.height, Math.max(0, ((p.y - rect.top) / rect.height) * size.height));
  return {
    x_min: Math.min(x(from), x(to)), y_min: Math.min(y(from), y(to)),
    x_max: Math.max(x(from), x(to)), y_max: Math.max(y(from), y(to)),
  };
}

/** A box inside a width x height image, with integer corners and min < max. */
export function boxInside(box, width, height) {
  const ints = ['x_min', 'y_min', 'x_max', 'y_max'].every((k) => Number.isInteger(box[k]));
  return ints && box.x_min >= 0 && box.y_min >= 0 && box.x_max <= width && box.y_max <= height &&
    box.x_min < box.x_max && box.y_min < box.y_max;
}

/** The largest corner difference between two boxes. */
export function boxDistance(a, b) {
  return Math.max(...['x_min', 'y_min', 'x_max', 'y_max'].map((k) => Math.abs(a[k] - b[k])));
}

/** A fraction 0–1 written the way the Flask client's slider value reads: at most 2 decimals, no float noise. */
export function isWireFraction(text) {
  return typeof text === 'string' && /^(0(\.\d{1,2})?|1(\.0{1,2})?)$/.test(text) && Number(text) >= 0 && Number(text) <= 1;
}
