"""Packed SFT data throughput per host: tokens/s of [batch, 2048] rows from prepared data.

    python bench/data.py [--prompts 20000] [--seq 2048] [--batch 8] [--batches 60]

Prepares the synthetic suite as a TFDS dataset (once), then times SeqioSftData (TFDS → seqio →
packing) and SftData (JSONL → template → packing, everything in memory), pinned to one CPU
core. Goal: >= 150k tokens/s on one core, so a host never starves an accelerator.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tokens_per_second(batches, count, batch, seq, skip_first=True):
    if skip_first:
        next(batches)  # start-up (TF graph building, first shuffle buffer fill)
    began = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch * seq / (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "xwin_bench_data"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    from xwin_jax.data import synthetic, tasks, tfds_builder
    from xwin_jax.data.seqio_sft_data import SeqioSftData
    from xwin_jax.data.sft_data import SftData

    suite = synthetic.write_suite(os.path.join(args.workdir, "suite"), seed=0,
                                  num_prompts=args.prompts)
    tfds_name = tfds_builder.prepare_sft_name(f"bench{args.prompts}",
                                              {"train": [suite["sft_train"]]},
                                              os.path.join(args.workdir, "tfds"),
                                              max_len=args.seq + 1)
    tasks.register_tfds_sft_task("bench_sft", tfds_name, os.path.join(args.workdir, "tfds"))
    seqio_data = SeqioSftData("bench_sft", seq_len=args.seq, batch_size=args.batch,
                              vocabulary="bytes")
    began = time.perf_counter()
    memory_data = SftData([suite["sft_train"]], seq_len=args.seq, batch_size=args.batch,
                          vocabulary="bytes")
    tokenize_s = time.perf_counter() - began
    print(f"one core; rows {args.batch} x {args.seq}; {len(memory_data.examples)} conversations "
          f"({memory_data.stats.report()})")
    rate = tokens_per_second(seqio_data.batches(0), args.batches, args.batch, args.seq)
    print(f"{'TFDS -> seqio -> pack':<40} {rate:>12,.0f} tokens/s", flush=True)
    # SftData packs a whole epoch at its first batch: time two full epochs, packing included.
    epochs = memory_data.epoch_batches(0) + memory_data.epoch_batches(1)
    memory_data = SftData([suite["sft_train"]], seq_len=args.seq, batch_size=args.batch,
                          vocabulary="bytes")
    rate = tokens_per_second(memory_data.batches(0), epochs, args.batch, args.seq,
                             skip_first=False)
    print(f"{'JSONL -> template -> pack (2 epochs)':<40} {rate:>12,.0f} tokens/s", flush=True)
    print(f"SftData start-up (read + tokenize {len(memory_data.examples)} conversations): "
          f"{tokenize_s:.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
