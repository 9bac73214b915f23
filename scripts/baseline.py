#!/usr/bin/env python3
"""The Flask app's stack on the same stages as `bench`, for a side-by-side.

Pillow/OpenCV decode, cv2.resize(..., INTER_AREA), onnxruntime with one intra-op and one
inter-op thread on the same ONNX files (for SAM the full decoder, with orig_im_size),
numpy compositing (the same scale / feather / grade / composite as crates/imaging/src/composite.rs,
written the straightforward numpy + OpenCV way), cv2.imencode('.png').

Each stage runs in its own subprocess, so its peak RSS (VmHWM) is its own, split like
bench's into the peak while loading and the peak while running. The inputs are the
files `bench` wrote into --workdir (run `bench` first, or let scripts/bench do both).

The packages are installed by name from PyPI into a virtualenv (default
target/bench/venv) the first time: numpy, opencv-python-headless, onnxruntime, pillow.

usage: baseline.py [--quick] [--runs N] [--json PATH] [--workdir DIR] [--shared DIR]
                   [--venv DIR] [--stages a,b] [--cv-threads N] [--no-arena]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PACKAGES = ["numpy", "opencv-python-headless", "onnxruntime", "pillow"]
MAX_WIDTH = 1280
CUP_BOX = (0.27, 0.03, 0.70, 0.78)  # same fractions as tools/bench/src/inputs.rs
MEAN_IMAGENET = (0.485, 0.456, 0.406)
STD_IMAGENET = (0.229, 0.224, 0.225)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

STAGES = [
    ("decode_12mp", "cv2.imdecode + cv2.resize INTER_AREA of the 12 MP JPEG to 1280 px"),
    ("decode_24mp", "cv2.imdecode + cv2.resize INTER_AREA of the 24 MP JPEG to 1280 px"),
    ("decode_12mp_pil", "Pillow open + exif_transpose + RGB + cv2.resize INTER_AREA (12 MP)"),
    ("u2netp_mask", "U2-Net-p on coffee.png, onnxruntime 1 thread (crop, 320x320, paste)"),
    ("sam_encoder", "MobileSAM encoder, onnxruntime 1 thread (preprocessing apart)"),
    ("sam_decoder", "MobileSAM full decoder with orig_im_size + threshold"),
    ("sam_mask", "MobileSAM encoder + decoder in one process"),
    ("replace", "numpy/OpenCV compositing, same settings"),
    ("png_encode", "cv2.imencode('.png') of the result"),
    ("flow_u2netp", "one whole user flow in-process, U2-Net-p"),
    ("flow_sam", "one whole user flow in-process, MobileSAM"),
]


# ---------------------------------------------------------------------------------------
# Bootstrapping: a virtualenv with the packages, installed by name


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def ensure_venv(venv):
    py = venv_python(venv)
    probe = "import numpy, cv2, onnxruntime, PIL"
    if os.path.exists(py) and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"baseline: installing {' '.join(PACKAGES)} into {venv}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    subprocess.run([py, "-c", probe], check=True)
    return py


# ---------------------------------------------------------------------------------------
# Memory and time helpers


def vm_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_age():
    """Seconds since this process was started (exec), from /proc (10 ms resolution)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def mb(b):
    return round(b / 1048576, 1)


def ms(s):
    return round(s * 1000, 2)


def cup_box(w, h):
    x0, y0, x1, y1 = CUP_BOX
    return (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))


# ---------------------------------------------------------------------------------------
# The Flask way of doing each step


def ort_session(path, arena):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = arena
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def decode_scene_cv2(data):
    import cv2
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    if w > MAX_WIDTH:
        nh = max(1, round(h * MAX_WIDTH / w))
        bgr = cv2.resize(bgr, (MAX_WIDTH, nh), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_scene_pil(data):
    import io

    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    arr = np.asarray(img)
    del img
    h, w = arr.shape[:2]
    if w > MAX_WIDTH:
        nh = max(1, round(h * MAX_WIDTH / w))
        arr = cv2.resize(arr, (MAX_WIDTH, nh), interpolation=cv2.INTER_AREA)
    return arr


class U2Net:
    def __init__(self, path, arena):
        self.session = ort_session(path, arena)
        self.input = self.session.get_inputs()[0].name

    def segment(self, rgb, box):
        import cv2
        import numpy as np

        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = box
        mx, my = round((x1 - x0) * 0.1), round((y1 - y0) * 0.1)
        left, top = max(0, x0 - mx), max(0, y0 - my)
        right, bottom = min(w, x1 + mx), min(h, y1 + my)
        crop = rgb[top:bottom, left:right]
        small = cv2.resize(crop, (320, 320), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        small = (small - np.array(MEAN_IMAGENET, np.float32)) / np.array(STD_IMAGENET, np.float32)
        tensor = small.transpose(2, 0, 1)[None].astype(np.float32)
        out = self.session.run(None, {self.input: tensor})[0][0, 0]
        lo, hi = out.min(), out.max()
        out = (out - lo) / (hi - lo) if hi - lo > 1e-7 else np.zeros_like(out)
        back = cv2.resize(out, (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
        mask = np.zeros((h, w), np.uint8)
        inner = back[y0 - top : y1 - top, x0 - left : x1 - left]
        mask[y0:y1, x0:x1] = np.where(inner > 0.5, 255, 0).astype(np.uint8)
        return mask


def sam_preprocess(rgb):
    import cv2
    import numpy as np

    h, w = rgb.shape[:2]
    scale = 1024 / max(h, w)
    nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    resized = (resized - np.array(SAM_MEAN, np.float32)) / np.array(SAM_STD, np.float32)
    padded = np.zeros((1024, 1024, 3), np.float32)
    padded[:nh, :nw] = resized
    return padded.transpose(2, 0, 1)[None].copy()


class Sam:
    def __init__(self, folder, arena, encoder=True, decoder=True):
        self.encoder = ort_session(os.path.join(folder, "encoder.onnx"), arena) if encoder else None
        self.decoder = ort_session(os.path.join(folder, "decoder.onnx"), arena) if decoder else None

    def encode(self, tensor):
        return self.encoder.run(None, {"image": tensor})[0]

    def decode(self, embedding, box, size):
        import numpy as np

        w, h = size
        scale = 1024 / max(h, w)
        nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
        sx, sy = nw / w, nh / h
        x0, y0, x1, y1 = box
        feeds = {
            "image_embeddings": embedding,
            "point_coords": np.array([[[x0 * sx, y0 * sy], [x1 * sx, y1 * sy]]], np.float32),
            "point_labels": np.array([[2, 3]], np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([h, w], np.float32),
        }
        masks, iou, _ = self.decoder.run(None, feeds)
        best = int(np.argmax(iou[0]))
        return np.where(masks[0, best] > 0, 255, 0).astype(np.uint8)

    def segment(self, rgb, box):
        h, w = rgb.shape[:2]
        embedding = self.encode(sam_preprocess(rgb))
        return self.decode(embedding, box, (w, h))


def replace_product(scene, mask, product, scale=1.0, feather=10, strength=0.5):
    """The same composite as crates/imaging/src/composite.rs, the straightforward numpy/OpenCV way."""
    import cv2
    import numpy as np

    inside = mask > 127
    ys = np.flatnonzero(inside.any(axis=1))
    xs = np.flatnonzero(inside.any(axis=0))
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    bw, bh = x1 - x0, y1 - y0
    ph, pw = product.shape[:2]
    short = max(1, round(min(bw, bh) * scale))
    if pw <= ph:
        tw, th = short, max(1, round(ph * short / pw))
    else:
        tw, th = max(1, round(pw * short / ph)), short
    resized = cv2.resize(product, (tw, th), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
    layer = np.zeros((bh, bw, 4), np.float32)
    ox, oy = (bw - tw) // 2, (bh - th) // 2
    sx, sy, dx, dy = max(0, -ox), max(0, -oy), max(0, ox), max(0, oy)
    w, h = min(tw - sx, bw - dx), min(th - sy, bh - dy)
    layer[dy : dy + h, dx : dx + w] = resized[sy : sy + h, sx : sx + w]
    m = inside[y0:y1, x0:x1]
    region = scene[y0:y1, x0:x1].astype(np.float32)
    # colour grading towards the masked area
    target = region[m]
    opaque = layer[..., 3] > 0
    if target.size and opaque.any():
        src = layer[..., :3][opaque]
        pm, ps = src.mean(axis=0), src.std(axis=0)
        tm, ts = target.mean(axis=0), target.std(axis=0)
        mean = (1 - strength) * pm + strength * tm
        std = (1 - strength) * ps + strength * ts
        safe = np.where(ps > 1e-12, ps, 1.0)
        graded = np.where(ps > 1e-12, (src - pm) / safe * std + mean, src)
        rgb = layer[..., :3]
        rgb[opaque] = np.clip(np.round(graded), 0, 255)
    # feathering: Euclidean distance to the nearest pixel outside the mask
    padded = np.pad(m.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    weight = np.clip(dist / feather, 0.0, 1.0) if feather > 0 else m.astype(np.float32)
    cov = weight * layer[..., 3] / 255.0
    blended = region * (1 - cov[..., None]) + layer[..., :3] * cov[..., None]
    out = scene.copy()
    out[y0:y1, x0:x1] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    # seam: covered pixels within 2 px of the edge take the 3x3 mean
    if feather > 0:
        band = (dist > 0) & (dist <= 2.0) & (cov > 0)
        ey0, ey1, ex0, ex1 = max(0, y0 - 1), min(out.shape[0], y1 + 1), max(0, x0 - 1), min(out.shape[1], x1 + 1)
        blurred = cv2.blur(out[ey0:ey1, ex0:ex1], (3, 3), borderType=cv2.BORDER_REPLICATE)
        blurred = blurred[y0 - ey0 : y0 - ey0 + bh, x0 - ex0 : x0 - ex0 + bw]
        out_region = out[y0:y1, x0:x1]
        out_region[band] = blurred[band]
    return out


def mask_overlay(scene, mask):
    import numpy as np

    out = scene.copy()
    sel = mask >= 128
    tint = np.array([255, 40, 110], np.float32)
    out[sel] = ((out[sel].astype(np.float32) * 55 + tint * 45) / 100).astype(np.uint8)
    return out


def encode_png(rgb):
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    assert ok
    return buf


def decode_png(buf, flags=None):
    import cv2
    import numpy as np

    arr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED if flags is None else flags)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


# ---------------------------------------------------------------------------------------
# Stages (run in a child process each)


def read(workdir, name):
    with open(os.path.join(workdir, name), "rb") as f:
        return f.read()


def setup(name, args):
    """Loads what the stage needs; returns work(i) -> (main_seconds, {part: seconds})."""
    import cv2
    import numpy as np

    cv2.setNumThreads(args.cv_threads)
    wd, shared, arena = args.workdir, args.shared, not args.no_arena
    sam_folder = os.path.join(shared, "models", "mobile_sam")

    if name in ("decode_12mp", "decode_24mp", "decode_12mp_pil"):
        data = read(wd, "scene_24mp.jpg" if name == "decode_24mp" else "scene_12mp.jpg")
        decode = decode_scene_pil if name.endswith("_pil") else decode_scene_cv2

        def work(_):
            t = time.perf_counter()
            decode(data)
            return time.perf_counter() - t, {}

        return work
    if name == "u2netp_mask":
        rgb = decode_png(read(os.path.join(shared, "images"), "coffee.png"))
        model = U2Net(os.path.join(shared, "models", "u2netp.onnx"), arena)
        box = cup_box(rgb.shape[1], rgb.shape[0])

        def work(_):
            t = time.perf_counter()
            model.segment(rgb, box)
            return time.perf_counter() - t, {}

        return work
    if name == "sam_encoder":
        rgb = decode_png(read(wd, "scene_1280.png"))
        model = Sam(sam_folder, arena, decoder=False)

        def work(_):
            t0 = time.perf_counter()
            tensor = sam_preprocess(rgb)
            t1 = time.perf_counter()
            model.encode(tensor)
            return time.perf_counter() - t1, {"preprocess_s": t1 - t0}

        return work
    if name == "sam_decoder":
        rgb = decode_png(read(wd, "scene_1280.png"))
        h, w = rgb.shape[:2]
        del rgb
        embedding = np.fromfile(os.path.join(wd, "embedding.f32"), dtype="<f4").reshape(1, 256, 64, 64)
        model = Sam(sam_folder, arena, encoder=False)
        box = cup_box(w, h)

        def work(_):
            t = time.perf_counter()
            model.decode(embedding, box, (w, h))
            return time.perf_counter() - t, {}

        return work
    if name == "sam_mask":
        rgb = decode_png(read(wd, "scene_1280.png"))
        model = Sam(sam_folder, arena)
        box = cup_box(rgb.shape[1], rgb.shape[0])

        def work(_):
            t = time.perf_counter()
            model.segment(rgb, box)
            return time.perf_counter() - t, {}

        return work
    if name in ("replace", "png_encode"):
        scene = decode_png(read(wd, "scene_1280.png"))
        mask = cv2.imread(os.path.join(wd, "mask_1280.png"), cv2.IMREAD_GRAYSCALE)
        product = decode_png(read(wd, "product.png"))
        if name == "replace":

            def work(_):
                t = time.perf_counter()
                replace_product(scene, mask, product)
                return time.perf_counter() - t, {}

            return work
        bgr = cv2.cvtColor(replace_product(scene, mask, product), cv2.COLOR_RGB2BGR)
        del scene, mask, product

        def work(_):
            t = time.perf_counter()
            ok, _buf = cv2.imencode(".png", bgr)
            return time.perf_counter() - t, {}

        return work
    if name in ("flow_u2netp", "flow_sam"):
        jpeg = read(wd, "scene_12mp.jpg")
        product_png = read(wd, "product.png")
        if name == "flow_sam":
            model = Sam(sam_folder, arena)
        else:
            model = U2Net(os.path.join(shared, "models", "u2netp.onnx"), arena)

        def work(_):
            t0 = time.perf_counter()
            scene = decode_scene_cv2(jpeg)
            scene_png = encode_png(scene)
            del scene
            t1 = time.perf_counter()
            scene = decode_png(scene_png)
            mask = model.segment(scene, cup_box(scene.shape[1], scene.shape[0]))
            mask_png = encode_png(mask)
            encode_png(mask_overlay(scene, mask))
            del scene, mask
            t2 = time.perf_counter()
            scene = decode_png(scene_png)
            mask = decode_png(mask_png)
            product = decode_png(product_png)
            result = replace_product(scene, mask, product)
            encode_png(result)
            t3 = time.perf_counter()
            return t3 - t0, {"upload_s": t1 - t0, "mask_s": t2 - t1, "replace_s": t3 - t2}

        return work
    raise SystemExit(f"unknown stage {name}")


def child(args):
    runs = args.runs if args.runs is not None else 5
    rss_start = vm_field("VmRSS:")
    t = time.perf_counter()
    work = setup(args.stage, args)
    load_s = time.perf_counter() - t
    rss_loaded, peak_load = vm_field("VmRSS:"), vm_field("VmHWM:")
    reset = reset_peak()
    first, _ = work(0)
    cold = process_age()
    mains, parts = [], {}
    for i in range(runs):
        main, p = work(i + 1)
        mains.append(main)
        for k, v in p.items():
            parts.setdefault(k, []).append(v)
    peak_run = vm_field("VmHWM:")
    result = {
        "stage": args.stage,
        "runs": len(mains),
        "median_ms": ms(statistics.median(mains)),
        "min_ms": ms(min(mains)),
        "max_ms": ms(max(mains)),
        "all_ms": [ms(v) for v in mains],
        "parts_median_ms": {k.replace("_s", "_ms"): ms(statistics.median(v)) for k, v in parts.items()},
        "load_ms": ms(load_s),
        "first_run_ms": ms(first),
        "cold_to_first_result_ms": ms(cold),
        "rss_start_mb": mb(rss_start),
        "rss_loaded_mb": mb(rss_loaded),
        "peak_load_mb": mb(peak_load),
        "peak_run_mb": mb(peak_run) if reset else None,
        "peak_rss_mb": mb(max(peak_load, peak_run) if reset else peak_run),
    }
    print("BASELINE_RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------
# The parent: run each stage in its own process


def versions(py):
    code = (
        "import json, numpy, cv2, onnxruntime, PIL, platform;"
        "print(json.dumps({'python': platform.python_version(), 'numpy': numpy.__version__,"
        "'opencv': cv2.__version__, 'onnxruntime': onnxruntime.__version__, 'pillow': PIL.__version__}))"
    )
    return json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout)


def parent(args):
    py = ensure_venv(args.venv)
    if not os.path.exists(os.path.join(args.workdir, "inputs.json")):
        raise SystemExit(f"baseline: no inputs in {args.workdir}: run bench first (scripts/bench does)")
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    wanted = args.stages.split(",") if args.stages else [n for n, _ in STAGES]
    results = []
    for stage in wanted:
        print(f"baseline: {stage} ({runs} runs after one warm-up)", file=sys.stderr)
        cmd = [py, os.path.abspath(__file__), "--stage", stage, "--runs", str(runs), "--workdir", args.workdir]
        cmd += ["--shared", args.shared, "--cv-threads", str(args.cv_threads)]
        if args.no_arena:
            cmd.append("--no-arena")
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"baseline: stage {stage} failed ({proc.returncode})")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("BASELINE_RESULT "))
        result = json.loads(line.split(" ", 1)[1])
        result["process_wall_ms"] = ms(time.perf_counter() - t)
        results.append(result)
    header = f"{'stage':<16} {'median ms':>9} {'min ms':>9} {'load ms':>9} {'1st ms':>8} {'cold ms':>9} {'peak MB':>8} {'load pk':>8} {'run pk':>8}"
    print(header)
    for r in results:
        fmt = lambda v: "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")
        print(
            f"{r['stage']:<16} {fmt(r['median_ms']):>9} {fmt(r['min_ms']):>9} {fmt(r['load_ms']):>9} "
            f"{fmt(r['first_run_ms']):>8} {fmt(r['cold_to_first_result_ms']):>9} {fmt(r['peak_rss_mb']):>8} "
            f"{fmt(r['peak_load_mb']):>8} {fmt(r['peak_run_mb']):>8}"
        )
        if r["parts_median_ms"]:
            print(" " * 19 + "parts (median): " + ", ".join(f"{k} {fmt(v)}" for k, v in r["parts_median_ms"].items()))
    report = {
        "tool": "drishya baseline (Flask stack)",
        "quick": args.quick,
        "runs": runs,
        "versions": versions(py),
        "settings": {
            "onnxruntime_threads": {"intra_op": 1, "inter_op": 1},
            "onnxruntime_cpu_mem_arena": not args.no_arena,
            "opencv_threads": args.cv_threads,
        },
        "stages": results,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"baseline: wrote {args.json}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int)
    p.add_argument("--json")
    p.add_argument("--workdir", default=os.path.join(REPO, "target", "bench", "work"))
    p.add_argument("--shared", default=os.environ.get("DRISHYA_SHARED", os.path.join(REPO, "..", "shared")))
    p.add_argument("--venv", default=os.path.join(REPO, "target", "bench", "venv"))
    p.add_argument("--stages")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--cv-threads", type=int, default=1, help="cv2.setNumThreads (default 1, like our one thread)")
    p.add_argument("--no-arena", action="store_true", help="onnxruntime without its CPU memory arena")
    args = p.parse_args()
    if args.stage:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
