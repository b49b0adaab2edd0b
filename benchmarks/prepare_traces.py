"""prepare_traces at the real scale: rows/s and peak RSS on 10%, 50% and 100% of an
OpenR1-Math-220k-sized synthetic input.

The input imitates the default split of OpenR1-Math-220k: 94k problems with 2-4 generations
each, about 85% verified correct and 90% complete, trace lengths log-uniform from 2k to 20k
tokens (under the shipped byte-level tokenizer one token is one byte; give --tokenizer for a
real one). It is written once as 20 parquet files; each fraction then runs in a fresh process
(so its peak RSS is its own) through the same streaming path as the stage, writing a real
training parquet. Memory must stay flat: record batches in, record batches out.

Run: .venv/bin/python benchmarks/prepare_traces.py [--problems 94000] [--workdir /tmp/prep-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FILES = 20
WORDS = ("we the of and to is let so then compute value equation solve check x y n sum product factor prime "
         "therefore because wait maybe hmm consider case first second note that since thus answer").split()


def make_input(workdir: Path, problems: int, seed: int) -> list[str]:
    """20 parquet files in the OpenR1 schema (only written if absent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [str(workdir / f"train-{i:05d}-of-{FILES:05d}.parquet") for i in range(FILES)]
    if all(os.path.exists(p) for p in paths):
        return paths
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + ". " for _ in range(5000)]
    per_file = math.ceil(problems / FILES)
    for f, path in enumerate(paths):
        rows = {"problem": [], "answer": [], "generations": [], "correctness_math_verify": [],
                "is_reasoning_complete": [], "source": []}
        for i in range(f * per_file, min(problems, (f + 1) * per_file)):
            k = rng.randint(2, 4)
            gens = []
            for _ in range(k):
                target = int(math.exp(rng.uniform(math.log(2000), math.log(20000))))
                text, size = [], 0
                while size < target:
                    s = rng.choice(sentences)
                    text.append(s)
                    size += len(s)
                gens.append("<think>\n" + "".join(text) + "</think>\nThe answer is \\boxed{" + str(i % 97) + "}.")
            rows["problem"].append(f"Problem {i}: find the value of n such that " + rng.choice(sentences))
            rows["answer"].append(str(i % 97))
            rows["generations"].append(gens)
            rows["correctness_math_verify"].append([rng.random() < 0.85 for _ in range(k)])
            rows["is_reasoning_complete"].append([rng.random() < 0.9 for _ in range(k)])
            rows["source"].append("synthetic")
        pq.write_table(pa.table(rows), path + ".tmp", compression="zstd")
        os.replace(path + ".tmp", path)
    return paths


def run_fraction(files: list[str], out: str, tokenizer: str, max_tokens: int, batch_rows: int) -> dict:
    """One fraction, in this (fresh) process: the stage's own streaming path."""
    from transformers import AutoTokenizer

    from luffy.data.traces import PromptTemplate, TraceFilter, prepare_stream, token_counter
    from luffy.models.tokenizer import SHIPPED_DIR

    tok = AutoTokenizer.from_pretrained(str(SHIPPED_DIR) if tokenizer == "shipped" else tokenizer)
    flt = TraceFilter(token_counter(tok), max_tokens, PromptTemplate("luffy", "SYSTEM"), "openr1_math")
    began = time.perf_counter()
    report = prepare_stream(files, out, flt, batch_rows)
    seconds = time.perf_counter() - began
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows_in": report.rows_in, "rows_out": report.rows_out, "seconds": seconds,
            "rows_per_s": report.rows_in / seconds, "peak_rss_mb": peak_mb,
            "generations": report.generations_in, "too_long": report.generations_rejected["too_long"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=94000)
    parser.add_argument("--workdir", default="/tmp/luffy-prepare-bench")
    parser.add_argument("--tokenizer", default="shipped")
    parser.add_argument("--max-trace-tokens", type=int, default=8192)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction-run", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.fraction_run is not None:  # the child process
        files = sorted(str(p) for p in workdir.glob("train-*.parquet"))[: max(1, round(FILES * args.fraction_run))]
        print(json.dumps(run_fraction(files, str(workdir / f"out-{args.fraction_run}.parquet"), args.tokenizer,
                                      args.max_trace_tokens, args.batch_rows)))
        return
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, python "
          f"{platform.python_version()}; tokenizer {args.tokenizer}")
    began = time.perf_counter()
    files = make_input(workdir, args.problems, args.seed)
    size_gb = sum(os.path.getsize(f) for f in files) / 1e9
    print(f"input: {args.problems} problems in {FILES} files, {size_gb:.2f} GB on disk (zstd) "
          f"[{time.perf_counter() - began:.0f} s to make or find]")
    for fraction in (0.1, 0.5, 1.0):
        child = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--tokenizer", args.tokenizer,
                                "--max-trace-tokens", str(args.max_trace_tokens), "--batch-rows",
                                str(args.batch_rows), "--fraction-run", str(fraction)],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{fraction:4.0%}: {r['rows_in']:6d} problems ({r['generations']} generations) -> {r['rows_out']} rows "
              f"in {r['seconds']:6.1f} s = {r['rows_per_s']:7.1f} rows/s; peak RSS {r['peak_rss_mb']:6.0f} MB; "
              f"{r['too_long']} traces over {args.max_trace_tokens} tokens")


if __name__ == "__main__":
    main()
