"""Reading a prompt pool shard of LLaVA-OneVision-Data's size: peak memory above the interpreter and the rate.

    python bench/parquet_pool.py                      # a 500 MB shard, read whole
    python bench/parquet_pool.py --sample 1000        # 1,000 rows drawn from it
    python bench/parquet_pool.py --megabytes 50       # a quick run

Writes a shard in the Hub's schema (id, image {bytes, path}, conversations, data_source) of distinct noise PNGs,
about 100 KB each, in row groups of --row-group rows (the Hub's shards hold about 500 MB), then reads it as
`fastjudge iterate --prompts SHARD` does (`data.parquet.load_prompts`: rows a row group at a time, each image
checked and extracted into a folder under its content's hash) in a fresh process, which reports its peak resident
memory above what it held before reading. Prints a table, then one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import report  # noqa: E402

# the reader, in a fresh process: its resident memory sampled every 5 ms from /proc while it reads (the maximum
# since the process began would count the imports' own peak)
READ = """
import sys, threading, time
from pathlib import Path
import pyarrow.parquet
from fastjudge.data import parquet

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024

peak, reading = [0], [True]
def watch():
    while reading[0]:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
before = rss_mb()
watcher = threading.Thread(target=watch)
watcher.start()
t0 = time.perf_counter()
records, skips, counts = parquet.load_prompts(sys.argv[1], parquet.Columns(), Path(sys.argv[2]), 4096 * 4096,
                                              None if sys.argv[3] == "all" else int(sys.argv[3]), 0)
seconds = time.perf_counter() - t0
reading[0] = False
watcher.join()
print(len(records), len(skips), seconds, before, max(peak[0], rss_mb()))
"""


def write_shard(path: Path, megabytes: int, row_group: int) -> tuple[int, int]:
    """A shard of about `megabytes` MB; returns (rows, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rs = np.random.RandomState(0)
    writer, rows, size, batch = None, 0, 0, []
    while size < megabytes * 1e6:
        buffer = io.BytesIO()
        Image.fromarray(rs.randint(0, 256, (180, 180, 3), dtype=np.uint8)).save(buffer, format="PNG")
        image = buffer.getvalue()
        batch.append({"id": f"row-{rows}", "image": {"bytes": image, "path": f"{rows}.png"},
                      "conversations": [{"from": "human", "value": "<image>\nHow many objects are there?"},
                                        {"from": "gpt", "value": str(rows % 7)}],
                      "data_source": "bench"})
        rows, size = rows + 1, size + len(image)
        if len(batch) == row_group:
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            batch = []
    if batch:
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return rows, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=500, help="image bytes in the shard")
    parser.add_argument("--row-group", type=int, default=500, help="rows a row group holds")
    parser.add_argument("--sample", type=int, default=None, help="read this many rows, drawn uniformly")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-00000-of-00001.parquet"
        t0 = time.perf_counter()
        rows, size = write_shard(shard, args.megabytes, args.row_group)
        written = time.perf_counter() - t0
        done = subprocess.run([sys.executable, "-c", READ, str(shard), str(Path(tmp) / "images"),
                               str(args.sample or "all")], capture_output=True, text=True, check=True)
        read, skipped, seconds, before_mb, peak_mb = done.stdout.split()
        read, skipped, seconds = int(read), int(skipped), float(seconds)
    result = {"bench": "parquet_pool", "shard_mb": round(size / 1e6, 1), "rows": rows,
              "row_group": args.row_group, "sample": args.sample, "read": read, "skipped": skipped,
              "seconds": round(seconds, 2), "rows_per_s": round(read / seconds, 1),
              "mb_per_s": round(size / 1e6 / seconds, 1) if args.sample is None else None,
              "rss_before_mb": int(before_mb), "rss_peak_mb": int(peak_mb),
              "peak_above_interpreter_mb": int(peak_mb) - int(before_mb), "write_seconds": round(written, 1)}
    print(f"{'shard':>10} {'rows':>7} {'read':>7} {'seconds':>8} {'rows/s':>8} {'MB/s':>7} {'peak above MB':>14}")
    print(f"{result['shard_mb']:>9}M {rows:>7} {read:>7} {seconds:>8.1f} {result['rows_per_s']:>8} "
          f"{result['mb_per_s'] or '-':>7} {result['peak_above_interpreter_mb']:>14}")
    report(result, args.out)


if __name__ == "__main__":
    main()
