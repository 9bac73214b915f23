/* Drishya — talking to the server.
 *
 * Every call resolves to parsed JSON or rejects with an ApiError whose
 * `message` is the server's own {"error": "..."} text, unchanged.
 * A 503 carrying Retry-After is retried (a few times) after that delay;
 * `onBusy(secondsLeft, attempt)` is called every second while waiting.
 * Uploads go through XMLHttpRequest so that upload progress can be shown.
 */
'use strict';

window.DrishyaApi = (() => {
  const MAX_BUSY_RETRIES = 3;
  const MAX_RETRY_WAIT_S = 60;

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = 'ApiError';
      this.status = status; // 0 = no answer (network)
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or null. */
  function parseRetryAfter(value) {
    if (value == null || value === '') return null;
    const trimmed = String(value).trim();
    if (/^\d+$/.test(trimmed)) return Math.min(Number(trimmed), MAX_RETRY_WAIT_S);
    const date = Date.parse(trimmed);
    if (Number.isNaN(date)) return null;
    return Math.min(Math.max(0, Math.ceil((date - Date.now()) / 1000)), MAX_RETRY_WAIT_S);
  }

  /** The human message of an error answer: the JSON "error" field when there is one. */
  function errorMessage(status, text) {
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === 'string' && body.error) return body.error;
    } catch (_) { /* not JSON */ }
    const snippet = (text || '').replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ').trim().slice(0, 200);
    return snippet ? `HTTP ${status}: ${snippet}` : `The server answered HTTP ${status}.`;
  }

  const NETWORK_MESSAGE = 'Could not reach the server. Check your connection and try again.';

  /** Common shape of an answer, whether it came from fetch or XHR. */
  function answer(status, retryAfterHeader, text) {
    return { status, retryAfter: parseRetryAfter(retryAfterHeader), text };
  }

  async function fetchAnswer(url, options) {
    let res;
    try {
      res = await fetch(url, { credentials: 'same-origin', cache: 'no-store', ...options });
    } catch (_) {
      throw new ApiError(NETWORK_MESSAGE, 0);
    }
    return answer(res.status, res.headers.get('Retry-After'), await res.text());
  }

  function xhrAnswer(url, formData, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open('POST', url);
      xhr.withCredentials = true;
      if (onProgress) {
        xhr.upload.addEventListener('progress', (e) => {
          if (e.lengthComputable) onProgress(e.loaded / e.total);
        });
        xhr.upload.addEventListener('load', () => onProgress(1));
      }
      xhr.addEventListener('load', () => resolve(answer(xhr.status, xhr.getResponseHeader('Retry-After'), xhr.responseText)));
      xhr.addEventListener('error', () => reject(new ApiError(NETWORK_MESSAGE, 0)));
      xhr.addEventListener('timeout', () => reject(new ApiError('The server took too long to answer.', 0)));
      xhr.send(formData);
    });
  }

  async function countdown(seconds, attempt, onBusy) {
    for (let left = Math.max(1, seconds); left > 0; left -= 1) {
      if (onBusy) onBusy(left, attempt);
      await sleep(1000);
    }
  }

  /** Runs `send` until it is not a retryable 503, then returns parsed JSON or throws. */
  async function withRetry(send, onBusy) {
    for (let attempt = 1; ; attempt += 1) {
      const res = await send();
      const busy = res.status === 503 && res.retryAfter != null;
      if (busy && attempt <= MAX_BUSY_RETRIES) {
        await countdown(res.retryAfter, attempt, onBusy);
        continue;
      }
      if (res.status < 200 || res.status >= 300) {
        throw new ApiError(errorMessage(res.status, res.text), res.status);
      }
      try {
        return JSON.parse(res.text);
      } catch (_) {
        throw new ApiError('The server sent an answer that could not be read.', res.status);
      }
    }
  }

  /** GET an image route as a blob: URL (errors come back as the server's message). */
  async function imageUrl(path) {
    let res;
    try {
      res = await fetch(`${path}?t=${Date.now()}`, { credentials: 'same-origin', cache: 'no-store' });
    } catch (_) {
      throw new ApiError(NETWORK_MESSAGE, 0);
    }
    if (!res.ok) throw new ApiError(errorMessage(res.status, await res.text()), res.status);
    return URL.createObjectURL(await res.blob());
  }

  return {
    ApiError,
    MAX_BUSY_RETRIES,
    parseRetryAfter,

    async health() {
      const res = await fetchAnswer('/health', { method: 'GET' });
      try {
        return JSON.parse(res.text);
      } catch (_) {
        throw new ApiError(errorMessage(res.status, res.text), res.status);
      }
    },

    uploadImage(file, { onProgress, onBusy } = {}) {
      return withRetry(() => {
        const form = new FormData();
        form.append('image', file, file.name || 'image');
        return xhrAnswer('/upload_image', form, onProgress);
      }, onBusy);
    },

    generateMask(box, { onBusy } = {}) {
      const body = JSON.stringify({ x_min: box.x_min, y_min: box.y_min, x_max: box.x_max, y_max: box.y_max });
      return withRetry(() => fetchAnswer('/generate_mask', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body,
      }), onBusy);
    },

    replaceProduct(productFile, settings, { onProgress, onBusy } = {}) {
      return withRetry(() => {
        const form = new FormData();
        form.append('product_image', productFile, productFile.name || 'product.png');
        for (const [key, value] of Object.entries(settings)) form.append(key, String(value));
        return xhrAnswer('/replace_product', form, onProgress);
      }, onBusy);
    },

    sceneUrl: () => imageUrl('/get_image'),
    maskUrl: () => imageUrl('/get_mask_visualization'),
    resultUrl: () => imageUrl('/get_result_image'),
  };
})();
