// End-to-end test of the Drishya UI in Debian's Chromium, driven by playwright-core.
//
//   node tests/browser/e2e.mjs <base-url> <output-dir>
//
// Two passes against the real server (real U²-Net-p):
//   desktop 1280x800 @2x, mouse: wrong password, login, a server error shown verbatim,
//     upload (file picker), draw + redraw the box, generate the mask, product image by
//     drag-and-drop, scale by keyboard + feathering + grading strength, replace, compare,
//     download and check the PNG (size = working image, pixels outside the box = the
//     original's), logout. Also: undo/redo of the box (buttons, Ctrl+Z, Ctrl+Shift+Z, Ctrl+Y;
//     not while typing in a field; undo back to the mask's box makes the mask current again),
//     the cut-out (PNG with alpha, transparent outside the box, the scene's pixels where the
//     mask is) and mask downloads, the full-resolution download in PNG, JPEG (quality) and
//     WebP, and "Reset settings" (the page's defaults again, and the next replace sends them).
//   phone 375x812 @3x, touch: login, upload by drag-and-drop of a photo WIDER than 1280 px
//     (coffee.png upscaled 3x to 1800x1200 in the page, as a JPEG: the server downscales it
//     to 1280x853), draw the box with touch events, generate the mask, product, replace, no
//     horizontal overflow anywhere, and the full-resolution JPEG is 1800x1200.
//   model download progress (SLOW_BASE, a second server whose model URL is served slowly by
//     tests/browser/slow-model-server.mjs): the busy card and the model chip show the download
//     percentage rising, a second user's page says how many requests wait for the model, and
//     /health lists no download and an empty queue afterwards.
// Wire checks (the Flask client's format): the upload answer's original_* equal width/height
// (the working image) and source_* carry the photo's own size; the box sent to /generate_mask
// is in working-image pixels, inside width x height, where the user drew it (drag points on
// the canvas scaled by width / canvas width) and where the page draws its outline; the
// multipart body of /replace_product (read from the request itself) carries
// color_grade_strength as a fraction 0–1 equal to the slider's percent / 100.
// Screenshots of every step go to the output dir. Exit code 1 on any failure.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { decodePng } from './png.mjs';
import { boxDistance, boxFromDrag, boxInside, captureRequests, isWireFraction, parseMultipart } from './wire.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const BASE = (process.argv[2] || process.env.BASE_URL || '').replace(/\/$/, '');
// A second server whose model comes from a host that trickles it (scripts/browser-test).
const SLOW_BASE = (process.env.SLOW_BASE || '').replace(/\/$/, '');
const OUT = path.resolve(process.argv[3] || process.env.OUT_DIR || path.join(REPO, 'test-output', 'browser'));
const IMAGES = path.resolve(REPO, process.env.DRISHYA_IMAGES || '../shared/images');
const PASSWORD = process.env.APP_PASSWORD || 'test-password';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SCENE = path.join(IMAGES, 'coffee.png');
// coffee.png is 600x400: the cup and saucer sit roughly in x 150–450, y 40–300.
const CUP_BOX = { x_min: 150, y_min: 40, x_max: 450, y_max: 300 };
// The phone pass uploads coffee.png upscaled by this factor (1800x1200 > MAX_IMAGE_WIDTH 1280).
const BIG_FACTOR = 3;
const MAX_IMAGE_WIDTH = 1280;
const MASK_TIMEOUT_MS = 180_000;

const results = [];
const pageErrors = [];
// The server's Content-Security-Policy (src/web.rs) must never block what the pages do.
const cspViolations = [];

function log(msg) {
  process.stdout.write(`${msg}\n`);
}

function check(name, ok, detail = '') {
  results.push({ name, ok: Boolean(ok), detail });
  log(`${ok ? 'PASS' : 'FAIL'}  ${name}${detail ? ` — ${detail}` : ''}`);
  return Boolean(ok);
}

function must(name, ok, detail) {
  if (!check(name, ok, detail)) throw new Error(`${name}${detail ? `: ${detail}` : ''}`);
}

async function shot(page, name, opts = {}) {
  const file = path.join(OUT, `${name}.png`);
  await page.screenshot({ path: file, scale: 'css', animations: 'disabled', ...opts });
  log(`      screenshot ${path.relative(REPO, file)}`);
}

function watchPage(page, label) {
  page.on('pageerror', (err) => {
    pageErrors.push(`${label}: ${err.message}`);
    log(`      [${label}] page error: ${err.message}`);
  });
  page.on('console', (msg) => {
    if (msg.type() === 'error') log(`      [${label}] console error: ${msg.text()}`);
    if (/Content Security Policy/i.test(msg.text())) cspViolations.push(`${label}: ${msg.text()}`);
  });
}

/* ------------------------------------------------------------ page helpers */

async function login(page, password, base = BASE) {
  await page.goto(`${base}/`);
  await page.fill('#password', password);
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/login') && r.request().method() === 'POST'),
    page.click('#login-submit'),
  ]);
  await page.waitForLoadState('domcontentloaded');
  return response;
}

/** Drops a file (bytes from node) on an element the way a real drag-and-drop does. */
async function dropFile(page, selector, bytes, name, type) {
  const dataTransfer = await page.evaluateHandle(({ b64, fileName, mime }) => {
    const bin = atob(b64);
    const arr = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i += 1) arr[i] = bin.charCodeAt(i);
    const dt = new DataTransfer();
    dt.items.add(new File([arr], fileName, { type: mime }));
    return dt;
  }, { b64: Buffer.from(bytes).toString('base64'), fileName: name, mime: type });
  await page.dispatchEvent(selector, 'dragenter', { dataTransfer });
  await page.dispatchEvent(selector, 'dragover', { dataTransfer });
  await page.dispatchEvent(selector, 'drop', { dataTransfer });
}

/** Working-image pixel -> page (CSS) coordinates through the canvas's bounding rect. */
async function imageToScreen(page, imageSize) {
  const rect = await page.evaluate(() => {
    const r = document.getElementById('box-canvas').getBoundingClientRect();
    return { left: r.left, top: r.top, width: r.width, height: r.height };
  });
  return (x, y) => ({
    x: rect.left + (x / imageSize.width) * rect.width,
    y: rect.top + (y / imageSize.height) * rect.height,
  });
}

async function dragMouse(page, from, to) {
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  await page.mouse.move((from.x + to.x) / 2, (from.y + to.y) / 2, { steps: 5 });
  await page.mouse.move(to.x, to.y, { steps: 5 });
  await page.mouse.up();
}

/** A one-finger drag through CDP touch events (the page sees pointerType "touch"). */
async function dragTouch(page, cdp, from, to) {
  const point = (p) => [{ x: p.x, y: p.y, radiusX: 4, radiusY: 4, force: 1, id: 1 }];
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: point(from) });
  for (let i = 1; i <= 8; i += 1) {
    const p = { x: from.x + ((to.x - from.x) * i) / 8, y: from.y + ((to.y - from.y) * i) / 8 };
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchMove', touchPoints: point(p) });
  }
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
}

/** Records every text the busy overlay shows, so short busy states are not missed. */
async function recordBusyTexts(page) {
  await page.evaluate(() => {
    window.__busyTexts = [];
    const target = document.getElementById('busy-text');
    const busy = document.getElementById('busy');
    const sub = document.getElementById('busy-sub');
    window.__busySubs = [];
    const note = () => { if (!busy.hidden) window.__busyTexts.push(target.textContent); };
    new MutationObserver(note).observe(target, { childList: true, characterData: true, subtree: true });
    new MutationObserver(note).observe(busy, { attributes: true, attributeFilter: ['hidden'] });
    new MutationObserver(() => { if (!busy.hidden) window.__busySubs.push(sub.textContent); })
      .observe(sub, { childList: true, characterData: true, subtree: true });
  });
}

async function horizontalOverflow(page) {
  return page.evaluate(() => {
    const vw = document.documentElement.clientWidth;
    const offenders = [];
    for (const node of document.querySelectorAll('body *')) {
      const r = node.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;
      const cs = getComputedStyle(node);
      if (cs.visibility === 'hidden' || cs.display === 'none') continue;
      if (node.closest('.visually-hidden, .skip-link')) continue;
      if (node.closest('details:not([open])') && !node.closest('summary')) continue; // closed: not shown
      if (r.right > vw + 0.5 || r.left < -0.5) {
        offenders.push(`${node.tagName.toLowerCase()}${node.id ? `#${node.id}` : ''}.${[...node.classList].join('.')} [${Math.round(r.left)}, ${Math.round(r.right)}]`);
      }
    }
    return { scrollWidth: document.documentElement.scrollWidth, viewport: vw, offenders: offenders.slice(0, 8) };
  });
}

async function checkNoOverflow(page, label) {
  const o = await horizontalOverflow(page);
  check(`${label}: nothing overflows 375 px horizontally`, o.scrollWidth <= o.viewport && o.offenders.length === 0,
    `scrollWidth ${o.scrollWidth}, viewport ${o.viewport}${o.offenders.length ? `, offenders: ${o.offenders.join('; ')}` : ''}`);
}

function boxClose(sent, want, tol) {
  return ['x_min', 'y_min', 'x_max', 'y_max'].every((k) => Math.abs(sent[k] - want[k]) <= tol);
}

/** A product image with transparency, drawn in the page: a teal mug on a clear background. */
async function makeProductPng(page) {
  const b64 = await page.evaluate(async () => {
    const c = document.createElement('canvas');
    c.width = 240; c.height = 240;
    const g = c.getContext('2d');
    const body = g.createLinearGradient(40, 0, 180, 0);
    body.addColorStop(0, '#0f766e'); body.addColorStop(0.5, '#2dd4bf'); body.addColorStop(1, '#115e59');
    g.lineWidth = 18; g.strokeStyle = '#0f766e';
    g.beginPath(); g.arc(182, 120, 34, -Math.PI / 2, Math.PI / 2); g.stroke();
    g.fillStyle = body;
    g.beginPath(); g.roundRect(40, 50, 144, 150, [8, 8, 36, 36]); g.fill();
    g.fillStyle = 'rgba(255,255,255,.85)';
    g.font = 'bold 34px sans-serif'; g.textAlign = 'center'; g.fillText('NEW', 112, 136);
    const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let s = '';
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s);
  });
  return Buffer.from(b64, 'base64');
}

/** The settings controls as the user sees them: values, switches and the values shown beside them. */
async function readSettingControls(page) {
  return page.evaluate(() => {
    const $ = (id) => document.getElementById(id);
    const method = document.querySelector('input[name="grading_method"]:checked');
    return {
      scale: $('scale').value, feather: $('feather').value, strength: $('strength').value,
      blending: $('blending').checked, grading: $('grading').checked, method: method ? method.value : null,
      shown: [$('scale-value').textContent, $('feather-value').textContent, $('strength-value').textContent],
    };
  });
}

const DOWNLOAD_LINKS = ['#download', '#download-full', '#download-cutout', '#download-mask'];

/** Which download links are enabled (aria-disabled false and a real href). */
async function enabledLinks(page) {
  return page.evaluate((ids) => ids.filter((id) => {
    const a = document.querySelector(id);
    return a.getAttribute('aria-disabled') === 'false' && a.hasAttribute('href');
  }), DOWNLOAD_LINKS);
}

/** Clicks a download link and returns {name, bytes} of what the browser saved. */
async function downloadVia(page, selector, saveAs) {
  const [download] = await Promise.all([page.waitForEvent('download'), page.click(selector)]);
  const saved = path.join(OUT, saveAs);
  await download.saveAs(saved);
  return { name: download.suggestedFilename(), bytes: fs.readFileSync(saved), url: download.url() };
}

/** Records the text fields the page puts into FormData (the bytes on the wire are read separately, by captureRequests). */
function recordFormFields() {
  window.__formFields = {};
  const append = FormData.prototype.append;
  FormData.prototype.append = function record(name, value, ...rest) {
    window.__formFields[name] = typeof value === 'string' ? value : `[file ${value && value.name}]`;
    return append.call(this, name, value, ...rest);
  };
}

/** coffee.png upscaled `factor` times in the page, as a JPEG (a photo wider than MAX_IMAGE_WIDTH). */
async function makeBigScene(page, factor) {
  const b64 = await page.evaluate(async ({ src, k }) => {
    // A blob: URL, as the app's own images are: the page's Content-Security-Policy allows
    // images from the server and blob: URLs only.
    const png = Uint8Array.from(atob(src), (ch) => ch.charCodeAt(0));
    const img = new Image();
    img.src = URL.createObjectURL(new Blob([png], { type: 'image/png' }));
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.naturalWidth * k; c.height = img.naturalHeight * k;
    const g = c.getContext('2d');
    g.imageSmoothingQuality = 'high';
    g.drawImage(img, 0, 0, c.width, c.height);
    const blob = await new Promise((r) => c.toBlob(r, 'image/jpeg', 0.9));
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let s = '';
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s);
  }, { src: fs.readFileSync(SCENE).toString('base64'), k: factor });
  return Buffer.from(b64, 'base64');
}

async function canvasRect(page) {
  return page.evaluate(() => {
    const r = document.getElementById('box-canvas').getBoundingClientRect();
    return { left: r.left, top: r.top, width: r.width, height: r.height };
  });
}

const fmtBox = (b) => `(${['x_min', 'y_min', 'x_max', 'y_max'].map((k) => Number(b[k]).toFixed(1)).join(', ')})`;

/** The upload answer in the Flask client's terms: original_* = the working image, source_* = the photo. */
function checkUploadWire(label, up, source) {
  check(`${label}: upload answer original_width/original_height equal width/height (the working image the Flask client scales its box by)`,
    up.original_width === up.width && up.original_height === up.height,
    `width ${up.width}x${up.height}, original ${up.original_width}x${up.original_height}`);
  check(`${label}: upload answer source_width/source_height are the photo's own size (${source.width}x${source.height})`,
    up.source_width === source.width && up.source_height === source.height,
    `source ${up.source_width}x${up.source_height}`);
}

/**
 * The page's own outline of the box on the canvas backing store: the indigo stroke is found
 * at the four edge midpoints of `box` (working-image pixels) scaled by canvas size / image size.
 */
async function checkOutlineDrawn(page, label, box, size) {
  const found = await page.evaluate(({ b, sz }) => {
    const c = document.getElementById('box-canvas');
    const g = c.getContext('2d');
    const sx = c.width / sz.width;
    const sy = c.height / sz.height;
    const r = Math.ceil(2 * devicePixelRatio) + 2;
    const indigoNear = (cx, cy) => {
      const x0 = Math.max(0, Math.round(cx) - r);
      const y0 = Math.max(0, Math.round(cy) - r);
      const w = Math.min(c.width - x0, 2 * r + 1);
      const h = Math.min(c.height - y0, 2 * r + 1);
      const d = g.getImageData(x0, y0, w, h).data;
      for (let i = 0; i < d.length; i += 4) {
        if (Math.abs(d[i] - 79) <= 16 && Math.abs(d[i + 1] - 70) <= 16 && Math.abs(d[i + 2] - 229) <= 16 && d[i + 3] >= 200) return true;
      }
      return false;
    };
    const mx = ((b.x_min + b.x_max) / 2) * sx;
    const my = ((b.y_min + b.y_max) / 2) * sy;
    return {
      left: indigoNear(b.x_min * sx, my), right: indigoNear(b.x_max * sx, my),
      top: indigoNear(mx, b.y_min * sy), bottom: indigoNear(mx, b.y_max * sy),
      canvas: `${c.width}x${c.height}`,
    };
  }, { b: box, sz: size });
  const sides = ['left', 'right', 'top', 'bottom'];
  check(`${label}: the page draws the box outline where the user dragged`, sides.every((k) => found[k]),
    `canvas ${found.canvas} backing px; outline found at ${sides.filter((k) => found[k]).join(', ') || 'no side'}`);
}

/** The box sent to /generate_mask: working-image pixels, inside width x height, where the user drew. */
function checkBoxOnWire(label, sent, up, drawn, rect) {
  check(`${label}: box sent to /generate_mask lies within the upload answer's width x height (${up.width}x${up.height})`,
    boxInside(sent, up.width, up.height), JSON.stringify(sent));
  const perCssPx = up.width / rect.width; // working-image pixels per CSS pixel
  const tol = 1 + 1.5 * perCssPx;
  const d = boxDistance(sent, drawn);
  check(`${label}: box sent lands where the user drew (drag on the ${rect.width.toFixed(1)} CSS px canvas scaled by width ${up.width} / canvas width)`,
    d <= tol, `sent ${JSON.stringify(sent)}, drawn ${fmtBox(drawn)}, off by ${d.toFixed(1)} px (tolerance ${tol.toFixed(1)})`);
}

/**
 * The multipart body of the last /replace_product request, as Chromium sent it: the product
 * file and color_grade_strength as a fraction 0–1 (at most 2 decimals) equal to slider / 100.
 */
function checkReplaceBody(label, captured, sliderPercent) {
  const req = captured[captured.length - 1];
  if (!check(`${label}: /replace_product multipart body captured`, req && req.body && /multipart\/form-data/i.test(req.contentType),
    req ? `${req.contentType}, ${req.body ? req.body.length : 'no'} bytes` : 'no request seen')) return null;
  let parsed;
  try {
    parsed = parseMultipart(req.body, req.contentType);
  } catch (err) {
    check(`${label}: /replace_product body is well-formed multipart`, false, err.message);
    return null;
  }
  const { fields, files } = parsed;
  check(`${label}: /replace_product body carries the product image file`,
    files.product_image && files.product_image.bytes > 100, JSON.stringify(files));
  const strength = fields.color_grade_strength;
  check(`${label}: color_grade_strength on the wire is a fraction 0–1 equal to the slider (${sliderPercent} %) / 100`,
    isWireFraction(strength) && Math.abs(Number(strength) - sliderPercent / 100) < 1e-9,
    `sent "${strength}"`);
  return fields;
}

/* ------------------------------------------------------------ desktop pass */

async function desktopPass(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 2, acceptDownloads: true });
  await context.addInitScript(recordFormFields);
  const page = await context.newPage();
  watchPage(page, 'desktop');
  try {
    // Login page, wrong password.
    await page.goto(`${BASE}/`);
    must('login page is shown when logged out', await page.isVisible('#password'));
    await shot(page, '01-login');
    const bad = await login(page, 'not-the-password');
    must('wrong password answers 401', bad.status() === 401, `status ${bad.status()}`);
    const errText = (await page.textContent('#login-error').catch(() => '')) || '';
    must('wrong password shows an error on the login page', errText.trim().length > 0, errText.trim());
    await shot(page, '02-login-wrong-password');

    // Log in.
    const good = await login(page, PASSWORD);
    must('right password redirects (303)', good.status() === 303, `status ${good.status()}`);
    await page.waitForSelector('#scene-dropzone', { state: 'visible' });
    check('main page after login', await page.isVisible('#logout'));
    await page.waitForFunction(() => !/Checking/.test(document.getElementById('model-chip-text').textContent));
    const chip = await page.textContent('#model-chip-text');
    check('model status shown from /health', /u2netp|fallback|model/i.test(chip), chip);
    check('"Generate mask" disabled before a photo', await page.isDisabled('#generate-mask'));
    const defaultSettings = await readSettingControls(page);
    check('Reset settings disabled while the settings are the defaults', await page.isDisabled('#settings-reset'));
    check('no download is offered before a mask or a result', (await enabledLinks(page)).length === 0,
      JSON.stringify(await enabledLinks(page)));
    await shot(page, '03-main-empty');

    // A server error is shown verbatim: upload a text file as the scene.
    const [errResp] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith('/upload_image')),
      dropFile(page, '#stage', Buffer.from('this is not an image\n'), 'notes.txt', 'text/plain'),
    ]);
    let serverMessage = '';
    try { serverMessage = (await errResp.json()).error; } catch (_) { serverMessage = ''; }
    await page.waitForSelector('#error-banner', { state: 'visible' });
    await page.waitForTimeout(400); // let the banner finish sliding in before the screenshot
    const shown = (await page.textContent('#error-message')).trim();
    check('non-image upload is refused by the server (4xx)', errResp.status() >= 400 && errResp.status() < 500, `status ${errResp.status()}`);
    check('server error message shown verbatim', serverMessage && shown === serverMessage, `server: "${serverMessage}", page: "${shown}"`);
    await shot(page, '04-server-error-shown');
    await page.click('#error-dismiss');

    // Upload coffee.png through the file picker.
    const [chooser] = await Promise.all([page.waitForEvent('filechooser'), page.click('#scene-button')]);
    const [upResp] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith('/upload_image')),
      chooser.setFiles(SCENE),
    ]);
    const up = await upResp.json();
    must('upload_image succeeds', upResp.status() === 200 && up.success, JSON.stringify(up));
    must('working image of coffee.png is 600x400', up.width === 600 && up.height === 400, `${up.width}x${up.height}`);
    checkUploadWire('desktop', up, { width: 600, height: 400 });
    await page.waitForSelector('#figure', { state: 'visible' });
    await page.waitForFunction(() => document.getElementById('stage-img').complete && document.getElementById('stage-img').naturalWidth > 0);
    const natural = await page.evaluate(() => {
      const i = document.getElementById('stage-img');
      const r = i.getBoundingClientRect();
      return { nw: i.naturalWidth, nh: i.naturalHeight, cw: r.width, ch: r.height, dpr: devicePixelRatio };
    });
    check('scene shown fitted to the window (display size differs from natural size)',
      natural.nw === 600 && Math.abs(natural.cw / natural.ch - 1.5) < 0.02 && Math.abs(natural.cw - 600) > 1,
      `natural ${natural.nw}x${natural.nh}, shown ${natural.cw.toFixed(1)}x${natural.ch.toFixed(1)} CSS px at DPR ${natural.dpr}`);
    check('"Generate mask" disabled until a box exists', await page.isDisabled('#generate-mask'));
    await shot(page, '05-scene-uploaded');

    // Keyboard: Enter on the canvas adds a box, arrows move it, Delete clears it.
    await page.focus('#box-canvas');
    await page.keyboard.press('Enter');
    const kbBox = await page.textContent('#box-readout');
    await page.keyboard.press('ArrowRight');
    const kbMoved = await page.textContent('#box-readout');
    await page.keyboard.press('Delete');
    const kbCleared = await page.textContent('#box-readout');
    check('box can be added, moved and cleared from the keyboard',
      /Box 300 × 200 px at \(150, 100\)/.test(kbBox) && kbMoved !== kbBox && !/Box/.test(kbCleared), `${kbBox} | ${kbMoved} | ${kbCleared}`);

    // Draw a wrong box, then redraw it around the cup.
    const imgSize = { width: up.width, height: up.height };
    const toScreen = await imageToScreen(page, imgSize);
    await dragMouse(page, toScreen(20, 300), toScreen(120, 380));
    const firstReadout = await page.textContent('#box-readout');
    check('a box can be drawn with the mouse', /Box \d+ × \d+/.test(firstReadout), firstReadout);
    const cupFrom = toScreen(CUP_BOX.x_min, CUP_BOX.y_min);
    const cupTo = toScreen(CUP_BOX.x_max, CUP_BOX.y_max);
    await dragMouse(page, cupFrom, cupTo);
    const drawnRect = await canvasRect(page);
    const drawn = boxFromDrag(drawnRect, cupFrom, cupTo, imgSize);
    await checkOutlineDrawn(page, 'desktop', drawn, imgSize);
    const readout = await page.textContent('#box-readout');
    check('the box can be redrawn', readout !== firstReadout, readout);

    // Undo / redo of the box: the buttons, Ctrl+Z, Ctrl+Shift+Z and Ctrl+Y.
    const readBox = () => page.textContent('#box-readout');
    check('Undo enabled after a box change, Redo not yet', await page.isEnabled('#box-undo') && await page.isDisabled('#box-redo'));
    await page.click('#box-undo');
    const undone = await readBox();
    check('Undo (button) restores the previous box', undone === firstReadout, `${undone} | want ${firstReadout}`);
    await checkOutlineDrawn(page, 'after undo', boxFromDrag(drawnRect, toScreen(20, 300), toScreen(120, 380), imgSize), imgSize);
    check('Redo enabled after an undo', await page.isEnabled('#box-redo'));
    await page.click('#box-redo');
    check('Redo (button) brings the box back', (await readBox()) === readout, await readBox());
    await page.keyboard.press('Control+z');
    check('Ctrl+Z restores the previous box', (await readBox()) === firstReadout, await readBox());
    await page.keyboard.press('Control+Shift+z');
    check('Ctrl+Shift+Z redoes', (await readBox()) === readout, await readBox());
    await page.keyboard.press('Control+z');
    await page.keyboard.press('Control+y');
    check('Ctrl+Y redoes', (await readBox()) === readout, await readBox());
    check('Redo disabled once everything is redone', await page.isDisabled('#box-redo'));
    await checkOutlineDrawn(page, 'after redo', drawn, imgSize);
    check('"Generate mask" enabled once a box exists', await page.isEnabled('#generate-mask'));
    await shot(page, '06-box-drawn');

    // Generate the mask (first use loads the model).
    await recordBusyTexts(page);
    const maskReq = page.waitForRequest((r) => r.url().endsWith('/generate_mask'));
    const maskResp = page.waitForResponse((r) => r.url().endsWith('/generate_mask'), { timeout: MASK_TIMEOUT_MS });
    await page.click('#generate-mask');
    const sent = (await maskReq).postDataJSON();
    check('box sent in working-image pixels (mapped through display scale and DPR)', boxClose(sent, CUP_BOX, 3), JSON.stringify(sent));
    checkBoxOnWire('desktop', sent, up, drawn, drawnRect);
    await page.waitForTimeout(300);
    if (await page.isVisible('#busy')) await shot(page, '07-generating');
    const mr = await maskResp;
    const mask = await mr.json();
    must('generate_mask succeeds', mr.status() === 200 && mask.success, `${mr.status()} ${JSON.stringify(mask)}`);
    await page.waitForSelector('#mask-info', { state: 'visible' });
    const busyTexts = await page.evaluate(() => window.__busyTexts);
    check('busy state said what was happening', busyTexts.some((t) => /loading model \(first use\)|segmenting/i.test(t)), JSON.stringify([...new Set(busyTexts)]));
    check('mask from the neural model, not the box fallback', mask.fallback === false && mask.kind !== 'box', `model ${mask.model}, kind ${mask.kind}`);
    const bb = mask.bbox || {};
    check('mask lies within the drawn box', bb.x_min >= sent.x_min - 2 && bb.y_min >= sent.y_min - 2 && bb.x_max <= sent.x_max + 2 && bb.y_max <= sent.y_max + 2, JSON.stringify(bb));
    const boxArea = (sent.x_max - sent.x_min) * (sent.y_max - sent.y_min);
    check('mask covers a sensible part of the box', mask.mask_pixels > boxArea * 0.15 && mask.mask_pixels < boxArea * 0.98, `${mask.mask_pixels} of ${boxArea} px, ${mask.elapsed_ms} ms`);
    check('mask overlay view selected', await page.getAttribute('[data-view="mask"]', 'aria-pressed') === 'true');
    await page.waitForFunction(() => document.getElementById('stage-img').complete);
    await shot(page, '08-mask');

    // Downloads of the mask: offered now, the result's not yet.
    const afterMask = await enabledLinks(page);
    check('cut-out and mask downloads enabled once there is a mask, result downloads not yet',
      afterMask.includes('#download-cutout') && afterMask.includes('#download-mask') && !afterMask.includes('#download') && !afterMask.includes('#download-full'),
      JSON.stringify(afterMask));
    const cut = await downloadVia(page, '#download-cutout', 'downloaded-product_cutout.png');
    check('cut-out download is named product_cutout.png', cut.name === 'product_cutout.png', cut.name);
    checkCutoutPng(cut.bytes, sent, mask);
    const maskFile = await downloadVia(page, '#download-mask', 'downloaded-product_mask.png');
    check('mask download is named product_mask.png', maskFile.name === 'product_mask.png', maskFile.name);
    checkMaskPng(maskFile.bytes, sent, mask);

    // A new box makes the mask stale; undoing back to the box the mask was made for makes it current again.
    await dragMouse(page, toScreen(30, 30), toScreen(110, 110));
    const staleInfo = (await page.textContent('#mask-info')).trim();
    check('a different box marks the mask stale', /box has changed/i.test(staleInfo), staleInfo);
    await page.keyboard.press('Control+z');
    const freshInfo = (await page.textContent('#mask-info')).trim();
    check('Ctrl+Z back to the mask\'s box makes the mask current again', /^Mask ready/.test(freshInfo) && (await readBox()) === readout,
      `${freshInfo} | ${await readBox()}`);

    // Product image by drag-and-drop (a PNG with transparency made in the page).
    const product = await makeProductPng(page);
    fs.writeFileSync(path.join(OUT, 'product.png'), product);
    await dropFile(page, '#product-dropzone', product, 'teal-mug.png', 'image/png');
    await page.waitForSelector('#product-thumb-wrap', { state: 'visible' });
    check('product thumbnail shown', (await page.textContent('#product-title')).includes('teal-mug.png'));

    // Settings: scale with the keyboard, feathering by value.
    await page.focus('#scale');
    for (let i = 0; i < 4; i += 1) await page.keyboard.press('ArrowRight');
    check('scale changed with the keyboard and its value shown', (await page.textContent('#scale-value')) === '1.20×', await page.textContent('#scale-value'));
    await page.fill('#feather', '20');
    check('feathering changed and its value shown', (await page.textContent('#feather-value')) === '20 px', await page.textContent('#feather-value'));
    check('grading strength disabled while colour grading is off', await page.isDisabled('#strength'));
    await page.click('label[for="grading"]');
    await page.click('label[for="grade-image"]');
    check('colour grading switched on from its label; strength enabled', await page.isChecked('#grading') && await page.isEnabled('#strength'));
    await page.fill('#strength', '30');
    check('grading strength changed and shown as a percentage', (await page.textContent('#strength-value')) === '30 %', await page.textContent('#strength-value'));
    check('"Replace product" enabled', await page.isEnabled('#replace'));
    await shot(page, '09-product-and-settings');

    // Replace.
    const replaceBodies = await captureRequests(page, '**/replace_product');
    const sliderPercent = Number(await page.inputValue('#strength'));
    const replResp = page.waitForResponse((r) => r.url().endsWith('/replace_product'), { timeout: 120_000 });
    await page.click('#replace');
    const rr = await replResp;
    const fields = await page.evaluate(() => window.__formFields);
    const wireFields = checkReplaceBody('desktop', replaceBodies, sliderPercent);
    check('the FormData the page built and the body on the wire agree', wireFields &&
      Object.entries(fields).every(([k, v]) => v.startsWith('[file ') || wireFields[k] === v),
      `FormData ${JSON.stringify(fields)} | wire ${JSON.stringify(wireFields)}`);
    check('replace sends the chosen settings',
      fields.scale_factor === '1.20' && fields.feather_amount === '20' && fields.use_blending === 'true' &&
      fields.enable_color_grading === 'true' && fields.grading_method === 'Match Entire Image',
      JSON.stringify(fields));
    const repl = await rr.json();
    must('replace_product succeeds', rr.status() === 200 && repl.success, `${rr.status()} ${JSON.stringify(repl)}`);
    await page.waitForFunction(() => document.querySelector('[data-view="result"]').getAttribute('aria-pressed') === 'true');
    await page.waitForFunction(() => document.getElementById('stage-img').complete);
    await shot(page, '10-result');
    await page.click('[data-view="compare"]');
    await page.waitForFunction(() => document.getElementById('compare-after').complete && document.getElementById('compare-before').complete);
    await shot(page, '11-compare');

    // Download and check the PNG.
    check('Download enabled', (await page.getAttribute('#download', 'aria-disabled')) === 'false');
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
    check('download is named product_replaced_image.png', download.suggestedFilename() === 'product_replaced_image.png', download.suggestedFilename());
    const savedPath = path.join(OUT, 'downloaded-product_replaced_image.png');
    await download.saveAs(savedPath);
    checkDownloadedPng(fs.readFileSync(savedPath), sent);
    const allLinks = await enabledLinks(page);
    check('every download is enabled once there is a result', DOWNLOAD_LINKS.every((id) => allLinks.includes(id)), JSON.stringify(allLinks));

    // Full resolution: PNG by default, JPEG with its quality, WebP.
    check('full-resolution download defaults to PNG, the quality field hidden',
      (await page.getAttribute('#download-full', 'href')) === '/download_full?format=png' && !(await page.isVisible('#download-quality')),
      await page.getAttribute('#download-full', 'href'));
    const fullPng = await downloadVia(page, '#download-full', 'downloaded-full.png');
    checkFullPng(fullPng.bytes, sent);
    await page.selectOption('#download-format', 'jpeg');
    check('choosing JPEG shows its quality field', await page.isVisible('#download-quality'));
    await page.fill('#download-quality', '80');
    // Typing in a field: Ctrl+Z is the field's own undo, the box stays.
    const boxBeforeTyping = await readBox();
    await page.focus('#download-quality');
    await page.keyboard.press('Control+z');
    check('Ctrl+Z while typing in a field leaves the box alone', (await readBox()) === boxBeforeTyping, await readBox());
    await page.fill('#download-quality', '80');
    const jpegHref = await page.getAttribute('#download-full', 'href');
    check('JPEG link carries format and quality', jpegHref === '/download_full?format=jpeg&quality=80', jpegHref);
    const fullJpeg = await downloadVia(page, '#download-full', 'downloaded-full.jpg');
    const jpegDims = jpegSize(fullJpeg.bytes);
    check('full-resolution JPEG is a JPEG of the photo\'s size (600x400)', jpegDims && jpegDims.width === 600 && jpegDims.height === 400,
      `${fullJpeg.name}, ${fullJpeg.bytes.length} bytes, ${JSON.stringify(jpegDims)}`);
    await page.selectOption('#download-format', 'webp');
    check('WebP hides the quality field again', !(await page.isVisible('#download-quality')));
    const fullWebp = await downloadVia(page, '#download-full', 'downloaded-full.webp');
    const b = fullWebp.bytes;
    check('full-resolution WebP is a lossless WebP', b.length > 30 && b.toString('latin1', 0, 4) === 'RIFF' &&
      b.toString('latin1', 8, 12) === 'WEBP' && b.toString('latin1', 12, 16) === 'VP8L', `${fullWebp.name}, ${b.length} bytes`);
    await page.selectOption('#download-format', 'png');

    // Reset: back to the settings the page loaded with, and the next replace sends them.
    check('Reset settings enabled once settings differ from the defaults', await page.isEnabled('#settings-reset'));
    await page.click('#settings-reset');
    const resetSettings = await readSettingControls(page);
    check('Reset settings restores every default, values shown included', JSON.stringify(resetSettings) === JSON.stringify(defaultSettings),
      `${JSON.stringify(resetSettings)} | defaults ${JSON.stringify(defaultSettings)}`);
    check('after a reset the result is marked as out of date and Reset is disabled',
      /Settings changed/.test(await page.textContent('#replace-hint')) && await page.isDisabled('#settings-reset'),
      await page.textContent('#replace-hint'));
    const resetBodies = await captureRequests(page, '**/replace_product');
    const again = page.waitForResponse((r) => r.url().endsWith('/replace_product'), { timeout: 120_000 });
    await page.click('#replace');
    check('replace after a reset succeeds', (await again).status() === 200);
    const resetWire = resetBodies.length ? parseMultipart(resetBodies[resetBodies.length - 1].body, resetBodies[resetBodies.length - 1].contentType).fields : {};
    check('replace after a reset sends the defaults',
      resetWire.scale_factor === Number(defaultSettings.scale).toFixed(2) && resetWire.feather_amount === defaultSettings.feather &&
      resetWire.use_blending === String(defaultSettings.blending) && resetWire.enable_color_grading === String(defaultSettings.grading) &&
      resetWire.color_grade_strength === String(Number(defaultSettings.strength) / 100) && resetWire.grading_method === defaultSettings.method,
      JSON.stringify(resetWire));
    await page.unroute('**/replace_product');
    await page.waitForFunction(() => !document.getElementById('replace').disabled);
    await shot(page, '12-after-reset');

    // Keyboard: the buttons are reachable and the view buttons work with Enter.
    await page.focus('[data-view="scene"]');
    await page.keyboard.press('Enter');
    check('view buttons work from the keyboard', await page.getAttribute('[data-view="scene"]', 'aria-pressed') === 'true');

    // Logout.
    await Promise.all([page.waitForURL(`${BASE}/`), page.click('#logout')]);
    await page.waitForSelector('#password');
    check('logout returns to the login page', await page.isVisible('#password'));
    const after = await page.request.get(`${BASE}/get_image`);
    check('after logout the API refuses (401)', after.status() === 401, `status ${after.status()}`);
  } catch (err) {
    check('desktop pass ran to the end', false, err.message.split('\n')[0]);
    await shot(page, 'desktop-FAILURE').catch(() => {});
  } finally {
    await context.close();
  }
}

function checkDownloadedPng(bytes, box) {
  let result;
  try {
    result = decodePng(bytes);
  } catch (err) {
    check('downloaded file is a PNG', false, err.message);
    return;
  }
  check('downloaded file is a PNG', true, `${bytes.length} bytes`);
  const original = decodePng(fs.readFileSync(SCENE));
  check('downloaded PNG is the working image size (600x400)', result.width === 600 && result.height === 400, `${result.width}x${result.height}`);
  if (result.width !== original.width || result.height !== original.height) return;
  const margin = 2;
  let outside = 0;
  let outsideDiff = 0;
  let insideDiff = 0;
  for (let y = 0; y < result.height; y += 1) {
    for (let x = 0; x < result.width; x += 1) {
      const i = (y * result.width + x) * 4;
      const same = result.data[i] === original.data[i] && result.data[i + 1] === original.data[i + 1] && result.data[i + 2] === original.data[i + 2];
      const inBox = x >= box.x_min - margin && x <= box.x_max + margin && y >= box.y_min - margin && y <= box.y_max + margin;
      if (inBox) { if (!same) insideDiff += 1; } else { outside += 1; if (!same) outsideDiff += 1; }
    }
  }
  const corners = [[0, 0], [599, 0], [0, 399], [599, 399], [20, 20], [580, 380]].every(([x, y]) => {
    const i = (y * 600 + x) * 4;
    return [0, 1, 2].every((c) => result.data[i + c] === original.data[i + c]);
  });
  check('corner pixels equal the original', corners);
  check('every pixel outside the box equals the original', outsideDiff === 0, `${outsideDiff} of ${outside} differ`);
  check('pixels inside the box were replaced', insideDiff > 1000, `${insideDiff} px changed`);
}

/** PNG colour type (IHDR byte 25) and whether a tRNS chunk is present: the file's own alpha, not the decoder's. */
function pngAlphaKind(bytes) {
  const colorType = bytes.length > 25 ? bytes[25] : -1;
  return { colorType, alpha: colorType === 4 || colorType === 6 || bytes.includes(Buffer.from('tRNS', 'latin1')) };
}

/** The cut-out: the working image's size, with alpha; transparent outside the box; opaque pixels are the scene's. */
function checkCutoutPng(bytes, box, mask) {
  let img;
  try {
    img = decodePng(bytes);
  } catch (err) {
    check('cut-out is a PNG', false, err.message);
    return;
  }
  const kind = pngAlphaKind(bytes);
  check('cut-out is a PNG with an alpha channel', kind.alpha, `colour type ${kind.colorType}`);
  check('cut-out is the working image size (600x400)', img.width === 600 && img.height === 400, `${img.width}x${img.height}`);
  if (img.width !== 600 || img.height !== 400) return;
  const scene = decodePng(fs.readFileSync(SCENE));
  const margin = 2;
  let outsideVisible = 0;
  let opaque = 0;
  let notScene = 0;
  for (let y = 0; y < img.height; y += 1) {
    for (let x = 0; x < img.width; x += 1) {
      const i = (y * img.width + x) * 4;
      const a = img.data[i + 3];
      const inBox = x >= box.x_min - margin && x < box.x_max + margin && y >= box.y_min - margin && y < box.y_max + margin;
      if (!inBox && a !== 0) outsideVisible += 1;
      if (a >= 128) {
        opaque += 1;
        if ([0, 1, 2].some((c) => img.data[i + c] !== scene.data[i + c])) notScene += 1;
      }
    }
  }
  check('every pixel of the cut-out outside the box is transparent', outsideVisible === 0, `${outsideVisible} visible outside`);
  check('the cut-out shows as many pixels as the mask has', Math.abs(opaque - mask.mask_pixels) <= mask.mask_pixels * 0.01,
    `${opaque} opaque, mask ${mask.mask_pixels}`);
  check('the cut-out\'s visible pixels are the scene\'s own', notScene === 0, `${notScene} differ`);
}

/** The mask: the working image's size, white inside the mask, nothing white outside the box. */
function checkMaskPng(bytes, box, mask) {
  let img;
  try {
    img = decodePng(bytes);
  } catch (err) {
    check('mask download is a PNG', false, err.message);
    return;
  }
  check('mask download is the working image size (600x400)', img.width === 600 && img.height === 400, `${img.width}x${img.height}`);
  let white = 0;
  let whiteOutside = 0;
  for (let y = 0; y < img.height; y += 1) {
    for (let x = 0; x < img.width; x += 1) {
      if (img.data[(y * img.width + x) * 4] < 128) continue;
      white += 1;
      if (x < box.x_min - 2 || x >= box.x_max + 2 || y < box.y_min - 2 || y >= box.y_max + 2) whiteOutside += 1;
    }
  }
  check('mask download is white where the mask is, only inside the box',
    whiteOutside === 0 && Math.abs(white - mask.mask_pixels) <= mask.mask_pixels * 0.01, `${white} white (${whiteOutside} outside), mask ${mask.mask_pixels}`);
}

/** The full-resolution PNG of a photo no larger than the working image: its size, the scene outside the box. */
function checkFullPng(bytes, box) {
  let img;
  try {
    img = decodePng(bytes);
  } catch (err) {
    check('full-resolution PNG is a PNG', false, err.message);
    return;
  }
  const scene = decodePng(fs.readFileSync(SCENE));
  let outsideDiff = 0;
  let insideDiff = 0;
  const sized = img.width === scene.width && img.height === scene.height;
  for (let i = 0; sized && i < img.width * img.height; i += 1) {
    const x = i % img.width;
    const y = Math.floor(i / img.width);
    const same = [0, 1, 2].every((c) => img.data[i * 4 + c] === scene.data[i * 4 + c]);
    const inBox = x >= box.x_min - 2 && x <= box.x_max + 2 && y >= box.y_min - 2 && y <= box.y_max + 2;
    if (!same) { if (inBox) insideDiff += 1; else outsideDiff += 1; }
  }
  check('full-resolution PNG: the photo\'s size, replaced inside the box, the photo outside',
    sized && outsideDiff === 0 && insideDiff > 1000, `${img.width}x${img.height}, ${outsideDiff} differ outside, ${insideDiff} inside`);
}

/** Width and height from a JPEG's start-of-frame marker, or null when it is not a JPEG. */
function jpegSize(bytes) {
  if (bytes.length < 4 || bytes[0] !== 0xff || bytes[1] !== 0xd8) return null;
  let at = 2;
  while (at + 9 < bytes.length) {
    if (bytes[at] !== 0xff) return null;
    const marker = bytes[at + 1];
    const length = bytes.readUInt16BE(at + 2);
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return { height: bytes.readUInt16BE(at + 5), width: bytes.readUInt16BE(at + 7) };
    }
    at += 2 + length;
  }
  return null;
}

/* ------------------------------------------------------------ phone pass */

async function phonePass(browser) {
  const context = await browser.newContext({
    viewport: { width: 375, height: 812 }, deviceScaleFactor: 3, isMobile: true, hasTouch: true, acceptDownloads: true,
  });
  const page = await context.newPage();
  watchPage(page, 'phone');
  const cdp = await context.newCDPSession(page);
  try {
    await page.goto(`${BASE}/`);
    await shot(page, 'm01-login');
    await checkNoOverflow(page, 'phone login');
    const good = await login(page, PASSWORD);
    must('phone: login', good.status() === 303, `status ${good.status()}`);
    await page.waitForSelector('#scene-dropzone', { state: 'visible' });
    await page.waitForFunction(() => !/Checking/.test(document.getElementById('model-chip-text').textContent));
    await shot(page, 'm02-main-empty');
    await checkNoOverflow(page, 'phone empty page');

    // Upload by drag-and-drop onto the stage: a photo wider than 1280 px, so the working image
    // (what the box is measured in) is smaller than the photo.
    const big = { width: 600 * BIG_FACTOR, height: 400 * BIG_FACTOR };
    const bigJpeg = await makeBigScene(page, BIG_FACTOR);
    const [upResp] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith('/upload_image')),
      dropFile(page, '#stage', bigJpeg, 'coffee-big.jpg', 'image/jpeg'),
    ]);
    const up = await upResp.json();
    const wantH = (big.height * MAX_IMAGE_WIDTH) / big.width;
    must('phone: upload by drag-and-drop', upResp.status() === 200 && up.width === MAX_IMAGE_WIDTH && Math.abs(up.height - wantH) <= 1,
      `${big.width}x${big.height} JPEG (${bigJpeg.length} bytes) -> ${JSON.stringify(up)}`);
    checkUploadWire('phone', up, big);
    await page.waitForSelector('#figure', { state: 'visible' });
    await page.waitForFunction(() => document.getElementById('stage-img').complete);
    const shownW = await page.evaluate(() => document.getElementById('box-canvas').getBoundingClientRect().width);
    check('phone: photo scaled down to fit the screen', shownW < 375 && shownW > 300, `${shownW.toFixed(1)} CSS px wide`);
    const sceneInfo = (await page.textContent('#scene-info')).trim();
    check('phone: scene info shows the working size and the photo\'s own size',
      sceneInfo.includes(`${up.width} × ${up.height} px`) && sceneInfo.includes(`resized from ${big.width} × ${big.height}`), sceneInfo);
    await checkNoOverflow(page, 'phone with photo');

    // Draw the box with a finger.
    await page.evaluate(() => document.getElementById('box-canvas').scrollIntoView({ block: 'center' }));
    const workSize = { width: up.width, height: up.height };
    const toScreen = await imageToScreen(page, workSize);
    const k = up.width / 600; // coffee.png pixels -> working-image pixels
    const cupBox = { x_min: CUP_BOX.x_min * k, y_min: CUP_BOX.y_min * k, x_max: CUP_BOX.x_max * k, y_max: CUP_BOX.y_max * k };
    const scrollBefore = await page.evaluate(() => window.scrollY);
    await page.evaluate(() => {
      window.__pointerTypes = new Set();
      document.getElementById('box-canvas').addEventListener('pointerdown', (e) => window.__pointerTypes.add(e.pointerType));
    });
    const cupFrom = toScreen(cupBox.x_min, cupBox.y_min);
    const cupTo = toScreen(cupBox.x_max, cupBox.y_max);
    const drawnRect = await canvasRect(page);
    await dragTouch(page, cdp, cupFrom, cupTo);
    // A finger lifts before it taps again: Chrome drops a tap that follows a drag within ~0.5 s.
    await page.waitForTimeout(800);
    const pointerTypes = await page.evaluate(() => [...window.__pointerTypes]);
    const scrollAfter = await page.evaluate(() => window.scrollY);
    check('phone: box drawn with touch pointer events', pointerTypes.includes('touch') && await page.isEnabled('#generate-mask'), `pointer types ${JSON.stringify(pointerTypes)}`);
    check('phone: dragging on the canvas does not scroll the page', scrollAfter === scrollBefore, `scrollY ${scrollBefore} -> ${scrollAfter}`);
    const drawn = boxFromDrag(drawnRect, cupFrom, cupTo, workSize);
    await checkOutlineDrawn(page, 'phone', drawn, workSize);
    await shot(page, 'm03-box');

    // Mask. The first answer is a fake "busy" 503 with Retry-After: the page must wait and retry.
    let maskCalls = 0;
    await page.route('**/generate_mask', async (route) => {
      maskCalls += 1;
      if (maskCalls === 1) {
        await route.fulfill({ status: 503, headers: { 'Retry-After': '2' }, contentType: 'application/json', body: JSON.stringify({ error: 'Server busy: too many requests in the queue.' }) });
      } else {
        await route.continue();
      }
    });
    await recordBusyTexts(page);
    const maskReq = page.waitForRequest((r) => r.url().endsWith('/generate_mask') && maskCalls >= 1);
    const maskResp = page.waitForResponse((r) => r.url().endsWith('/generate_mask'), { timeout: MASK_TIMEOUT_MS });
    await page.tap('#generate-mask');
    const sent = (await maskReq).postDataJSON();
    const phoneTol = 2 * (up.width / drawnRect.width); // two CSS px: touch points land on whole CSS px
    check('phone: box mapped to working-image pixels', boxClose(sent, cupBox, phoneTol), `${JSON.stringify(sent)} vs ${fmtBox(cupBox)} ± ${phoneTol.toFixed(1)}`);
    checkBoxOnWire('phone', sent, up, drawn, drawnRect);
    await page.waitForFunction(() => window.__busyTexts.some((t) => /Server busy, retrying in/.test(t)));
    await shot(page, 'm04-busy-retrying');
    let mr = await maskResp;
    if (mr.status() === 503) mr = await page.waitForResponse((r) => r.url().endsWith('/generate_mask') && r.status() !== 503, { timeout: MASK_TIMEOUT_MS });
    must('phone: generate_mask succeeds after the busy retry', mr.status() === 200 && maskCalls === 2, `${mr.status()} after ${maskCalls} calls`);
    const busySeen = await page.evaluate(() => [...new Set(window.__busyTexts)]);
    check('phone: 503 + Retry-After shown as "server busy, retrying" and retried', busySeen.some((t) => /Server busy, retrying in \d+s/.test(t)), JSON.stringify(busySeen));
    await page.unroute('**/generate_mask');
    await page.waitForSelector('#mask-info', { state: 'visible' });
    await page.waitForFunction(() => document.getElementById('stage-img').complete);
    await page.evaluate(() => document.getElementById('figure').scrollIntoView({ block: 'start' }));
    await shot(page, 'm05-mask');
    await checkNoOverflow(page, 'phone with mask');

    // Product through the picker, then replace.
    const product = await makeProductPng(page);
    const [chooser] = await Promise.all([page.waitForEvent('filechooser'), page.tap('#product-dropzone')]);
    await chooser.setFiles({ name: 'teal-mug.png', mimeType: 'image/png', buffer: product });
    await page.waitForSelector('#product-thumb-wrap', { state: 'visible' });
    await page.fill('#scale', '0.8');
    await page.evaluate(() => document.getElementById('step-product').scrollIntoView({ block: 'start' }));
    await shot(page, 'm06-product-settings');
    await checkNoOverflow(page, 'phone with product and settings');
    const replaceBodies = await captureRequests(page, '**/replace_product');
    const sliderPercent = Number(await page.inputValue('#strength'));
    const replResp = page.waitForResponse((r) => r.url().endsWith('/replace_product'), { timeout: 120_000 });
    await page.tap('#replace');
    const rr = await replResp;
    must('phone: replace_product succeeds', rr.status() === 200, `${rr.status()} ${await rr.text()}`);
    const wireFields = checkReplaceBody('phone', replaceBodies, sliderPercent);
    check('phone: default grading strength goes out as "0.5" (the Flask client\'s default)', wireFields && wireFields.color_grade_strength === '0.5',
      wireFields ? `sent "${wireFields.color_grade_strength}"` : 'no body');
    await page.waitForFunction(() => document.querySelector('[data-view="result"]').getAttribute('aria-pressed') === 'true');
    await page.waitForFunction(() => document.getElementById('stage-img').complete);
    await page.evaluate(() => window.scrollTo(0, 0));
    await shot(page, 'm07-result');
    await page.tap('[data-view="compare"]');
    await page.waitForFunction(() => document.getElementById('compare-after').complete);
    await shot(page, 'm08-compare');
    await checkNoOverflow(page, 'phone compare view');
    await shot(page, 'm09-full-page', { fullPage: true });

    // Full resolution is the photo's own size (1800x1200), not the 1280x853 working image.
    await page.selectOption('#download-format', 'jpeg');
    const phoneFull = await downloadVia(page, '#download-full', 'downloaded-phone-full.jpg');
    const phoneDims = jpegSize(phoneFull.bytes);
    check('phone: "Download full resolution" gives the photo\'s own size, not the working image\'s',
      phoneDims && phoneDims.width === big.width && phoneDims.height === big.height, `${JSON.stringify(phoneDims)} vs ${big.width}x${big.height}`);
  } catch (err) {
    check('phone pass ran to the end', false, err.message.split('\n')[0]);
    await shot(page, 'phone-FAILURE', { fullPage: true }).catch(() => {});
  } finally {
    await context.close();
  }
}

/* ------------------------------------------------------------ model download progress */

/** Logs in on `base`, uploads coffee.png through the picker and adds the keyboard's default box. */
async function readyForMask(page, base) {
  const good = await login(page, PASSWORD, base);
  must(`${base}: login`, good.status() === 303, `status ${good.status()}`);
  await page.waitForSelector('#scene-dropzone', { state: 'visible' });
  const [chooser] = await Promise.all([page.waitForEvent('filechooser'), page.click('#scene-button')]);
  const [upResp] = await Promise.all([page.waitForResponse((r) => r.url().endsWith('/upload_image')), chooser.setFiles(SCENE)]);
  must(`${base}: upload`, upResp.status() === 200, `status ${upResp.status()}`);
  await page.waitForSelector('#figure', { state: 'visible' });
  await page.focus('#box-canvas');
  await page.keyboard.press('Enter');
  must(`${base}: a box to segment`, await page.isEnabled('#generate-mask'));
  await recordBusyTexts(page);
}

/**
 * The first mask on a server whose model is a URL served slowly: the page says it is
 * downloading, with a percentage that grows, the model chip too, and a second user's page
 * says how many requests wait for the model; both masks come from the model in the end.
 */
async function progressPass(browser) {
  if (!check('progress pass: scripts/browser-test started the slow-model server (SLOW_BASE)', Boolean(SLOW_BASE))) return;
  const contexts = [];
  try {
    const pages = [];
    for (const label of ['progress-a', 'progress-b']) {
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
      contexts.push(context);
      const page = await context.newPage();
      watchPage(page, label);
      await readyForMask(page, SLOW_BASE);
      pages.push(page);
    }
    const [a, b] = pages;
    const chipBefore = await a.textContent('#model-chip-text');
    const maskA = a.waitForResponse((r) => r.url().endsWith('/generate_mask'), { timeout: MASK_TIMEOUT_MS });
    await a.click('#generate-mask');
    await a.waitForFunction(() => /Downloading model… \d+ %/.test(document.getElementById('busy-text').textContent), null, { timeout: 30_000 });
    await shot(a, 'p01-downloading');
    const chipDuring = await a.textContent('#model-chip-text');
    check('the model chip says the model is downloading, with its percentage', /downloading \d+ %/.test(chipDuring), `${chipBefore} -> ${chipDuring}`);
    const maskB = b.waitForResponse((r) => r.url().endsWith('/generate_mask'), { timeout: MASK_TIMEOUT_MS });
    await b.click('#generate-mask');
    await b.waitForFunction(() => /2 requests are waiting for it/.test(document.getElementById('busy-sub').textContent), null, { timeout: 30_000 })
      .catch(() => {});
    await shot(b, 'p02-second-user-waiting');
    const [ra, rb] = [await maskA, await maskB];
    const [ja, jb] = [await ra.json(), await rb.json()];
    must('both first masks succeed once the model has arrived', ra.status() === 200 && rb.status() === 200, `${ra.status()} ${rb.status()}`);
    check('the masks come from the downloaded model, not the box', ja.fallback === false && jb.fallback === false && ja.kind !== 'box',
      `${ja.model} ${ja.kind}, ${jb.model} ${jb.kind}`);
    const textsA = await a.evaluate(() => window.__busyTexts);
    const percents = [...new Set(textsA.map((t) => /Downloading model… (\d+) %/.exec(t)).filter(Boolean).map((m) => Number(m[1])))];
    check('the page showed the download progress growing (several percentages, rising)',
      percents.length >= 2 && percents.every((p, i) => i === 0 || p > percents[i - 1]), JSON.stringify(percents));
    const subsA = await a.evaluate(() => window.__busySubs);
    check('the progress says how much of the model has arrived', subsA.some((t) => /[\d.]+ (KB|MB) of [\d.]+ MB/.test(t)),
      JSON.stringify([...new Set(subsA)].slice(-4)));
    const subsB = await b.evaluate(() => window.__busySubs);
    check('a second user\'s page says how many requests wait for the model', subsB.some((t) => /2 requests are waiting for it/.test(t)),
      JSON.stringify([...new Set(subsB)].slice(-4)));
    const health = await (await a.request.get(`${SLOW_BASE}/health`)).json();
    check('/health: no download listed once it is done, the queue empty',
      health.model.download === null && health.model.queue.admitted === 0 && health.model.state === 'ready', JSON.stringify({ d: health.model.download, q: health.model.queue, s: health.model.state }));
    await a.waitForFunction(() => !/downloading/.test(document.getElementById('model-chip-text').textContent));
    await shot(a, 'p03-mask-after-download');
  } catch (err) {
    check('progress pass ran to the end', false, err.message.split('\n')[0]);
  } finally {
    for (const context of contexts) await context.close();
  }
}

/* ------------------------------------------------------------ main */

async function main() {
  if (!BASE) {
    log('usage: node tests/browser/e2e.mjs <base-url> <output-dir>');
    process.exit(2);
  }
  if (!fs.existsSync(CHROMIUM)) {
    log(`FAIL  Chromium not found at ${CHROMIUM} (install Debian's chromium package)`);
    process.exit(1);
  }
  if (!fs.existsSync(SCENE)) {
    log(`FAIL  test image not found: ${SCENE}`);
    process.exit(1);
  }
  fs.mkdirSync(OUT, { recursive: true });
  log(`Drishya browser test against ${BASE}, screenshots in ${path.relative(REPO, OUT) || OUT}`);

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
    ],
  });
  log(`Chromium ${browser.version()}`);
  try {
    log('\n== desktop 1280x800 @2x, mouse ==');
    await desktopPass(browser);
    log('\n== phone 375x812 @3x, touch ==');
    await phonePass(browser);
    log('\n== model download progress (a model host that trickles the file) ==');
    await progressPass(browser);
  } finally {
    await browser.close();
  }
  check('no uncaught errors in the page', pageErrors.length === 0, pageErrors.join(' | '));
  check('no Content-Security-Policy violations', cspViolations.length === 0, cspViolations.join(' | '));

  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  log('\n== summary ==');
  for (const r of results.filter((x) => !x.ok)) log(`FAIL  ${r.name}${r.detail ? ` — ${r.detail}` : ''}`);
  log(failed === 0 ? `browser test: PASS (${passed} checks)` : `browser test: FAIL (${failed} of ${results.length} checks failed)`);
  log(`browser: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((err) => {
  log(`FAIL  browser test crashed: ${err.stack || err}`);
  log(`browser: 0 passed, 1 failed`);
  process.exit(1);
});
