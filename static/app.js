/* Drishya — the page logic.
 *
 * Sections: helpers · status and errors · model status · stage and views ·
 * box tool (with its undo history) · scene upload · mask · product and settings ·
 * replace and downloads · wiring.
 * Network calls live in api.js (window.DrishyaApi).
 * Box coordinates are kept in WORKING-IMAGE pixels (the image the server
 * holds); the canvas only converts to and from screen pixels when drawing
 * and when reading pointer positions.
 */
'use strict';

/* ------------------------------------------------------------------ login */

function initLogin() {
  const toggle = document.getElementById('toggle-password');
  const input = document.getElementById('password');
  const form = document.getElementById('login-form');
  const submit = document.getElementById('login-submit');
  toggle.addEventListener('click', () => {
    const show = input.type === 'password';
    input.type = show ? 'text' : 'password';
    toggle.textContent = show ? 'Hide' : 'Show';
    toggle.setAttribute('aria-pressed', String(show));
    input.focus();
  });
  form.addEventListener('submit', () => {
    submit.disabled = true;
    submit.textContent = 'Signing in…';
  });
}

/* ------------------------------------------------------------------ app */

function initApp() {
  const Api = window.DrishyaApi;
  const $ = (id) => document.getElementById(id);
  const MAX_UPLOAD_MB = Number(document.body.dataset.maxUploadMb) || 16;
  const MIN_BOX_CSS_PX = 6;

  const el = {
    stage: $('stage'), figure: $('figure'), img: $('stage-img'), canvas: $('box-canvas'),
    compare: $('compare'), before: $('compare-before'), after: $('compare-after'),
    sceneDrop: $('scene-dropzone'), dropOverlay: $('drop-overlay'),
    busy: $('busy'), busyText: $('busy-text'), busySub: $('busy-sub'),
    busyProgress: $('busy-progress'), busyBar: $('busy-progress-bar'),
    status: $('status'), tabs: [...document.querySelectorAll('[data-view]')],
    sceneInput: $('scene-input'), sceneButton: $('scene-button'), sceneInfo: $('scene-info'),
    sceneProgress: $('scene-progress'), sceneBar: $('scene-progress-bar'),
    stepSelect: $('step-select'), stepProduct: $('step-product'), stepResult: $('step-result'),
    boxReadout: $('box-readout'), boxAll: $('box-all'), boxClear: $('box-clear'),
    boxUndo: $('box-undo'), boxRedo: $('box-redo'), settingsReset: $('settings-reset'),
    downloadCutout: $('download-cutout'), downloadMask: $('download-mask'), downloadFull: $('download-full'),
    downloadFormat: $('download-format'), downloadQuality: $('download-quality'),
    downloadQualityField: $('download-quality-field'),
    generate: $('generate-mask'), maskInfo: $('mask-info'),
    productInput: $('product-input'), productDrop: $('product-dropzone'),
    productThumbWrap: $('product-thumb-wrap'), productThumb: $('product-thumb'),
    productTitle: $('product-title'), productMeta: $('product-meta'),
    scale: $('scale'), scaleValue: $('scale-value'), blending: $('blending'),
    feather: $('feather'), featherValue: $('feather-value'), grading: $('grading'),
    strength: $('strength'), strengthValue: $('strength-value'),
    gradeRadios: [...document.querySelectorAll('input[name="grading_method"]')],
    replace: $('replace'), replaceHint: $('replace-hint'), download: $('download'),
    errorBanner: $('error-banner'), errorTitle: $('error-title'), errorMessage: $('error-message'),
    errorRelogin: $('error-relogin'), errorDismiss: $('error-dismiss'),
    modelChip: $('model-chip'), modelDot: $('model-dot'), modelText: $('model-chip-text'),
    modelDetails: $('model-details'),
    hint: $('stage-hint'), hintDraw: $('hint-draw'), hintKeys: $('box-keys'), hintOther: $('hint-other'),
  };
  const ctx = el.canvas.getContext('2d');

  const state = {
    image: null,   // {width, height, sourceWidth, sourceHeight, name, url}: width/height = working image
    box: null,     // {x0, y0, x1, y1} floats, working-image pixels, x0 < x1, y0 < y1
    mask: null,    // server answer + {url, stale}
    product: null, // {file, url, width, height}
    result: null,  // {url, elapsed_ms, stale}
    view: 'scene',
    busy: false,
    health: null,
    // Box history of the current photo: `past` holds the boxes before each change (null =
    // no box), newest last; `future` the ones undone, for redo.
    history: { past: [], future: [] },
  };
  const HISTORY_MAX = 100;

  /* ---------------------------------------------------------- helpers */

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const fmtInt = (n) => Math.round(n).toLocaleString('en-US');
  const fmtBytes = (n) => (n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1024))} KB`);
  const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(1)}\u00a0s` : `${Math.round(ms)}\u00a0ms`);

  function revoke(url) {
    if (url && url.startsWith('blob:')) URL.revokeObjectURL(url);
  }

  function fileProblem(file) {
    if (!file) return 'No file was selected.';
    if (file.size === 0) return `“${file.name}” is empty.`;
    if (file.size > MAX_UPLOAD_MB * 1048576) {
      return `“${file.name}” is ${fmtBytes(file.size)}; the limit is ${MAX_UPLOAD_MB} MB.`;
    }
    return null;
  }

  function firstFile(dataTransfer) {
    return dataTransfer && dataTransfer.files && dataTransfer.files.length ? dataTransfer.files[0] : null;
  }

  function hasFiles(e) {
    return e.dataTransfer && [...(e.dataTransfer.types || [])].includes('Files');
  }

  /* ---------------------------------------------------------- status and errors */

  function setStatus(text) {
    el.status.textContent = text;
  }

  function showError(title, err) {
    const message = err && err.message ? err.message : String(err);
    el.errorTitle.textContent = title;
    el.errorMessage.textContent = message;
    el.errorRelogin.hidden = !(err && err.status === 401);
    el.errorBanner.hidden = false;
    setStatus(`${title}.`);
  }

  function clearError() {
    el.errorBanner.hidden = true;
  }

  let busyTimer = null;
  let busyStarted = null; // Date.now() when a timed busy state began
  let busyDetail = '';    // what the server says about the wait (download, queue)

  function renderBusySub() {
    const elapsed = busyStarted == null ? '' : `${Math.floor((Date.now() - busyStarted) / 1000)} s`;
    el.busySub.textContent = [elapsed, busyDetail].filter(Boolean).join(' · ');
  }

  function startBusy(text, { progress = null, timer = false } = {}) {
    state.busy = true;
    el.busy.hidden = false;
    setBusyText(text);
    setBusyProgress(progress);
    busyDetail = '';
    busyStarted = timer ? Date.now() : null;
    el.busySub.textContent = '';
    clearInterval(busyTimer);
    if (timer) busyTimer = setInterval(renderBusySub, 1000);
    updateControls();
  }

  function setBusyDetail(text) {
    busyDetail = text || '';
    renderBusySub();
  }

  function setBusyText(text) {
    // Unchanged text is not written again: the status line is read out by screen readers.
    if (el.busyText.textContent === text) return;
    el.busyText.textContent = text;
    setStatus(text);
  }

  function setBusyProgress(fraction) {
    el.busyProgress.hidden = fraction == null;
    if (fraction != null) el.busyBar.style.width = `${Math.round(fraction * 100)}%`;
  }

  function endBusy() {
    state.busy = false;
    el.busy.hidden = true;
    clearInterval(busyTimer);
    busyStarted = null;
    busyDetail = '';
    updateControls();
  }

  let retryingUntil = 0; // while a 503's Retry-After runs, its countdown owns the busy text

  /** Shown while a 503 Retry-After is being waited out. */
  function onServerBusy(seconds, attempt) {
    retryingUntil = Date.now() + seconds * 1000;
    setBusyText(`Server busy, retrying in ${seconds}s… (retry ${attempt} of ${Api.MAX_BUSY_RETRIES})`);
  }

  /* ---------------------------------------------------------- model status */

  const MODEL_STATE_LABEL = {
    ready: 'ready', loading: 'loading…', not_loaded: 'loads on first use',
    unloaded: 'unloaded (reloads on use)', failed: 'unavailable', none: 'no model',
  };

  const baseName = (location) => String(location || '').split(/[\\/]/).pop().replace(/\.onnx$/i, '');

  /** The model's name, or before it is loaded the first configured file's. */
  function modelName(model) {
    if (model.name) return model.name;
    const configured = Array.isArray(model.configured) ? model.configured : [];
    return configured.length ? baseName(configured[0]) : 'model';
  }

  function modelState(health) {
    const model = (health && health.model) || {};
    if (model.state) return model.state;
    return health && health.model_loaded ? 'ready' : 'not_loaded';
  }

  function renderHealth(health) {
    state.health = health;
    const model = health.model || {};
    const st = modelState(health);
    const fallback = Boolean(model.fallback_to_box);
    const unusable = st === 'failed' || st === 'none';
    const name = modelName(model);
    const download = model.download;
    const label = download
      ? `downloading${download.percent != null ? ` ${download.percent} %` : '…'}`
      : MODEL_STATE_LABEL[st] || st;
    el.modelDot.className = `dot dot-${st}`;
    el.modelText.textContent = unusable && fallback
      ? 'Box fallback'
      : `${name} · ${label}`;
    el.modelChip.title = unusable && fallback
      ? 'No segmentation model: the box itself is used as the mask'
      : `Segmentation model ${name}: ${MODEL_STATE_LABEL[st] || st}`;

    const configured = Array.isArray(model.configured) ? model.configured.map(baseName) : [];
    const rows = [
      ['Model', st === 'none' ? 'none' : `${name}${model.kind ? ` (${model.kind})` : ''}`],
      ['State', MODEL_STATE_LABEL[st] || st],
    ];
    if (download) rows.push(['Download', downloadText(download)]);
    const queue = model.queue;
    if (queue && queue.admitted > 0) rows.push(['Queue', `${queue.admitted} in progress, ${queue.waiting} waiting`]);
    if (model.file_size_mb != null) rows.push(['File size', `${Number(model.file_size_mb).toFixed(1)} MB`]);
    if (model.load_seconds != null) rows.push(['Load time', `${Number(model.load_seconds).toFixed(1)} s`]);
    if (configured.length > 1) rows.push(['Fallback chain', configured.join(' → ')]);
    rows.push(['Box fallback', fallback ? 'on: without a model the box is the mask' : 'off']);
    for (const skip of model.skipped || []) rows.push(['Skipped', `${baseName(skip.location)}: ${skip.reason}`]);
    if (model.error) rows.push(['Error', model.error]);
    if (health.version) rows.push(['Server', `v${health.version}`]);
    const dl = document.createElement('dl');
    for (const [k, v] of rows) {
      const dt = document.createElement('dt');
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.textContent = v;
      dl.append(dt, dd);
    }
    el.modelDetails.replaceChildren(dl);
  }

  /** "42 % · 1.9 MB of 4.6 MB", or the bytes so far when the server gave no length. */
  function downloadText(download) {
    const got = fmtBytes(download.bytes || 0);
    return download.percent != null && download.total_bytes
      ? `${download.percent} % · ${got} of ${fmtBytes(download.total_bytes)}`
      : `${got} so far`;
  }

  async function refreshHealth() {
    try {
      const health = await Api.health();
      renderHealth(health);
      return health;
    } catch (err) {
      el.modelDot.className = 'dot dot-failed';
      el.modelText.textContent = 'Server unreachable';
      const p = document.createElement('p');
      p.textContent = err.message;
      el.modelDetails.replaceChildren(p);
      return null;
    }
  }

  /* ---------------------------------------------------------- stage and views */

  const VIEW_LABELS = {
    scene: 'Scene photo', mask: 'Scene photo with the mask overlay', result: 'Result with the product replaced',
  };

  function viewAvailable(view) {
    if (view === 'scene') return Boolean(state.image);
    if (view === 'mask') return Boolean(state.mask);
    return Boolean(state.result);
  }

  function setView(view) {
    if (!viewAvailable(view)) view = 'scene';
    state.view = view;
    for (const tab of el.tabs) tab.setAttribute('aria-pressed', String(tab.dataset.view === view));
    const hasImage = Boolean(state.image);
    el.sceneDrop.hidden = hasImage;
    el.figure.hidden = !hasImage || view === 'compare';
    el.compare.hidden = !hasImage || view !== 'compare';
    el.canvas.hidden = view === 'result';
    renderHint();
    if (!hasImage) return;
    if (view === 'compare') {
      el.before.src = state.image.url;
      el.after.src = state.result.url;
    } else {
      const urls = { scene: state.image.url, mask: state.mask && state.mask.url, result: state.result && state.result.url };
      if (el.img.getAttribute('src') !== urls[view]) el.img.src = urls[view];
      el.img.alt = VIEW_LABELS[view];
    }
    fitStage();
  }

  const OTHER_HINTS = {
    result: 'This is the result. “Compare” shows it next to the original; “Photo” goes back to the box.',
    compare: 'The original and the result, for comparison.',
  };

  function renderHint() {
    el.hint.hidden = !state.image;
    const other = OTHER_HINTS[state.view];
    el.hintDraw.hidden = Boolean(other);
    el.hintKeys.hidden = Boolean(other);
    el.hintOther.hidden = !other;
    el.hintOther.textContent = other || '';
  }

  /** On a one-column (phone) layout, bring the image back into view after a step. */
  function revealStage() {
    if (window.matchMedia('(min-width: 900px)').matches) return;
    const rect = el.stage.getBoundingClientRect();
    if (rect.top < 0 || rect.bottom > window.innerHeight) {
      el.stage.scrollIntoView({ behavior: 'smooth', block: 'center' });
    }
  }

  /** Size the figure so that the working image fits the stage, never more than 2x. */
  function fitStage() {
    if (!state.image) return;
    const { width: w, height: h } = state.image;
    const style = getComputedStyle(el.stage);
    const availW = el.stage.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const fixedHeight = window.matchMedia('(min-width: 900px)').matches; // see app.css: the stage has a set height there
    const availH = fixedHeight
      ? el.stage.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom)
      : Math.max(220, window.innerHeight * 0.62);
    const scale = Math.min(availW / w, availH / h, 2);
    const cssW = Math.max(1, Math.floor(w * scale));
    const cssH = Math.max(1, Math.floor(h * scale));
    el.figure.style.width = `${cssW}px`;
    el.figure.style.height = `${cssH}px`;
    el.compare.style.setProperty('--compare-max-h', `${Math.floor(availH)}px`);
    sizeCanvas(cssW, cssH);
  }

  /** Backing store in device pixels, so the outline stays sharp at any devicePixelRatio. */
  function sizeCanvas(cssW, cssH) {
    const dpr = window.devicePixelRatio || 1;
    const bw = Math.max(1, Math.round(cssW * dpr));
    const bh = Math.max(1, Math.round(cssH * dpr));
    if (el.canvas.width !== bw || el.canvas.height !== bh) {
      el.canvas.width = bw;
      el.canvas.height = bh;
    }
    drawBox();
  }

  /* ---------------------------------------------------------- box tool */

  let drag = null; // {pointerId, mode: 'draw' | 'move', anchor, start, orig, before}

  function normBox(ax, ay, bx, by) {
    return { x0: Math.min(ax, bx), y0: Math.min(ay, by), x1: Math.max(ax, bx), y1: Math.max(ay, by) };
  }

  /** CSS pixels per working-image pixel, as displayed right now. */
  function displayScale() {
    const rect = el.canvas.getBoundingClientRect();
    return rect.width / state.image.width;
  }

  /** Pointer event -> working-image pixel coordinates (clamped to the image). */
  function toImage(e) {
    const rect = el.canvas.getBoundingClientRect();
    const { width: w, height: h } = state.image;
    return {
      x: clamp(((e.clientX - rect.left) / rect.width) * w, 0, w),
      y: clamp(((e.clientY - rect.top) / rect.height) * h, 0, h),
    };
  }

  /** What a pointer at p would grab: a corner ('nw'...), the box ('move') or nothing. */
  function hitTest(p, pointerType) {
    const b = state.box;
    if (!b) return null;
    const tol = (pointerType === 'touch' ? 22 : 10) / displayScale();
    const corners = { nw: [b.x0, b.y0], ne: [b.x1, b.y0], sw: [b.x0, b.y1], se: [b.x1, b.y1] };
    for (const [name, [cx, cy]] of Object.entries(corners)) {
      if (Math.abs(p.x - cx) <= tol && Math.abs(p.y - cy) <= tol) return name;
    }
    if (p.x > b.x0 && p.x < b.x1 && p.y > b.y0 && p.y < b.y1) return 'move';
    return null;
  }

  const CURSORS = { nw: 'nwse-resize', se: 'nwse-resize', ne: 'nesw-resize', sw: 'nesw-resize', move: 'move' };

  function onPointerDown(e) {
    if (!state.image || state.busy || drag) return;
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    e.preventDefault();
    el.canvas.setPointerCapture(e.pointerId);
    if (e.pointerType !== 'touch') el.canvas.focus({ preventScroll: true });
    const p = toImage(e);
    const hit = hitTest(p, e.pointerType);
    const b = state.box;
    const before = b ? { ...b } : null;
    if (hit === 'move') {
      drag = { pointerId: e.pointerId, mode: 'move', start: p, orig: { ...b }, before };
    } else if (hit) {
      const anchor = { x: hit.includes('w') ? b.x1 : b.x0, y: hit.includes('n') ? b.y1 : b.y0 };
      drag = { pointerId: e.pointerId, mode: 'draw', anchor, before, resized: true };
    } else {
      drag = { pointerId: e.pointerId, mode: 'draw', anchor: p, before, resized: false };
      state.box = normBox(p.x, p.y, p.x, p.y);
    }
    if (state.view === 'mask') setView('scene');
    drawBox();
  }

  function onPointerMove(e) {
    if (!state.image) return;
    const p = toImage(e);
    if (!drag) {
      el.canvas.style.cursor = CURSORS[hitTest(p, e.pointerType)] || 'crosshair';
      return;
    }
    if (e.pointerId !== drag.pointerId) return;
    if (drag.mode === 'move') {
      const { width: w, height: h } = state.image;
      const o = drag.orig;
      const dx = clamp(p.x - drag.start.x, -o.x0, w - o.x1);
      const dy = clamp(p.y - drag.start.y, -o.y0, h - o.y1);
      state.box = { x0: o.x0 + dx, y0: o.y0 + dy, x1: o.x1 + dx, y1: o.y1 + dy };
    } else {
      state.box = normBox(drag.anchor.x, drag.anchor.y, p.x, p.y);
    }
    drawBox();
    renderBoxReadout();
  }

  function onPointerUp(e) {
    if (!drag || e.pointerId !== drag.pointerId) return;
    const before = drag.before;
    const cancelled = e.type === 'pointercancel';
    drag = null;
    const b = state.box;
    const minImg = MIN_BOX_CSS_PX / displayScale();
    if (cancelled || !b || b.x1 - b.x0 < minImg || b.y1 - b.y0 < minImg) {
      state.box = before; // a click or a tiny drag keeps the previous box
    }
    if (!sameBox(before, state.box)) {
      remember(before);
      onBoxChanged();
    }
    drawBox();
    renderBoxReadout();
  }

  function sameBox(a, b) {
    if (!a || !b) return a === b;
    return a.x0 === b.x0 && a.y0 === b.y0 && a.x1 === b.x1 && a.y1 === b.y1;
  }

  /** The box as the server wants it: integer working-image pixels, half-open [min, max), inside the image. */
  function intBox() {
    const b = state.box;
    const { width: w, height: h } = state.image;
    const x_min = clamp(Math.round(b.x0), 0, w - 1);
    const y_min = clamp(Math.round(b.y0), 0, h - 1);
    return {
      x_min,
      y_min,
      x_max: clamp(Math.round(b.x1), x_min + 1, w),
      y_max: clamp(Math.round(b.y1), y_min + 1, h),
    };
  }

  function onBoxChanged() {
    // The server's mask is for the box it was made from: undoing back to that box makes it
    // current again, any other box makes it stale.
    if (state.mask) state.mask.stale = !(state.box && state.mask.box && sameIntBox(intBox(), state.mask.box));
    if (state.view === 'mask') setView('scene');
    renderMaskInfo();
    updateControls();
  }

  function sameIntBox(a, b) {
    return a.x_min === b.x_min && a.y_min === b.y_min && a.x_max === b.x_max && a.y_max === b.y_max;
  }

  function setBox(box) {
    const before = state.box;
    state.box = box;
    if (!sameBox(before, box)) remember(before);
    onBoxChanged();
    drawBox();
    renderBoxReadout();
  }

  /* ---------------------------------------------------------- box history (undo / redo) */

  /** Records the box as it was before a change; a new change drops what was undone. */
  function remember(before) {
    const h = state.history;
    h.past.push(before ? { ...before } : null);
    if (h.past.length > HISTORY_MAX) h.past.shift();
    h.future = [];
  }

  const canUndo = () => Boolean(state.image) && !state.busy && !drag && state.history.past.length > 0;
  const canRedo = () => Boolean(state.image) && !state.busy && !drag && state.history.future.length > 0;

  /** Moves the current box onto `to` and takes the top of `from` as the box. */
  function travel(from, to, what) {
    to.push(state.box ? { ...state.box } : null);
    state.box = from.pop();
    onBoxChanged();
    drawBox();
    renderBoxReadout();
    setStatus(state.box ? `${what}: ${el.boxReadout.textContent}` : `${what}: no box.`);
  }

  function undoBox() {
    if (canUndo()) travel(state.history.past, state.history.future, 'Undone');
  }

  function redoBox() {
    if (canRedo()) travel(state.history.future, state.history.past, 'Redone');
  }

  /** Where Ctrl+Z belongs to the field (its own text undo), not to the box. */
  function isTyping(target) {
    if (!target || !(target instanceof Element)) return false;
    if (target.isContentEditable || target.tagName === 'TEXTAREA') return true;
    if (target.tagName !== 'INPUT') return false;
    return !['range', 'checkbox', 'radio', 'button', 'submit', 'reset', 'file', 'color'].includes(target.type);
  }

  /** Ctrl/Cmd+Z undoes, Ctrl/Cmd+Shift+Z and Ctrl+Y redo, anywhere on the page but in a text field. */
  function onHistoryKey(e) {
    if (e.altKey || !(e.ctrlKey || e.metaKey) || isTyping(e.target)) return;
    const key = e.key.toLowerCase();
    let action = null;
    if (key === 'z') action = e.shiftKey ? redoBox : undoBox;
    else if (key === 'y' && e.ctrlKey && !e.shiftKey) action = redoBox;
    if (!action || !state.image) return;
    e.preventDefault();
    action();
  }

  function defaultBox() {
    const { width: w, height: h } = state.image;
    return { x0: w * 0.25, y0: h * 0.25, x1: w * 0.75, y1: h * 0.75 };
  }

  function onCanvasKey(e) {
    if (!state.image || state.busy) return;
    const key = e.key;
    if (key === 'Escape' && drag) {
      state.box = drag.before;
      drag = null;
      drawBox();
      renderBoxReadout();
      e.preventDefault();
      return;
    }
    if (key === 'Enter' || key === ' ') {
      e.preventDefault();
      if (!state.box) setBox(defaultBox());
      else if (key === 'Enter') generateMask();
      return;
    }
    if (key === 'Delete' || key === 'Backspace' || key === 'Escape') {
      if (state.box) {
        e.preventDefault();
        setBox(null);
      }
      return;
    }
    const arrows = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (!arrows[key] || !state.box) return;
    e.preventDefault();
    const [dx, dy] = arrows[key];
    const { width: w, height: h } = state.image;
    const step = Math.max(1, Math.round(Math.max(w, h) / 100));
    const b = { ...state.box };
    if (e.shiftKey) {
      b.x1 = clamp(b.x1 + dx * step, b.x0 + step, w);
      b.y1 = clamp(b.y1 + dy * step, b.y0 + step, h);
    } else {
      const mx = clamp(dx * step, -b.x0, w - b.x1);
      const my = clamp(dy * step, -b.y0, h - b.y1);
      b.x0 += mx; b.x1 += mx; b.y0 += my; b.y1 += my;
    }
    setBox(b);
  }

  function drawBox() {
    const c = el.canvas;
    ctx.clearRect(0, 0, c.width, c.height);
    if (!state.image || !state.box) return;
    const dpr = window.devicePixelRatio || 1;
    const sx = c.width / state.image.width;
    const sy = c.height / state.image.height;
    const b = state.box;
    const x = b.x0 * sx, y = b.y0 * sy, w = (b.x1 - b.x0) * sx, h = (b.y1 - b.y0) * sy;

    if (state.view === 'scene') {
      ctx.fillStyle = 'rgba(15, 23, 42, 0.5)';
      ctx.beginPath();
      ctx.rect(0, 0, c.width, c.height);
      ctx.rect(x, y, w, h);
      ctx.fill('evenodd');
    }
    ctx.lineWidth = 4 * dpr;
    ctx.strokeStyle = 'rgba(255, 255, 255, 0.9)';
    ctx.strokeRect(x, y, w, h);
    ctx.lineWidth = 2 * dpr;
    ctx.strokeStyle = '#4f46e5';
    ctx.strokeRect(x, y, w, h);

    const hs = 10 * dpr;
    for (const [cx, cy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) {
      ctx.fillStyle = '#ffffff';
      ctx.fillRect(cx - hs / 2, cy - hs / 2, hs, hs);
      ctx.lineWidth = 2 * dpr;
      ctx.strokeStyle = '#4f46e5';
      ctx.strokeRect(cx - hs / 2, cy - hs / 2, hs, hs);
    }
    drawSizeLabel(x, y, w, h, dpr);
  }

  function drawSizeLabel(x, y, w, h, dpr) {
    const ib = intBox();
    const text = `${ib.x_max - ib.x_min} × ${ib.y_max - ib.y_min}`;
    ctx.font = `600 ${12 * dpr}px system-ui, sans-serif`;
    const tw = ctx.measureText(text).width + 12 * dpr;
    const th = 20 * dpr;
    const lx = clamp(x, 0, el.canvas.width - tw);
    const ly = y - th - 6 * dpr >= 0 ? y - th - 6 * dpr : Math.min(y + h + 6 * dpr, el.canvas.height - th);
    ctx.fillStyle = 'rgba(79, 70, 229, 0.92)';
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(lx, ly, tw, th, 4 * dpr); else ctx.rect(lx, ly, tw, th);
    ctx.fill();
    ctx.fillStyle = '#ffffff';
    ctx.textBaseline = 'middle';
    ctx.fillText(text, lx + 6 * dpr, ly + th / 2 + 0.5 * dpr);
  }

  function renderBoxReadout() {
    if (!state.image) {
      el.boxReadout.textContent = 'Upload a photo first.';
    } else if (!state.box) {
      el.boxReadout.textContent = 'Draw a box around the product on the photo.';
    } else {
      const b = intBox();
      el.boxReadout.textContent =
        `Box ${b.x_max - b.x_min} × ${b.y_max - b.y_min} px at (${b.x_min}, ${b.y_min}) – (${b.x_max}, ${b.y_max})`;
    }
  }

  /* ---------------------------------------------------------- scene upload */

  async function uploadScene(file) {
    if (state.busy) return;
    const problem = fileProblem(file);
    if (problem) {
      showError('Cannot use this photo', new Error(problem));
      return;
    }
    clearError();
    startBusy(`Uploading ${file.name}…`, { progress: 0 });
    showSceneProgress(0);
    try {
      const res = await Api.uploadImage(file, {
        onProgress: (f) => {
          showSceneProgress(f);
          setBusyProgress(f);
          setBusyText(f < 1 ? `Uploading ${file.name}… ${Math.round(f * 100)}%` : 'Preparing the working image…');
        },
        onBusy: onServerBusy,
      });
      const url = await Api.sceneUrl();
      setScene(file, res, url);
    } catch (err) {
      showError('Upload failed', err);
    } finally {
      el.sceneProgress.hidden = true;
      el.sceneInput.value = '';
      endBusy();
    }
  }

  function showSceneProgress(fraction) {
    el.sceneProgress.hidden = false;
    el.sceneProgress.setAttribute('aria-valuenow', String(Math.round(fraction * 100)));
    el.sceneBar.style.width = `${Math.round(fraction * 100)}%`;
  }

  function setScene(file, res, url) {
    if (state.image) revoke(state.image.url);
    if (state.mask) revoke(state.mask.url);
    if (state.result) revoke(state.result.url);
    // Everything on the page (drawing, the box sent to the server) is in WORKING-image
    // pixels: `width`/`height` of the answer. The Flask wire format's `original_*` also
    // means the working size; the photo's own size, for display only, is `source_*`
    // (older servers sent it as `original_*`).
    state.image = {
      width: res.width, height: res.height,
      sourceWidth: res.source_width || res.original_width || res.width,
      sourceHeight: res.source_height || res.original_height || res.height,
      name: file.name, url,
    };
    state.box = null;
    state.history = { past: [], future: [] }; // a box of the last photo means nothing on this one
    state.mask = null;
    state.result = null;
    const resized = state.image.sourceWidth !== res.width || state.image.sourceHeight !== res.height;
    el.sceneInfo.textContent = `${file.name} · ${res.width} × ${res.height} px` +
      (resized ? ` (resized from ${state.image.sourceWidth} × ${state.image.sourceHeight})` : '');
    el.sceneButton.textContent = 'Replace photo…';
    setView('scene');
    renderBoxReadout();
    renderMaskInfo();
    setStatus('Now draw a box around the product you want to replace.');
  }

  /* ---------------------------------------------------------- mask */

  function busyTextForModel(health) {
    const st = modelState(health);
    const fallback = health && health.model && health.model.fallback_to_box;
    if (st === 'ready') return 'Segmenting…';
    if (st === 'failed' || st === 'none') return fallback ? 'No model available: using the box as the mask…' : 'Segmenting…';
    if (st === 'unloaded') return 'Loading model…';
    return 'Loading model (first use)…';
  }

  /** Polls /health every `every` ms until stopped, saying what the mask waits for. */
  function watchMaskWait(every = 1000) {
    let stopped = false;
    (async () => {
      while (!stopped) {
        await new Promise((r) => setTimeout(r, every));
        if (stopped) break;
        const health = await refreshHealth();
        if (!stopped && health) showMaskWait(health);
      }
    })();
    return () => { stopped = true; };
  }

  /**
   * The busy card while a mask waits: the model's download (percent, bar), its load, or the
   * inference queue. The server cannot tell one request's place in line, so the queue is
   * shown as counts.
   */
  function showMaskWait(health) {
    if (Date.now() < retryingUntil) return;
    const model = health.model || {};
    const queue = model.queue || {};
    const st = modelState(health);
    if (model.download) {
      const d = model.download;
      setBusyText(d.percent != null ? `Downloading model… ${d.percent} %` : 'Downloading model…');
      setBusyProgress(d.percent != null ? d.percent / 100 : null);
      // The percentage is in the text above: the detail says how much has arrived.
      const arrived = d.total_bytes ? `${fmtBytes(d.bytes || 0)} of ${fmtBytes(d.total_bytes)}` : `${fmtBytes(d.bytes || 0)} so far`;
      setBusyDetail([arrived, queue.admitted > 1 ? `${queue.admitted} requests are waiting for it` : '']
        .filter(Boolean).join(' · '));
      return;
    }
    setBusyProgress(null);
    if (st === 'loading') {
      setBusyText('Loading model…');
      setBusyDetail(queue.admitted > 1 ? `${queue.admitted} requests are waiting for it` : '');
    } else if (st === 'ready') {
      setBusyText('Segmenting…');
      setBusyDetail(queue.waiting > 0 ? `queue: ${queue.admitted} in progress, ${queue.waiting} waiting` : '');
    }
  }

  async function generateMask() {
    if (!state.image || !state.box || state.busy) return;
    clearError();
    const box = intBox();
    const health = await refreshHealth();
    const text = busyTextForModel(health);
    startBusy(text, { timer: true });
    const stopWatch = watchMaskWait();
    try {
      const res = await Api.generateMask(box, { onBusy: onServerBusy });
      const url = await Api.maskUrl();
      if (state.mask) revoke(state.mask.url);
      state.mask = { ...res, url, stale: false, box };
      setView('mask');
      revealStage();
      renderMaskInfo();
      setStatus(state.product
        ? 'Mask ready. Adjust the settings and press “Replace product”.'
        : 'Mask ready. Now choose the replacement product image.');
    } catch (err) {
      showError('Could not generate the mask', err);
    } finally {
      stopWatch();
      endBusy();
      refreshHealth();
    }
  }

  function renderMaskInfo() {
    const m = state.mask;
    el.maskInfo.hidden = !m;
    el.maskInfo.classList.toggle('note-warn', Boolean(m && (m.fallback || m.stale)));
    if (!m) return;
    if (m.stale) {
      el.maskInfo.textContent = 'The box has changed: generate the mask again.';
      return;
    }
    const took = m.elapsed_ms != null ? ` · ${fmtMs(m.elapsed_ms)}` : '';
    el.maskInfo.textContent = m.fallback
      ? 'No segmentation model is available, so the box itself was used as the mask.'
      : `Mask ready: ${fmtInt(m.mask_pixels || 0)} px · ${m.model || 'model'}${m.kind ? ` (${m.kind})` : ''}${took}`;
  }

  /* ---------------------------------------------------------- product and settings */

  function decodeImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error('This file could not be read as an image (use PNG, JPEG or WebP).'));
      img.src = url;
    });
  }

  async function pickProduct(file) {
    if (state.busy) return;
    const problem = fileProblem(file);
    if (problem) {
      showError('Cannot use this product image', new Error(problem));
      return;
    }
    const url = URL.createObjectURL(file);
    try {
      const img = await decodeImage(url);
      if (state.product) revoke(state.product.url);
      state.product = { file, url, width: img.naturalWidth, height: img.naturalHeight };
      clearError();
    } catch (err) {
      revoke(url);
      showError('Cannot use this product image', err);
      return;
    } finally {
      el.productInput.value = '';
    }
    el.productThumb.src = url;
    el.productThumbWrap.hidden = false;
    el.productTitle.textContent = file.name;
    el.productMeta.textContent = `${state.product.width} × ${state.product.height} px · ${fmtBytes(file.size)} · click to change`;
    markResultStale();
    updateControls();
    setStatus(state.mask ? 'Product ready. Press “Replace product”.' : 'Product ready. Generate the mask next.');
  }

  /** The strength slider (0–100 %) as the wire's fraction 0–1, at most 2 decimals ("0.3", never "0.30000000000000004"). */
  function strengthFraction() {
    const value = Number(el.strength.value);
    const percent = Number.isFinite(value) ? clamp(Math.round(value), 0, 100) : 50;
    return String(Number((percent / 100).toFixed(2)));
  }

  function readSettings() {
    const method = el.gradeRadios.find((r) => r.checked);
    return {
      scale_factor: Number(el.scale.value).toFixed(2),
      use_blending: String(el.blending.checked),
      feather_amount: String(Math.round(Number(el.feather.value))),
      enable_color_grading: String(el.grading.checked),
      color_grade_strength: strengthFraction(), // a fraction 0–1, as the Flask client sends it
      grading_method: method ? method.value : 'Match Target Area',
    };
  }

  function renderSettings() {
    el.scaleValue.textContent = `${Number(el.scale.value).toFixed(2)}×`;
    el.featherValue.textContent = `${el.feather.value} px`;
    el.strengthValue.textContent = `${el.strength.value} %`;
    el.scale.setAttribute('aria-valuetext', el.scaleValue.textContent);
    el.feather.setAttribute('aria-valuetext', `${el.feather.value} pixels`);
    el.strength.setAttribute('aria-valuetext', `${el.strength.value} percent`);
    el.feather.disabled = !el.blending.checked;
    el.strength.disabled = !el.grading.checked;
    for (const r of el.gradeRadios) r.disabled = !el.grading.checked;
    el.feather.closest('.field').classList.toggle('is-disabled', el.feather.disabled);
    el.strength.closest('.field').classList.toggle('is-disabled', el.strength.disabled);
    $('grade-target').classList.toggle('is-disabled', !el.grading.checked);
  }

  const settingInputs = () => [el.scale, el.feather, el.strength, el.blending, el.grading, ...el.gradeRadios];
  const isToggle = (input) => input.type === 'checkbox' || input.type === 'radio';

  /** The defaults are what the page's HTML sets (`defaultValue`, `defaultChecked`), nothing coded twice. */
  function settingsAtDefaults() {
    return settingInputs().every((i) => (isToggle(i) ? i.checked === i.defaultChecked : i.value === i.defaultValue));
  }

  function resetSettings() {
    if (state.busy || settingsAtDefaults()) return;
    for (const input of settingInputs()) {
      if (isToggle(input)) input.checked = input.defaultChecked;
      else input.value = input.defaultValue;
    }
    renderSettings();
    markResultStale();
    updateControls();
    setStatus('Settings are back to their defaults.');
  }

  function markResultStale() {
    if (state.result && !state.result.stale) {
      state.result.stale = true;
      updateControls();
    }
  }

  /* ---------------------------------------------------------- replace and download */

  async function replaceProduct() {
    if (!canReplace() || state.busy) return;
    clearError();
    startBusy('Sending the product…', { progress: 0, timer: true });
    try {
      const res = await Api.replaceProduct(state.product.file, readSettings(), {
        onProgress: (f) => {
          setBusyProgress(f < 1 ? f : null);
          if (f >= 1) setBusyText('Compositing…');
        },
        onBusy: onServerBusy,
      });
      const url = await Api.resultUrl();
      if (state.result) revoke(state.result.url);
      state.result = { ...res, url, stale: false };
      setView('result');
      revealStage();
      setStatus(`Done${res.elapsed_ms != null ? ` in ${fmtMs(res.elapsed_ms)}` : ''}. Compare with the original or download the PNG.`);
    } catch (err) {
      showError('Could not replace the product', err);
    } finally {
      endBusy();
    }
  }

  function canReplace() {
    return Boolean(state.image && state.mask && !state.mask.stale && state.product);
  }

  function replaceHint() {
    if (!state.image) return 'Upload a scene photo first.';
    if (!state.mask) return state.product ? 'Generate the mask first.' : 'Generate a mask and choose a product image first.';
    if (state.mask.stale) return 'The box changed: generate the mask again first.';
    if (!state.product) return 'Choose the product image first.';
    if (state.result && state.result.stale) return 'Settings changed: press “Replace product” to update the result.';
    if (state.result) return 'Change settings and replace again at any time.';
    return 'Ready: press “Replace product”.';
  }

  /** JPEG quality from its field: a whole number 1–100, 90 when the field holds nothing usable. */
  function jpegQuality() {
    const raw = el.downloadQuality.value.trim();
    const value = Math.round(Number(raw));
    return raw !== '' && Number.isFinite(value) ? clamp(value, 1, 100) : 90;
  }

  /** `/download_full?format=…` (+ `&quality=…` for JPEG, the only format that uses it). */
  function fullDownloadHref() {
    const format = el.downloadFormat.value;
    const params = new URLSearchParams({ format });
    if (format === 'jpeg') params.set('quality', String(jpegQuality()));
    return `${el.downloadFull.dataset.href}?${params}`;
  }

  function renderFullDownload() {
    const format = el.downloadFormat.value;
    el.downloadQualityField.hidden = format !== 'jpeg';
    el.downloadFull.setAttribute('download', `product_replaced_full.${format === 'jpeg' ? 'jpg' : format}`);
  }

  /** A download link is a real link only while there is something to download. */
  function setLink(link, enabled, href) {
    if (enabled) link.setAttribute('href', href);
    else link.removeAttribute('href');
    link.setAttribute('aria-disabled', String(!enabled));
    link.tabIndex = enabled ? 0 : -1;
  }

  /* ---------------------------------------------------------- controls */

  function updateControls() {
    const busy = state.busy;
    const hasImage = Boolean(state.image);
    for (const tab of el.tabs) tab.disabled = busy || !viewAvailable(tab.dataset.view);
    el.stepSelect.dataset.locked = String(!hasImage);
    el.stepProduct.dataset.locked = String(!hasImage);
    el.stepResult.dataset.locked = String(!hasImage);
    el.sceneButton.disabled = busy;
    el.sceneDrop.disabled = busy;
    el.boxAll.disabled = busy || !hasImage;
    el.boxClear.disabled = busy || !state.box;
    el.boxUndo.disabled = !canUndo();
    el.boxRedo.disabled = !canRedo();
    el.settingsReset.disabled = busy || settingsAtDefaults();
    el.generate.disabled = busy || !hasImage || !state.box;
    el.generate.textContent = state.mask && !state.mask.stale ? 'Generate mask again' : 'Generate mask';
    el.productDrop.disabled = busy || !hasImage;
    el.replace.disabled = busy || !canReplace();
    el.replace.textContent = state.result ? 'Replace again' : 'Replace product';
    el.replaceHint.textContent = replaceHint();
    el.replaceHint.classList.toggle('note-warn', Boolean(state.result && state.result.stale));
    el.canvas.classList.toggle('is-busy', busy);
    const canDownload = Boolean(state.result) && !busy;
    const resultFresh = Boolean(state.result && !state.result.stale);
    el.download.classList.toggle('btn-primary', resultFresh);
    el.download.classList.toggle('btn-secondary', !resultFresh);
    el.replace.classList.toggle('btn-primary', !resultFresh);
    el.replace.classList.toggle('btn-secondary', resultFresh);
    setLink(el.download, canDownload, el.download.dataset.href);
    setLink(el.downloadFull, canDownload, fullDownloadHref());
    const canDownloadMask = Boolean(state.mask) && !busy;
    setLink(el.downloadCutout, canDownloadMask, el.downloadCutout.dataset.href);
    setLink(el.downloadMask, canDownloadMask, el.downloadMask.dataset.href);
  }

  /* ---------------------------------------------------------- wiring */

  function bindDropTarget(target, onFile, overlay) {
    let depth = 0;
    const show = (on) => {
      target.classList.toggle('is-dragging', on);
      if (overlay) overlay.hidden = !on;
    };
    target.addEventListener('dragenter', (e) => {
      if (!hasFiles(e) || state.busy) return;
      e.preventDefault();
      depth += 1;
      show(true);
    });
    target.addEventListener('dragover', (e) => {
      if (!hasFiles(e) || state.busy) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = 'copy';
    });
    target.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) show(false);
    });
    target.addEventListener('drop', (e) => {
      e.preventDefault();
      e.stopPropagation();
      depth = 0;
      show(false);
      const file = firstFile(e.dataTransfer);
      if (file && !state.busy) onFile(file);
    });
  }

  function wire() {
    // Dropping a file anywhere else must not navigate away from the page.
    window.addEventListener('dragover', (e) => e.preventDefault());
    window.addEventListener('drop', (e) => e.preventDefault());

    el.sceneButton.addEventListener('click', () => el.sceneInput.click());
    el.sceneDrop.addEventListener('click', () => el.sceneInput.click());
    el.sceneInput.addEventListener('change', () => el.sceneInput.files[0] && uploadScene(el.sceneInput.files[0]));
    bindDropTarget(el.stage, uploadScene, el.dropOverlay);

    el.productDrop.addEventListener('click', () => el.productInput.click());
    el.productInput.addEventListener('change', () => el.productInput.files[0] && pickProduct(el.productInput.files[0]));
    bindDropTarget(el.productDrop, pickProduct, null);

    el.canvas.addEventListener('pointerdown', onPointerDown);
    el.canvas.addEventListener('pointermove', onPointerMove);
    el.canvas.addEventListener('pointerup', onPointerUp);
    el.canvas.addEventListener('pointercancel', onPointerUp);
    el.canvas.addEventListener('keydown', onCanvasKey);

    el.boxAll.addEventListener('click', () => {
      const { width: w, height: h } = state.image;
      setBox({ x0: 0, y0: 0, x1: w, y1: h });
    });
    el.boxClear.addEventListener('click', () => setBox(null));
    el.generate.addEventListener('click', generateMask);
    el.replace.addEventListener('click', replaceProduct);
    for (const link of [el.download, el.downloadFull, el.downloadCutout, el.downloadMask]) {
      link.addEventListener('click', (e) => {
        if (link.getAttribute('aria-disabled') === 'true') e.preventDefault();
      });
    }
    el.boxUndo.addEventListener('click', undoBox);
    el.boxRedo.addEventListener('click', redoBox);
    document.addEventListener('keydown', onHistoryKey);
    el.settingsReset.addEventListener('click', resetSettings);
    el.downloadFormat.addEventListener('change', () => { renderFullDownload(); updateControls(); });
    el.downloadQuality.addEventListener('input', updateControls);
    el.downloadQuality.addEventListener('change', () => {
      el.downloadQuality.value = String(jpegQuality()); // show the value that will be sent
      updateControls();
    });

    for (const tab of el.tabs) tab.addEventListener('click', () => setView(tab.dataset.view));

    for (const input of [el.scale, el.feather, el.strength, el.blending, el.grading, ...el.gradeRadios]) {
      input.addEventListener('input', () => { renderSettings(); markResultStale(); updateControls(); });
      input.addEventListener('change', () => { renderSettings(); markResultStale(); updateControls(); });
    }

    el.errorDismiss.addEventListener('click', clearError);

    new ResizeObserver(() => fitStage()).observe(el.stage);
    window.addEventListener('resize', fitStage);
  }

  wire();
  renderSettings();
  renderFullDownload();
  renderBoxReadout();
  updateControls();
  refreshHealth();
}

/* ------------------------------------------------------------------ start */

if (document.body.classList.contains('login-page')) initLogin();
else if (document.body.classList.contains('app-page')) initApp();
