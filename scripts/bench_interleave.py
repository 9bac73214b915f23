#!/usr/bin/env python3
"""Runs every stage of `bench` and of `baseline.py` in alternation, round after round, and
writes ours.json and baseline.json as the sequential runs would (scripts/bench --interleave).

Why: on a shared host the machine's speed drifts by 15-25 % over minutes. Run one side's
stages after the other's and a ratio compares two different machines; run each stage of
each side in turn, several rounds, and both sides see the same drift. Each stage still
runs in its own process (its own peak RSS); a stage's runs over all rounds are pooled and
its median taken over them, its peaks are the highest of any round.

usage: bench_interleave.py --bin PATH --python PATH --workdir DIR --shared DIR --out DIR
                           --rounds R --runs N [--cv-threads N] [--no-arena]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The timed stages both tools have, in their order.
STAGES = ["decode_12mp", "decode_24mp", "u2netp_mask", "sam_encoder", "sam_decoder", "sam_mask",
          "replace", "png_encode", "flow_u2netp", "flow_sam"]
HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(cmd, marker):
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench_interleave: {' '.join(cmd[:4])} failed ({proc.returncode})")
    line = next((l for l in proc.stdout.splitlines() if l.startswith(marker + " ")), None)
    if line is None:
        raise SystemExit(f"bench_interleave: no {marker} line from {' '.join(cmd[:4])}")
    result = json.loads(line.split(" ", 1)[1])
    result["process_wall_ms"] = round((time.perf_counter() - t) * 1000, 2)
    return result


def pooled(rounds):
    """One stage's rounds as one result: runs pooled, peaks the highest, the rest medians."""
    runs = [v for r in rounds for v in r["all_ms"]]
    med = lambda key: statistics.median([r[key] for r in rounds if r.get(key) is not None]) \
        if any(r.get(key) is not None for r in rounds) else None
    peak = lambda key: max((r[key] for r in rounds if r.get(key) is not None), default=None)
    parts = {}
    for r in rounds:
        for k, v in (r.get("parts_median_ms") or {}).items():
            parts.setdefault(k, []).append(v)
    result = dict(rounds[0])
    result.update({
        "runs": len(runs),
        "all_ms": runs,
        "median_ms": round(statistics.median(runs), 2),
        "min_ms": min(runs),
        "max_ms": max(runs),
        "parts_median_ms": {k: round(statistics.median(v), 2) for k, v in parts.items()},
        "rounds": len(rounds),
        "round_medians_ms": [r["median_ms"] for r in rounds],
    })
    for key in ("load_ms", "first_run_ms", "cold_to_first_result_ms", "rss_start_mb", "rss_loaded_mb", "process_wall_ms"):
        result[key] = med(key)
    for key in ("peak_load_mb", "peak_run_mb", "peak_rss_mb"):
        result[key] = peak(key)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--bin", "--python", "--workdir", "--shared", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--cv-threads", type=int, default=1)
    p.add_argument("--no-arena", action="store_true")
    args = p.parse_args()
    if args.rounds < 1 or args.runs < 1:
        raise SystemExit("bench_interleave: --rounds and --runs must be at least 1")

    ours_rounds = {s: [] for s in STAGES}
    base_rounds = {s: [] for s in STAGES}
    for r in range(args.rounds):
        for stage in STAGES:
            print(f"bench: round {r + 1}/{args.rounds}, {stage}: ours, then the baseline ({args.runs} runs each)",
                  file=sys.stderr)
            ours_rounds[stage].append(run_child(
                [args.bin, "--stage", stage, "--runs", str(args.runs), "--workdir", args.workdir, "--shared", args.shared],
                "BENCH_RESULT"))
            cmd = [args.python, os.path.join(HERE, "baseline.py"), "--stage", stage, "--runs", str(args.runs),
                   "--workdir", args.workdir, "--shared", args.shared, "--cv-threads", str(args.cv_threads)]
            if args.no_arena:
                cmd.append("--no-arena")
            base_rounds[stage].append(run_child(cmd, "BASELINE_RESULT"))

    # The sequential runs' own files (one short stage each) give the headers: machine,
    # plans, profiles, versions, settings; their stages are replaced.
    for name, rounds in (("ours.json", ours_rounds), ("baseline.json", base_rounds)):
        path = os.path.join(args.out, name)
        report = json.load(open(path))
        report["stages"] = [pooled(rounds[s]) for s in STAGES]
        report["runs"] = args.rounds * args.runs
        report["interleaved"] = {"rounds": args.rounds, "runs_per_round": args.runs}
        json.dump(report, open(path, "w"), indent=2)
        print(f"bench: wrote {path} ({args.rounds} rounds of {args.runs} runs, interleaved)", file=sys.stderr)


if __name__ == "__main__":
    main()
