"""Times `convert_checkpoint` against reading the source once (`cat SRC/* > /dev/null`), with peak memory.

    python benchmarks/bench_convert.py SRC DST [--dtype bfloat16] [--keep]

Runs, in order: `cat` over SRC's files (the floor: reading the bytes once), then the conversion in a
child process (so that its peak RSS is its own: `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, plus
psutil sampling of the child and its children every 0.2 s: `common.PeakRSS`). Prints the times,
their ratio, throughput, peak RSS and DST's size on disk; DST is deleted afterwards unless --keep.
The page cache is not dropped: `cat` warms it for the conversion; the figures say whether SRC fits in
RAM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
from common import GIB


def timed_cat(src: Path) -> float:
    files = sorted(str(p) for p in src.rglob("*") if p.is_file())
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def timed_convert(src: Path, dst: Path, dtype: str) -> tuple[float, int, int]:
    """(seconds, ru_maxrss of children in bytes, psutil-sampled peak in bytes) of a converting child."""
    code = ("import sys, ml_dtypes, numpy as np; from gptoss_jax.checkpoint import convert_checkpoint; "
            "convert_checkpoint(sys.argv[1], sys.argv[2], dtype=np.dtype(sys.argv[3]), force=True)")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst), dtype])
    with common.PeakRSS(interval=0.2, pid=child.pid, children=True) as peak:
        returncode = child.wait()
        seconds = time.perf_counter() - start
    if returncode:
        sys.exit(f"conversion failed with exit status {returncode}")
    return seconds, common.max_rss("children"), peak.peak


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--keep", action="store_true", help="keep DST (default: delete it afterwards)")
    args = parser.parse_args(argv)
    src_bytes = sum(p.stat().st_size for p in args.src.rglob("*") if p.is_file())
    ram = common.ram_bytes()

    cat_s = timed_cat(args.src)
    convert_s, maxrss, sampled = timed_convert(args.src, args.dst, args.dtype)
    dst_bytes = disk_usage(args.dst)
    if not args.keep:
        shutil.rmtree(args.dst)
    print(f"source          {src_bytes / 1e9:.2f} GB ({'fits' if src_bytes < ram else 'does not fit'} in "
          f"{ram / GIB:.0f} GiB RAM), {os.cpu_count()} CPUs")
    print(f"cat SRC/*       {cat_s:8.1f} s  {src_bytes / cat_s / 1e9:.2f} GB/s")
    print(f"convert ({args.dtype}) {convert_s:8.1f} s  {src_bytes / convert_s / 1e9:.2f} GB/s of source  "
          f"ratio convert/cat {convert_s / cat_s:.1f}")
    print(f"peak RSS        {maxrss / GIB:.2f} GiB (getrusage, children)"
          + (f", {sampled / GIB:.2f} GiB (psutil sampled)" if sampled else ""))
    print(f"DST on disk     {dst_bytes / 1e9:.2f} GB{' (deleted)' if not args.keep else ''}")


if __name__ == "__main__":
    main()
