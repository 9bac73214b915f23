#!/usr/bin/env python3
"""512 MB load test: Drishya's release binary in a memory cgroup, N concurrent
complete user flows over 127.0.0.1.

For each model and each N, a fresh server is started inside a new cgroup v1 memory
group (/sys/fs/cgroup/memory/drishya-load-<pid>-<n>) limited to 512 MB (RAM and, where
the kernel has it, RAM+swap); a small shell wrapper writes its own pid into the group's
cgroup.procs and then execs the server, so no allocation of the server escapes the
limit. N threads then each run complete flows: login, upload the 12 MP JPEG, generate a
mask for the product's box, replace the product, download the result. A 503 with
Retry-After is honoured (the flow waits that long and retries), with a bound on the
total number of requests and a time limit per scenario.

Reported per scenario: flows completed, HTTP status counts, p50/p95 latency per route
(successful answers), the cgroup's peak usage (memory.max_usage_in_bytes: RSS + page
cache), the sampled peak of its RSS alone, the server's own VmHWM, memory.failcnt and
OOM kills (memory.oom_control oom_kill), the time from process start to the first
/health 200, the idle RSS after start, and the time to the first mask answered.

A flow whose session was evicted under the artefact cap (a 404 "upload it again" after
its upload) starts again from the upload, as a user would; those restarts are counted.
Every scenario also samples the artefacts: the size of TEMP_DIR/sessions on disk (sum of
file sizes, and of whole pages as tmpfs charges them) every 0.2 s, and /health's
directories.artefact_mb every 0.2 s; the maxima are reported beside the cap.

--cap-check is the artefact-cap scenario (CI): U2-Net-p, TEMP_DIR on tmpfs (/dev/shm)
inside the cgroup, TEMP_MAX_MB = --cap-mb (default 128, the app's default), N = 3
clients x 67 flows = 201 new sessions (each flow logs in anew), the same 12 MP JPEG
(~5.4 MB of artefacts a session: 128 MB holds about 24). With --strict it fails
unless: 0 OOM kills; every flow completed; no 5xx other than 503; every 503 carried
Retry-After; /health reports the cap and tmpfs; both measures of the artefacts stayed
within the cap + one job's in-flight writes (the most one upload, mask or replace was
seen to take on disk); and the disk reached the cap less one session (the cap was
pressed). LOADTEST_CAP_SERVER_MB=M starts the server with TEMP_MAX_MB=M while the check
still holds it to --cap-mb: a server whose cap does not hold, to prove the check fails.

--distinct-uploads makes every upload a scene of its own: the JPEG's quantisation tables'
first entries are changed per upload (k-th upload: a different brightness and tint,
same size and structure), so no two uploads decode to the same working image and no
model cache keyed by the image (the SAM embeddings) is shared between flows. Without it
every flow uploads the same photo, and Segment Anything's encoder runs about once.

--store s3 keeps the artefacts in an S3 bucket instead of TEMP_DIR/sessions (the default,
--store local): for each scenario a real S3 server, s3s-fs (--s3s-fs PATH, default
$S3S_FS_BIN or target/tools/bin/s3s-fs, installed by scripts/install-s3s-fs), is started
OUTSIDE the cgroup on a free loopback port over a fresh temporary root holding the bucket
directory, and the server gets STORAGE_URL=s3://BUCKET/loadtest, AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (random), AWS_REGION=us-east-1 and
AWS_ALLOW_HTTP=true (uploads in flight still go to TEMP_DIR). The disk sampler then reads
ROOT/BUCKET/loadtest/sessions and counts only the artefact objects (image.png, mask.png,
mask_overlay.png, result.png, original.img, replacement.bin; any other file there is left
out and named in the result).
s3s-fs is stopped by its pid and its root removed at the end of the scenario; its peak RSS
and CPU time are reported (it is outside the cgroup, but shares the CPUs). With --store
local the server's STORAGE_URL and AWS_* variables are removed from its environment. The
store is in the result JSON ("store", and /health's directories.store as seen) and in the
printed tables. --store s3 does not combine with --cap-check (that measures artefacts on
tmpfs inside the cgroup).

--fullres is the full-resolution scenario: U2-Net-p, N = 16 (unless --n), each flow uploads
the 24 MP JPEG (WORKDIR/scene_24mp.jpg unless --upload) and, after the usual download, also
GET /download_full?format=--fullres-format (png by default), checked by content type and
magic bytes; the route's latency is in the tables with the others. Its memory is what
the scenario is for: the full-size photo is decoded on the server for every such download.
--measure-fullres runs one flow each on the 12 MP and the 24 MP JPEG and downloads the
full-resolution result once in each format, timing it and reading the server's peak RSS
over that download alone (/proc/PID/clear_refs resets VmHWM before it); printed as a table
and kept in the JSON ("fullres_measures").

Standard library only. Needs root and a writable cgroup v1 memory hierarchy (or v2).

usage: loadtest.py [--quick | --cap-check] [--bin PATH] [--models u2netp,sam] [--n 1,4,16,64]
                   [--flows-per-client K] [--time-limit S] [--max-requests R] [--cap-mb MB]
                   [--upload PATH] [--limit-mb 512] [--shm] [--strict] [--json PATH]
                   [--workdir DIR] [--shared DIR] [--store local|s3] [--s3s-fs PATH]
                   [--distinct-uploads] [--fullres [--fullres-format png|jpeg|webp] | --measure-fullres]
"""

import argparse
import base64
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from free_port import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CG_V1 = "/sys/fs/cgroup/memory"
CUP_BOX = (0.27, 0.03, 0.70, 0.78)  # the product's box as a fraction of the image (as tools/bench/src/inputs.rs)
ROUTES = ["login", "upload_image", "generate_mask", "replace_product", "download_result", "download_full"]
MIB = 1024 * 1024
PAGE = 4096
# What one job writes into a session (upload; mask; replace), by file name; the temporary
# file of a write in flight (".mask.png.<random>.tmp") counts with the file it becomes.
JOB_FILES = {
    "image.png": "upload",
    "original.img": "upload",
    "mask.png": "mask",
    "mask_overlay.png": "mask",
    "result.png": "replace",
    "replacement.bin": "replace",
}
# --fullres: what GET /download_full answers per format (content type, magic bytes).
FULLRES_FORMATS = {
    "png": ("image/png", b"\x89PNG"),
    "jpeg": ("image/jpeg", b"\xff\xd8\xff"),
    "webp": ("image/webp", b"RIFF"),
}
MAX_RESTARTS = 5  # per flow: more evictions of one flow than that is a failure
# --store s3: the bucket and key prefix the server is given (objects under
# PREFIX/sessions/<id>/<file>.png), and the variables that select the store, removed from
# the server's environment with --store local.
S3_BUCKET = "drishya-loadtest"
S3_PREFIX = "loadtest"
STORE_VARS = (
    "STORAGE_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
)


# ---------------------------------------------------------------------------------------
# cgroup


class Cgroup:
    """A v1 memory cgroup (or a v2 group with memory.max) with a limit, removed at the end."""

    def __init__(self, name, limit_bytes):
        self.v2 = not os.path.isdir(CG_V1)
        base = "/sys/fs/cgroup" if self.v2 else CG_V1
        self.path = os.path.join(base, name)
        os.mkdir(self.path)
        if self.v2:
            self._write("memory.max", str(limit_bytes))
            if os.path.exists(self._p("memory.swap.max")):
                self._write("memory.swap.max", "0")
        else:
            self._write("memory.limit_in_bytes", str(limit_bytes))
            if os.path.exists(self._p("memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", str(limit_bytes))
        self.limit = limit_bytes

    def _p(self, f):
        return os.path.join(self.path, f)

    def _write(self, f, v):
        with open(self._p(f), "w") as fh:
            fh.write(v)

    def read(self, f):
        try:
            with open(self._p(f)) as fh:
                return fh.read()
        except OSError:
            return ""

    def read_int(self, f):
        text = self.read(f).strip()
        return int(text) if text.isdigit() else None

    def stat(self):
        out = {}
        for line in self.read("memory.stat").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    def usage(self):
        return self.read_int("memory.current" if self.v2 else "memory.usage_in_bytes") or 0

    def rss(self):
        s = self.stat()
        if self.v2:
            return s.get("anon", 0) + s.get("shmem", 0)
        return s.get("total_rss", s.get("rss", 0)) + s.get("total_shmem", s.get("shmem", 0))

    def summary(self):
        if self.v2:
            events = dict(l.split() for l in self.read("memory.events").splitlines() if l.strip())
            return {
                "max_usage_bytes": self.read_int("memory.peak"),
                "failcnt": int(events.get("max", 0)),
                "oom_kills": int(events.get("oom_kill", 0)),
            }
        oom = dict(l.split() for l in self.read("memory.oom_control").splitlines() if l.strip())
        return {
            "max_usage_bytes": self.read_int("memory.max_usage_in_bytes"),
            "failcnt": self.read_int("memory.failcnt"),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "memsw_max_usage_bytes": self.read_int("memory.memsw.max_usage_in_bytes"),
            "memsw_failcnt": self.read_int("memory.memsw.failcnt"),
            "under_oom": int(oom.get("under_oom", 0)),
        }

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return True
            except OSError:
                time.sleep(0.1)
        return False


# ---------------------------------------------------------------------------------------
# --store s3: a real S3 server (s3s-fs) over a temporary directory, outside the cgroup


class S3Server:
    """s3s-fs on a free loopback port over a fresh root holding the bucket directory.
    Started by this process (so in its cgroup, not the server's); stopped by its pid."""

    def __init__(self, binary):
        self.binary = binary
        self.root = tempfile.mkdtemp(prefix="drishya-s3-")
        os.mkdir(os.path.join(self.root, S3_BUCKET))
        self.port = free_port()
        self.access_key = "loadtest-" + uuid.uuid4().hex[:12]
        self.secret_key = base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.log_path = self.root.rstrip("/") + ".log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--access-key", self.access_key,
                "--secret-key", self.secret_key,
                self.root,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        self.pid = self.proc.pid
        self.hwm = 0
        self.cpu_s = None
        import socket

        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"s3s-fs exited with {self.proc.returncode} before listening")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() - t0 > 10:
                    self.stop()
                    raise RuntimeError("s3s-fs did not listen within 10 s")
                time.sleep(0.02)

    def env(self):
        return {
            "STORAGE_URL": f"s3://{S3_BUCKET}/{S3_PREFIX}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def sessions_dir(self):
        return os.path.join(self.root, S3_BUCKET, S3_PREFIX, "sessions")

    def sample(self):
        """Its peak RSS and CPU seconds so far (read before it is stopped)."""
        vm = proc_status(self.pid)
        if vm.get("VmHWM"):
            self.hwm = max(self.hwm, vm["VmHWM"])
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            self.cpu_s = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
        except (OSError, IndexError, ValueError):
            pass

    def stop(self):
        """SIGTERM to its pid (SIGKILL after 10 s), then its root and log are removed;
        returns the tail of its log."""
        if self.proc.poll() is None:
            self.sample()
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        try:
            with open(self.log_path, "rb") as f:
                tail = f.read()[-2000:].decode("utf-8", "replace")
            os.unlink(self.log_path)
        except OSError:
            tail = ""
        shutil.rmtree(self.root, ignore_errors=True)
        return tail


# ---------------------------------------------------------------------------------------
# HTTP helpers (one connection per request: the server's keep-alive is 5 s and flows sleep)


class Client:
    def __init__(self, port, timeout):
        self.port = port
        self.timeout = timeout
        self.cookie = None

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            h = dict(headers or {})
            if self.cookie:
                h["Cookie"] = self.cookie
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


def multipart(fields, files):
    boundary = "----drishya" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, ctype, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def dqt_entries(jpeg):
    """Offsets of the first two entries of each 8-bit quantisation table of a JPEG (DC and
    the first AC coefficient), for --distinct-uploads."""
    entries, i = [], 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: no more tables
            break
        if marker == 0xDB:
            j = i + 4
            while j < i + 2 + length:
                precision, count = jpeg[j] >> 4, 64 * (2 if jpeg[j] >> 4 else 1)
                if precision == 0:
                    entries.append((j + 1, j + 2))
                j += 1 + count
        i += 2 + length
    dc = [e[0] for e in entries]
    return dc + [e[1] for e in entries]


def jpeg_variant(jpeg, offsets, k):
    """The k-th variant of `jpeg`: the base-8 digits of k added to the table entries at
    `offsets` (first the DC ones). Variant 0 is the photo itself."""
    data = bytearray(jpeg)
    for off in offsets:
        k, digit = divmod(k, 8)
        data[off] = min(255, data[off] + digit)
    return bytes(data)


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------
# One scenario


class Budget(Exception):
    pass


class Evicted(Exception):
    """A 404 after the upload: the session's artefacts are gone (evicted under the cap)."""


class Scenario:
    def __init__(self, args, model_name, model_path, n, jpeg, product, upload_name="scene_12mp.jpg"):
        self.args = args
        self.model_name = model_name
        self.model_path = model_path
        self.n = n
        self.jpeg = jpeg
        self.product = product
        self.upload_name = upload_name
        self.restarts = 0
        self.restart_reasons = {}
        self.no_retry_after = 0
        # Artefact samples: TEMP_DIR/sessions on disk, and /health's own figure.
        self.disk_samples = 0
        self.disk_max_bytes = 0  # sum of file sizes
        self.disk_max_pages = 0  # the same in whole pages (what tmpfs and the app's ledger count)
        self.disk_max_session_pages = 0  # the largest one session ever took
        self.disk_max_job_pages = 0  # the most one job's files ever took (one session's upload, mask or replace)
        self.disk_max_dirs = 0
        self.sessions_seen = set()
        self.health_samples = 0
        self.health_errors = 0
        self.health_max_mb = None
        self.health_cap_mb = set()
        self.health_in_memory = set()
        self.health_store = set()
        self.disk_skipped = set()  # --store s3: names under the sessions that are not artefact objects
        self.lock = threading.Lock()
        self.statuses = {}
        self.latencies = {r: [] for r in ROUTES}
        self.flow_times = []
        self.flows_done = 0
        self.flows_failed = 0
        self.failures = []
        self.requests = 0
        self.retries_503 = 0
        self.first_mask_at = None
        self.fullres_measures = []
        self.deadline = None
        self.max_requests = args.max_requests or (20 + n * args.flows_per_client * 40)
        self.stop = threading.Event()

    # -- requests with accounting ---------------------------------------------------------

    def call(self, client, route, method, path, body=None, headers=None):
        """One request, retried after 503 + Retry-After; returns (status, headers, body)."""
        while True:
            with self.lock:
                if self.requests >= self.max_requests:
                    raise Budget("request budget spent")
                self.requests += 1
            if time.monotonic() > self.deadline:
                raise Budget("time limit")
            t = time.monotonic()
            try:
                status, hdrs, data = client.request(method, path, body, headers)
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    key = f"error:{type(e).__name__}"
                    self.statuses[key] = self.statuses.get(key, 0) + 1
                raise
            elapsed = time.monotonic() - t
            with self.lock:
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                if status < 400:
                    self.latencies[route].append(elapsed)
                if route == "generate_mask" and status == 200 and self.first_mask_at is None:
                    self.first_mask_at = time.monotonic()
            if status == 503:
                retry = dict((k.lower(), v) for k, v in hdrs).get("retry-after")
                wait = float(retry) if retry and retry.replace(".", "", 1).isdigit() else 1.0
                with self.lock:
                    self.retries_503 += 1
                    if retry is None:
                        self.no_retry_after += 1
                wait += random.uniform(0, 0.5)
                if time.monotonic() + wait > self.deadline:
                    raise Budget("time limit while waiting for Retry-After")
                time.sleep(wait)
                continue
            return status, hdrs, data

    def flow(self, index):
        client = Client(self.port, timeout=self.args.request_timeout)
        t0 = time.monotonic()
        status, hdrs, _ = self.call(
            client,
            "login",
            "POST",
            "/login",
            f"password={self.password}".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        cookie = next((v for k, v in hdrs if k.lower() == "set-cookie" and v.startswith("drishya_session=")), None)
        if status != 303 or not cookie:
            raise RuntimeError(f"login answered {status}")
        client.cookie = cookie.split(";", 1)[0]
        restarts = 0
        while True:
            try:
                self.steps(client)
                break
            except Evicted as e:
                # The session was evicted between two requests: upload it again, as the
                # message says (same login), a bounded number of times.
                restarts += 1
                with self.lock:
                    self.restarts += 1
                    self.restart_reasons[str(e)] = self.restart_reasons.get(str(e), 0) + 1
                if restarts > MAX_RESTARTS:
                    raise RuntimeError(f"evicted {restarts} times in one flow (last: {e})")
        with self.lock:
            self.flows_done += 1
            self.flow_times.append(time.monotonic() - t0)

    def steps(self, client):
        """Upload, mask, replace, download; a 404 after the upload raises Evicted."""

        def check(route, status, data):
            if status == 404:
                raise Evicted(f"{route} 404: {data[:120].decode('utf-8', 'replace')}")
            if status != 200:
                raise RuntimeError(f"{route} answered {status}: {data[:200]!r}")

        body, ctype = self.upload_body
        if self.args.distinct_uploads:
            with self.lock:
                k, self.uploads = self.uploads, self.uploads + 1
            variant = jpeg_variant(self.jpeg, self.dqt, k)
            body, ctype = multipart({}, {"image": (self.upload_name, "image/jpeg", variant)})
        status, _, data = self.call(client, "upload_image", "POST", "/upload_image", body, {"Content-Type": ctype})
        if status != 200:
            raise RuntimeError(f"upload answered {status}: {data[:200]!r}")
        info = json.loads(data)
        w, h = info["width"], info["height"]
        box = {k: round(f * d) for k, f, d in zip(("x_min", "y_min", "x_max", "y_max"), CUP_BOX, (w, h, w, h))}
        status, _, data = self.call(
            client, "generate_mask", "POST", "/generate_mask", json.dumps(box).encode(), {"Content-Type": "application/json"}
        )
        check("generate_mask", status, data)
        body, ctype = self.replace_body
        status, _, data = self.call(client, "replace_product", "POST", "/replace_product", body, {"Content-Type": ctype})
        check("replace_product", status, data)
        status, _, data = self.call(client, "download_result", "GET", "/download_result")
        check("download_result", status, data)
        if not data.startswith(b"\x89PNG"):
            raise RuntimeError("download_result answered 200 without a PNG")
        if self.args.measure_fullres:
            for fmt_name in FULLRES_FORMATS:
                self.measure_full(client, check, fmt_name)
        elif self.args.fullres:
            self.download_full(client, check, self.args.fullres_format)

    def download_full(self, client, check, fmt_name):
        """GET /download_full in fmt_name; checks the type and magic; returns the byte count."""
        query = "?format=" + fmt_name + ("&quality=90" if fmt_name == "jpeg" else "")
        status, hdrs, data = self.call(client, "download_full", "GET", "/download_full" + query)
        check("download_full", status, data)
        ctype = dict((k.lower(), v) for k, v in hdrs).get("content-type")
        want_type, magic = FULLRES_FORMATS[fmt_name]
        if ctype != want_type or not data.startswith(magic):
            raise RuntimeError(f"download_full ({fmt_name}) answered {ctype} {data[:8]!r}")
        return len(data)

    def measure_full(self, client, check, fmt_name):
        """--measure-fullres: one download in fmt_name, timed, with the server's peak RSS
        over it alone (VmHWM reset to the current RSS first, /proc/PID/clear_refs 5)."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        before = proc_status(pid)
        t = time.monotonic()
        size = self.download_full(client, check, fmt_name)
        elapsed = time.monotonic() - t
        after = proc_status(pid)
        with self.lock:
            self.fullres_measures.append(
                {
                    "format": fmt_name,
                    "seconds": round(elapsed, 2),
                    "bytes": size,
                    "rss_before_mb": round(before.get("VmRSS", 0) / MIB, 1),
                    "peak_rss_mb": round(after.get("VmHWM", 0) / MIB, 1),
                    "cgroup_usage_after_mb": round(self.cg.usage() / MIB, 1),
                }
            )

    def worker(self, index):
        for k in range(self.args.flows_per_client):
            if self.stop.is_set():
                return
            try:
                self.flow(index * self.args.flows_per_client + k)
            except Budget as e:
                with self.lock:
                    self.flows_failed += 1
                    self.failures.append(str(e))
                return
            except Exception as e:  # a failed flow is counted, the client goes on
                with self.lock:
                    self.flows_failed += 1
                    if len(self.failures) < 20:
                        self.failures.append(f"{type(e).__name__}: {e}")
                if self.proc.poll() is not None:
                    return

    # -- memory monitor -------------------------------------------------------------------

    def monitor(self):
        while not self.stop.is_set():
            usage, rss = self.cg.usage(), self.cg.rss()
            vm = proc_status(self.proc.pid)
            if usage > self.peak_usage_sampled:
                # What the cgroup's memory is made of at its (sampled) peak.
                stat = self.cg.stat()
                keys = ("total_rss", "total_cache", "total_shmem", "total_mapped_file", "total_dirty",
                        "total_writeback", "total_inactive_file", "total_active_file", "anon", "file", "shmem")
                self.stat_at_peak = {k: round(stat[k] / MIB, 1) for k in keys if k in stat}
                self.stat_at_peak["server_rss_mb"] = round(vm.get("VmRSS", 0) / MIB, 1)
            self.peak_usage_sampled = max(self.peak_usage_sampled, usage)
            self.peak_cg_rss = max(self.peak_cg_rss, rss)
            if vm.get("VmHWM"):
                self.server_hwm = max(self.server_hwm, vm["VmHWM"])
            if self.s3:
                self.s3.sample()
            time.sleep(0.05)

    def sample_disk(self, sessions_dir, objects_only=False):
        """The artefacts on disk, independently of the app's ledger: every 0.2 s, the sum of
        the sizes of the files under TEMP_DIR/sessions (temporary files of writes in flight
        included). Files that vanish mid-walk are skipped. objects_only (--store s3, the
        bucket's sessions directory): only the artefact objects count; s3s-fs writes an object
        to a temporary file at its root and renames it into place, and any metadata file it
        kept here would be left out (and named in the result)."""
        while not self.stop.is_set():
            total = pages = biggest = biggest_job = dirs = 0
            try:
                entries = list(os.scandir(sessions_dir))
            except OSError:
                entries = []
            for d in entries:
                if not d.is_dir(follow_symlinks=False):
                    continue
                dirs += 1
                self.sessions_seen.add(d.name)
                in_session = 0
                jobs = {}
                try:
                    files = list(os.scandir(d.path))
                except OSError:
                    continue
                for f in files:
                    if objects_only and f.name not in JOB_FILES:
                        with self.lock:
                            self.disk_skipped.add(f.name if len(self.disk_skipped) < 20 else "...")
                        continue
                    try:
                        size = f.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
                    total += size
                    footprint = -(-size // PAGE) * PAGE
                    in_session += footprint
                    name = f.name.lstrip(".")
                    job = next((j for k, j in JOB_FILES.items() if name == k or name.startswith(k + ".")), name)
                    jobs[job] = jobs.get(job, 0) + footprint
                pages += in_session
                biggest = max(biggest, in_session)
                biggest_job = max([biggest_job, *jobs.values()])
            with self.lock:
                self.disk_samples += 1
                self.disk_max_bytes = max(self.disk_max_bytes, total)
                self.disk_max_pages = max(self.disk_max_pages, pages)
                self.disk_max_session_pages = max(self.disk_max_session_pages, biggest)
                self.disk_max_job_pages = max(self.disk_max_job_pages, biggest_job)
                self.disk_max_dirs = max(self.disk_max_dirs, dirs)
            self.stop.wait(0.2)

    def sample_health(self):
        """/health's directories.artefact_mb (the app's own ledger) every 0.2 s."""
        while not self.stop.is_set():
            try:
                status, _, data = Client(self.port, 5).request("GET", "/health")
                d = json.loads(data).get("directories", {}) if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError, AttributeError):
                d = None
            with self.lock:
                if isinstance(d, dict) and "artefact_mb" in d:
                    self.health_samples += 1
                    mb = d["artefact_mb"]
                    self.health_max_mb = mb if self.health_max_mb is None else max(self.health_max_mb, mb)
                    self.health_cap_mb.add(d.get("artefact_cap_mb"))
                    self.health_in_memory.add(d.get("temp_dir_in_memory"))
                    self.health_store.add(d.get("store"))
                else:
                    self.health_errors += 1
            self.stop.wait(0.2)

    # -- the whole scenario ---------------------------------------------------------------

    def run(self):
        args = self.args
        self.password = base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")
        secret = base64.b64encode(os.urandom(32)).decode()
        self.port = free_port()
        ctype = "image/png" if self.upload_name.endswith(".png") else "image/jpeg"
        self.upload_body = multipart({}, {"image": (self.upload_name, ctype, self.jpeg)})
        self.uploads = 0
        self.dqt = dqt_entries(self.jpeg) if args.distinct_uploads else []
        if args.distinct_uploads and not self.dqt:
            raise SystemExit("loadtest: --distinct-uploads needs a JPEG upload with 8-bit quantisation tables")
        self.replace_body = multipart(
            {
                "scale_factor": "1.0",
                "use_blending": "true",
                "feather_amount": "10",
                "enable_color_grading": "true",
                "color_grade_strength": "0.5",
                "grading_method": "Match Target Area",
            },
            {"product_image": ("product.png", "image/png", self.product)},
        )
        # TEMP_DIR (uploads in flight and artefacts): a fresh directory on disk, or with
        # --shm on tmpfs like the app's default /dev/shm (tmpfs pages count against the
        # cgroup and cannot be reclaimed without swap).
        temp_dir = tempfile.mkdtemp(prefix="drishya-load-", dir="/dev/shm" if args.shm else None)
        # --store s3: the bucket's server, started here (outside the cgroup) before the app.
        s3 = None
        if args.store == "s3":
            try:
                s3 = S3Server(args.s3s_fs)
            except BaseException:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
        self.s3 = s3
        cg_name = f"drishya-load-{os.getpid()}-{self.model_name}-{self.n}"
        try:
            self.cg = Cgroup(cg_name, args.limit_mb * MIB)
        except BaseException:
            if s3:
                s3.stop()
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        env = dict(os.environ)
        env.update(
            {
                "APP_PASSWORD": self.password,
                "ROCKET_SECRET_KEY": secret,
                "PORT": str(self.port),
                "ROCKET_ADDRESS": "127.0.0.1",
                "TEMP_DIR": temp_dir,
                "MODELS": self.model_path,
                "ROCKET_LOG_LEVEL": "critical",
            }
        )
        for k in ("SECRET_KEY", "ROCKET_PORT") + STORE_VARS:
            env.pop(k, None)
        if s3:
            env.update(s3.env())
        for k in ("INFERENCE_QUEUE", "INFERENCE_CONCURRENCY"):
            if getattr(args, k.lower()) is not None:
                env[k] = str(getattr(args, k.lower()))
        if args.cap_mb is not None:
            env["TEMP_MAX_MB"] = str(args.server_cap_mb)
        log_path = os.path.join(tempfile.gettempdir(), os.path.basename(temp_dir) + ".log")
        log = open(log_path, "wb")
        # The wrapper joins the cgroup first, then execs the server (same pid).
        wrapper = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
        self.peak_usage_sampled = self.peak_cg_rss = self.server_hwm = 0
        self.stat_at_peak = {}
        self.proc = subprocess.Popen(
            ["sh", "-c", wrapper, "sh", self.cg.path, args.bin], cwd=REPO, env=env, stdout=log, stderr=log
        )
        result = {"model": self.model_name, "n": self.n, "store": args.store, "port": self.port}
        sessions_dir = s3.sessions_dir() if s3 else os.path.join(temp_dir, "sessions")
        mon = threading.Thread(target=self.monitor, daemon=True)
        samplers = [
            threading.Thread(target=self.sample_disk, args=(sessions_dir, bool(s3)), daemon=True),
            threading.Thread(target=self.sample_health, daemon=True),
        ]
        try:
            health_ms = wait_health(self.port, self.proc, timeout=30)
            result["start_to_health_ms"] = health_ms
            vm = proc_status(self.proc.pid)
            result["rss_at_first_health_mb"] = round(vm.get("VmRSS", 0) / MIB, 1)
            time.sleep(1.0)
            vm = proc_status(self.proc.pid)
            result["idle_rss_mb"] = round(vm.get("VmRSS", 0) / MIB, 1)
            result["idle_rss_anon_mb"] = round(vm.get("RssAnon", 0) / MIB, 1)
            result["idle_rss_file_mb"] = round(vm.get("RssFile", 0) / MIB, 1)
            result["idle_cgroup_usage_mb"] = round(self.cg.usage() / MIB, 1)
            mon.start()
            for t in samplers:
                t.start()
            self.deadline = time.monotonic() + args.time_limit
            t_flows = time.monotonic()
            threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.1, self.deadline - time.monotonic() + args.request_timeout + 5))
            result["wall_s"] = round(time.monotonic() - t_flows, 1)
            if self.first_mask_at is not None:
                # Cold start to the first mask: process start -> /health, plus flows start ->
                # first mask answered (the 1 s idle-RSS pause in between is left out).
                first = (self.first_mask_at - t_flows) * 1000
                result["flows_start_to_first_mask_ms"] = round(first, 1)
                result["start_to_first_mask_ms"] = round(health_ms + first, 1)
            health = None
            if self.proc.poll() is None:
                try:
                    status, _, data = Client(self.port, 10).request("GET", "/health")
                    health = json.loads(data) if status == 200 else None
                except (OSError, http.client.HTTPException, ValueError):
                    health = None
            vm = proc_status(self.proc.pid)
            if vm.get("VmHWM"):
                self.server_hwm = max(self.server_hwm, vm["VmHWM"])
            result["rss_at_end_mb"] = round(vm.get("VmRSS", 0) / MIB, 1)
            result["rss_file_at_end_mb"] = round(vm.get("RssFile", 0) / MIB, 1)
            result["model_status"] = (health or {}).get("model") if isinstance(health, dict) else None
        finally:
            self.stop.set()
            for t in samplers:
                if t.is_alive():
                    t.join(10)
            alive = self.proc.poll() is None
            result["server_alive_at_end"] = alive
            result["server_exit"] = self.proc.returncode
            stop_server(self.proc)
            log.close()
            summary = self.cg.summary()
            result["cgroup_removed"] = self.cg.remove()
            shutil.rmtree(temp_dir, ignore_errors=True)
            if s3:
                s3_alive = s3.proc.poll() is None
                s3_tail = s3.stop()
                result["s3s_fs"] = {
                    "port": s3.port,
                    "alive_at_end": s3_alive,
                    "vmhwm_mb": round(s3.hwm / MIB, 1),
                    "cpu_s": s3.cpu_s,
                    "root_removed": not os.path.exists(s3.root),
                }
                if not s3_alive:
                    result["s3s_fs"]["log_tail"] = s3_tail
        with open(log_path, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
        os.unlink(log_path)
        lat = {}
        for route in ROUTES:
            v = self.latencies[route]
            lat[route] = {
                "count": len(v),
                "p50_ms": round(percentile(v, 50) * 1000, 1) if v else None,
                "p95_ms": round(percentile(v, 95) * 1000, 1) if v else None,
            }
        result.update(
            {
                "flows_planned": self.n * args.flows_per_client,
                "flows_completed": self.flows_done,
                "flows_failed": self.flows_failed,
                "requests": self.requests,
                "retries_after_503": self.retries_503,
                "http_503_without_retry_after": self.no_retry_after,
                "flow_restarts_after_eviction": self.restarts,
                "restart_reasons": self.restart_reasons,
                "status_counts": dict(sorted(self.statuses.items())),
                "http_5xx_other_than_503": sum(
                    c for s, c in self.statuses.items() if s.isdigit() and int(s) >= 500 and s != "503"
                ),
                "latency": lat,
                "flow_p50_s": round(percentile(self.flow_times, 50), 2) if self.flow_times else None,
                "flow_p95_s": round(percentile(self.flow_times, 95), 2) if self.flow_times else None,
                "cgroup_limit_mb": args.limit_mb,
                "cgroup_max_usage_mb": round((summary["max_usage_bytes"] or 0) / MIB, 1),
                "cgroup_peak_rss_sampled_mb": round(self.peak_cg_rss / MIB, 1),
                "server_vmhwm_mb": round(self.server_hwm / MIB, 1),
                "cgroup_stat_at_sampled_peak_mb": self.stat_at_peak,
                "failcnt": summary["failcnt"],
                "memsw_failcnt": summary.get("memsw_failcnt"),
                "oom_kills": summary["oom_kills"],
                "failures": self.failures[:10],
                "upload": self.upload_name,
                "fullres_format": args.fullres_format if args.fullres else None,
                "fullres_measures": self.fullres_measures,
                "artefacts": {
                    "cap_mb": args.cap_mb,
                    "server_temp_max_mb": args.server_cap_mb if args.cap_mb is not None else None,
                    "temp_dir_on_tmpfs": args.shm,
                    "disk_samples": self.disk_samples,
                    "disk_max_mb": round(self.disk_max_bytes / MIB, 2),
                    "disk_max_pages_mb": round(self.disk_max_pages / MIB, 2),
                    "disk_max_session_mb": round(self.disk_max_session_pages / MIB, 2),
                    "disk_max_job_mb": round(self.disk_max_job_pages / MIB, 2),
                    "disk_max_session_dirs": self.disk_max_dirs,
                    "sessions_seen_on_disk": len(self.sessions_seen),
                    "health_samples": self.health_samples,
                    "health_errors": self.health_errors,
                    "health_max_artefact_mb": self.health_max_mb,
                    "health_artefact_cap_mb": sorted(self.health_cap_mb, key=str),
                    "health_temp_dir_in_memory": sorted(self.health_in_memory, key=str),
                    "health_store": sorted(self.health_store, key=str),
                    "sessions_dir": "ROOT/" + os.path.relpath(sessions_dir, s3.root) if s3 else "TEMP_DIR/sessions",
                    "disk_skipped_names": sorted(self.disk_skipped),
                },
            }
        )
        if not result["server_alive_at_end"] or result["oom_kills"]:
            result["server_log_tail"] = tail
        return result


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def wait_health(port, proc, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering /health")
        try:
            status, _, _ = Client(port, 1).request("GET", "/health")
            if status == 200:
                return round((time.monotonic() - t0) * 1000, 1)
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.002)
    raise RuntimeError("no /health 200 within the timeout")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return str(v)


def print_table(results):
    print(
        f"{'model':<7} {'N':>3} {'store':<5} {'flows':>7} {'reqs':>5} {'statuses':<34} {'cg peak':>7} {'cg rss':>6} "
        f"{'srv HWM':>7} {'fail':>4} {'oom':>3} {'health':>6} {'idle':>5} {'1st mask':>8} {'wall':>5}"
    )
    for r in results:
        statuses = " ".join(f"{k}x{v}" for k, v in r.get("status_counts", {}).items())
        print(
            f"{r['model']:<7} {r['n']:>3} {r.get('store', 'local'):<5} {str(r.get('flows_completed')) + '/' + str(r.get('flows_planned')):>7} "
            f"{fmt(r.get('requests')):>5} {statuses:<34} {fmt(r.get('cgroup_max_usage_mb')):>7} "
            f"{fmt(r.get('cgroup_peak_rss_sampled_mb')):>6} {fmt(r.get('server_vmhwm_mb')):>7} "
            f"{fmt(r.get('failcnt')):>4} {fmt(r.get('oom_kills')):>3} {fmt(r.get('start_to_health_ms')):>6} "
            f"{fmt(r.get('idle_rss_mb')):>5} {fmt(r.get('start_to_first_mask_ms')):>8} {fmt(r.get('wall_s')):>5}"
        )
    print("\nlatency p50 / p95 ms (successful answers):")
    print(f"{'model':<7} {'N':>3} {'store':<5} " + " ".join(f"{r:>21}" for r in ROUTES) + f" {'flow p50/p95 s':>15}")
    for r in results:
        cells = []
        for route in ROUTES:
            l = r.get("latency", {}).get(route, {})
            cells.append(f"{fmt(l.get('p50_ms')) + ' / ' + fmt(l.get('p95_ms')):>21}")
        flow = f"{fmt(r.get('flow_p50_s'))} / {fmt(r.get('flow_p95_s'))}"
        print(f"{r['model']:<7} {r['n']:>3} {r.get('store', 'local'):<5} " + " ".join(cells) + f" {flow:>15}")
    print(
        "\nartefacts (TEMP_DIR/sessions, or with --store s3 the bucket's sessions, on disk every 0.2 s: "
        "file sizes / whole pages; /health's artefact_mb), MB:"
    )
    print(
        f"{'model':<7} {'N':>3} {'store':<5} {'restarts':>8} {'503s':>5} {'cap':>5} {'disk max':>8} {'pages max':>9} "
        f"{'/health max':>11} {'1 job':>5} {'1 session':>9} {'dirs max':>8} {'sessions':>8} {'samples disk/health':>19}"
    )
    for r in results:
        a = r.get("artefacts", {})
        cap = a.get("cap_mb") or (a.get("health_artefact_cap_mb") or [None])[0]
        samples = f"{a.get('disk_samples')}/{a.get('health_samples')}"
        print(
            f"{r['model']:<7} {r['n']:>3} {r.get('store', 'local'):<5} {fmt(r.get('flow_restarts_after_eviction')):>8} "
            f"{fmt(r.get('retries_after_503')):>5} {fmt(cap):>5} {fmt(a.get('disk_max_mb')):>8} "
            f"{fmt(a.get('disk_max_pages_mb')):>9} {fmt(a.get('health_max_artefact_mb')):>11} "
            f"{fmt(a.get('disk_max_job_mb')):>5} {fmt(a.get('disk_max_session_mb')):>9} "
            f"{fmt(a.get('disk_max_session_dirs')):>8} {fmt(a.get('sessions_seen_on_disk')):>8} {samples:>19}"
        )


def cap_failures(r, args):
    """Why the artefact cap did not hold in scenario r (empty when it held)."""
    a = r["artefacts"]
    cap = args.cap_mb
    # One job's in-flight writes: the most that one upload (image), mask (mask + overlay)
    # or replace (result) was seen to take on disk. The cap may be passed by that much: by
    # the temporary file of a rewrite beside the file it replaces, or by a sample that saw
    # an evicted session's files before they went and the new ones after they came.
    slack = a["disk_max_job_mb"]
    a["slack_mb"] = slack
    session = a["disk_max_session_mb"]
    out = []
    if a["disk_samples"] < 10:
        out.append(f"only {a['disk_samples']} samples of TEMP_DIR/sessions")
    if a["health_samples"] < 10:
        out.append(f"only {a['health_samples']} /health samples ({a['health_errors']} failed)")
    if a["health_artefact_cap_mb"] != [cap]:
        out.append(f"/health's artefact_cap_mb is {a['health_artefact_cap_mb']}, the check holds it to {cap} MB")
    if args.shm and a["health_temp_dir_in_memory"] != [True]:
        out.append(f"/health's temp_dir_in_memory is {a['health_temp_dir_in_memory']}: not tmpfs to the app")
    if a["disk_max_pages_mb"] > cap + slack:
        out.append(
            f"artefacts on disk reached {a['disk_max_pages_mb']} MB ({a['disk_max_mb']} MB of file sizes): "
            f"over the cap {cap} MB + {slack} MB of one job's writes"
        )
    if (a["health_max_artefact_mb"] or 0) > cap + slack:
        out.append(f"/health's artefact_mb reached {a['health_max_artefact_mb']} MB: over the cap {cap} MB + {slack} MB")
    if a["disk_max_pages_mb"] < cap - session:
        out.append(
            f"artefacts on disk peaked at {a['disk_max_pages_mb']} MB, below the cap {cap} MB less one session "
            f"({session} MB): the scenario did not press the cap (more flows, or larger uploads)"
        )
    if r["http_503_without_retry_after"]:
        out.append(f"{r['http_503_without_retry_after']} answers 503 without Retry-After")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 1, 4 on U2-Net-p only (CI)")
    p.add_argument(
        "--cap-check",
        action="store_true",
        help="the artefact-cap scenario (CI): U2-Net-p, --shm, N = 3 x 67 new-session flows, "
        "TEMP_MAX_MB = --cap-mb; --strict fails unless the cap held",
    )
    p.add_argument(
        "--cap-mb", type=int, default=None, help="TEMP_MAX_MB for the server (default: the app's; 128 with --cap-check)"
    )
    p.add_argument(
        "--fullres",
        action="store_true",
        help="the full-resolution scenario: U2-Net-p, N = 16, the 24 MP JPEG; every flow also downloads "
        "/download_full (--fullres-format)",
    )
    p.add_argument("--fullres-format", choices=sorted(FULLRES_FORMATS), default="png")
    p.add_argument(
        "--measure-fullres",
        action="store_true",
        help="one flow each on the 12 MP and the 24 MP JPEG (U2-Net-p), timing /download_full in every "
        "format with the server's peak RSS over each download",
    )
    p.add_argument("--upload", default=None, help="the scene photo to upload (default WORKDIR/scene_12mp.jpg)")
    p.add_argument("--bin", default=os.path.join(REPO, "target", "release", "drishya"))
    p.add_argument("--models", default=None, help="comma list of u2netp, sam")
    p.add_argument("--n", default=None, help="comma list of concurrent clients")
    p.add_argument("--flows-per-client", type=int, default=None, help="default 1 (67 with --cap-check)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per scenario")
    p.add_argument("--max-requests", type=int, default=None, help="per scenario (default 20 + 40 per flow)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--limit-mb", type=int, default=512)
    p.add_argument("--inference-queue", type=int, default=None)
    p.add_argument("--inference-concurrency", type=int, default=None)
    p.add_argument("--shm", action="store_true", help="TEMP_DIR on /dev/shm (the app's default) instead of /tmp")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on an OOM kill, a 5xx other than 503, a 503 without Retry-After or an unfinished flow "
        "(and, with --cap-check, when the artefact cap did not hold)",
    )
    p.add_argument(
        "--store",
        choices=("local", "s3"),
        default="local",
        help="where the server keeps artefacts: local (TEMP_DIR/sessions, the default) or s3 (a bucket on an "
        "s3s-fs server started outside the cgroup for each scenario)",
    )
    p.add_argument(
        "--s3s-fs",
        default=os.environ.get("S3S_FS_BIN") or os.path.join(REPO, "target", "tools", "bin", "s3s-fs"),
        help="the s3s-fs binary for --store s3 (default $S3S_FS_BIN or target/tools/bin/s3s-fs)",
    )
    p.add_argument(
        "--distinct-uploads",
        action="store_true",
        help="every upload a scene of its own (the JPEG's quantisation tables changed per upload), so that "
        "no per-image model cache is shared between flows",
    )
    p.add_argument("--json")
    p.add_argument("--workdir", default=os.path.join(REPO, "target", "bench", "work"))
    p.add_argument("--shared", default=os.environ.get("DRISHYA_SHARED", os.path.join(REPO, "..", "shared")))
    args = p.parse_args()
    if args.cap_check:
        args.shm = True
        args.cap_mb = args.cap_mb or 128
        args.models = args.models or "u2netp"
        args.n = args.n or "3"
        args.flows_per_client = args.flows_per_client or 67
    if args.fullres or args.measure_fullres:
        if args.cap_check:
            raise SystemExit("loadtest: --fullres and --measure-fullres do not combine with --cap-check")
        args.models = args.models or "u2netp"
        args.n = args.n or ("1" if args.measure_fullres else "16")
        args.upload = args.upload or os.path.join(args.workdir, "scene_24mp.jpg")
        args.fullres = args.fullres or not args.measure_fullres
    args.flows_per_client = args.flows_per_client or 1
    # For proving the check can fail: the server gets another cap than the one checked.
    args.server_cap_mb = int(os.environ.get("LOADTEST_CAP_SERVER_MB") or args.cap_mb or 0)
    models_all = {
        "u2netp": os.path.abspath(os.path.join(args.shared, "models", "u2netp.onnx")),
        "sam": os.path.abspath(os.path.join(args.shared, "models", "mobile_sam")),
    }
    models = (args.models or ("u2netp" if args.quick else "u2netp,sam")).split(",")
    ns = [int(x) for x in (args.n or ("1,4" if args.quick else "1,4,16,64")).split(",")]
    if os.geteuid() != 0:
        raise SystemExit("loadtest: needs root to create a memory cgroup")
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"loadtest: {args.bin} not found: build it with cargo build --release")
    if args.store == "s3":
        if args.cap_check:
            raise SystemExit(
                "loadtest: --cap-check measures artefacts on tmpfs inside the cgroup; with --store s3 they are not there"
            )
        if not os.access(args.s3s_fs, os.X_OK):
            raise SystemExit(
                f"loadtest: {args.s3s_fs} not found: run scripts/install-s3s-fs, or pass --s3s-fs PATH (or S3S_FS_BIN)"
            )
    upload = args.upload or os.path.join(args.workdir, "scene_12mp.jpg")
    with open(upload, "rb") as f:
        jpeg = f.read()
    with open(os.path.join(args.workdir, "product.png"), "rb") as f:
        product = f.read()
    print(
        f"loadtest: upload {os.path.basename(upload)} {len(jpeg) / MIB:.1f} MB, limit {args.limit_mb} MB, "
        f"models {models}, N {ns}, {args.flows_per_client} flow(s) per client, TEMP_DIR on "
        f"{'/dev/shm (tmpfs)' if args.shm else tempfile.gettempdir()}"
        + (f", TEMP_MAX_MB {args.server_cap_mb}" if args.cap_mb else "")
        + f", store {args.store}"
        + (f" (s3s-fs {args.s3s_fs}, outside the cgroup)" if args.store == "s3" else ""),
        file=sys.stderr,
    )
    if args.cap_mb and args.server_cap_mb != args.cap_mb:
        print(
            f"loadtest: LOADTEST_CAP_SERVER_MB: the server gets TEMP_MAX_MB={args.server_cap_mb}, "
            f"the check holds it to {args.cap_mb} MB (this run is meant to fail)",
            file=sys.stderr,
        )
    # --measure-fullres: the 12 MP photo first, then the upload (the 24 MP one).
    uploads = [(os.path.basename(upload), jpeg)]
    if args.measure_fullres:
        with open(os.path.join(args.workdir, "scene_12mp.jpg"), "rb") as f:
            uploads.insert(0, ("scene_12mp.jpg", f.read()))
    results = []
    for model in models:
        for n, (upload_name, upload_bytes) in ((n, u) for n in ns for u in uploads):
            print(f"loadtest: {model} N={n} {upload_name} ...", file=sys.stderr)
            r = Scenario(args, model, models_all[model], n, upload_bytes, product, upload_name).run()
            results.append(r)
            a = r["artefacts"]
            print(
                f"loadtest: {model} N={n} store {r['store']}: {r['flows_completed']}/{r['flows_planned']} flows "
                f"({r['flow_restarts_after_eviction']} restarted after eviction), "
                f"statuses {r['status_counts']}, cgroup peak {r['cgroup_max_usage_mb']} MB, "
                f"oom kills {r['oom_kills']}, artefacts max {a['disk_max_pages_mb']} MB on disk / "
                f"{a['health_max_artefact_mb']} MB /health, {r.get('wall_s')} s",
                file=sys.stderr,
            )
    print_table(results)
    measured = [(r["upload"], m) for r in results for m in r.get("fullres_measures", [])]
    if measured:
        print("\n/download_full, one at a time: time, and the server's peak RSS over the download alone")
        print(f"{'upload':<16} {'format':<6} {'s':>6} {'MB out':>7} {'RSS before':>10} {'peak RSS':>9}")
        for name, m in measured:
            print(
                f"{name:<16} {m['format']:<6} {m['seconds']:>6.2f} {m['bytes'] / MIB:>7.1f} "
                f"{m['rss_before_mb']:>10.1f} {m['peak_rss_mb']:>9.1f}"
            )
    cap_bad = []
    if args.cap_check:
        for r in results:
            why = cap_failures(r, args)
            r["cap_check_failures"] = why
            a = r["artefacts"]
            print(
                f"\ncap check, {r['model']} N={r['n']}: cap {args.cap_mb} MB (+ {a['slack_mb']} MB, one job's writes); "
                f"max on disk {a['disk_max_pages_mb']} MB in pages ({a['disk_max_mb']} MB of file sizes, "
                f"{a['disk_samples']} samples), max /health artefact_mb {a['health_max_artefact_mb']} MB "
                f"({a['health_samples']} samples); {r['flows_completed']}/{r['flows_planned']} flows, "
                f"{r['flow_restarts_after_eviction']} restarted after eviction, {r['retries_after_503']} x 503 retried, "
                f"{a['sessions_seen_on_disk']} sessions seen on disk; cgroup peak {r['cgroup_max_usage_mb']} MB; "
                f"OOM kills {r['oom_kills']}"
            )
            for w in why:
                print(f"cap check FAILED: {w}")
            if not why:
                print("cap check: the artefact cap held")
            cap_bad += why
    report = {
        "tool": "drishya loadtest",
        "quick": args.quick,
        "cap_check": args.cap_check,
        "limit_mb": args.limit_mb,
        "upload": os.path.basename(upload),
        "jpeg_bytes": len(jpeg),
        "flows_per_client": args.flows_per_client,
        "time_limit_s": args.time_limit,
        "temp_dir_on": "/dev/shm" if args.shm else tempfile.gettempdir(),
        "store": args.store,
        "distinct_uploads": args.distinct_uploads,
        "speculative_embedding": os.environ.get("SPECULATIVE_EMBEDDING", "(default: on)"),
        "scenarios": results,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"loadtest: wrote {args.json}", file=sys.stderr)
    bad = [
        r
        for r in results
        if r["oom_kills"]
        or r["http_5xx_other_than_503"]
        or r["http_503_without_retry_after"]
        or r["flows_completed"] < r["flows_planned"]
    ]
    if (bad or cap_bad) and args.strict:
        for r in bad:
            print(
                f"loadtest FAILED: {r['model']} N={r['n']}: {r['flows_completed']}/{r['flows_planned']} flows, "
                f"{r['oom_kills']} OOM kills, {r['http_5xx_other_than_503']} 5xx other than 503, "
                f"{r['http_503_without_retry_after']} 503 without Retry-After; failures {r['failures'][:3]}",
                file=sys.stderr,
            )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
