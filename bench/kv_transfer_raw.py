"""KV stream vs raw NCCL p2p between two GPUs: GB/s of a 1 GiB step (Llama-3-8B KV shapes, 8192 tokens).

Raw is one 1 GiB send over the same communicator the channel uses; the stream sends the step layer by
layer through KVStreamSender/KVStreamReceiver with `layers_per_message` layers a message.

    python -m bench.kv_transfer_raw [--out bench/results/kv_transfer_raw.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from engine.kv_transfer import (
    SENDER_RANK,
    ChannelListener,
    ChannelSpec,
    KVChannel,
    KVStreamReceiver,
    KVStreamSender,
    Segment,
    open_channel,
)

LAYERS, KV_HEADS, HEAD_DIM, DTYPE, TOKENS = 32, 8, 128, torch.bfloat16, 8192
STEP_BYTES = LAYERS * 2 * TOKENS * KV_HEADS * HEAD_DIM * DTYPE.itemsize  # 1 GiB
LAYERS_PER_MESSAGE = (1, 2, 4, 8, 32)
REPS = 5  # after one warm-up


def raw_seconds(channel: KVChannel, buf: torch.Tensor, sender: bool) -> float:
    """The best time of one send of `buf` to a receive already posted, timed on the sender."""
    best = float("inf")
    go = torch.zeros(1, dtype=torch.int64)  # over the host side group: "my receive is posted"
    for _ in range(REPS + 1):
        if not sender:
            posted = channel.recv(buf)
            channel.send(go).wait(30.0)
            posted.wait(30.0)
            continue
        channel.recv(go).wait(30.0)
        torch.cuda.synchronize(channel.device)
        started = time.perf_counter()
        channel.send(buf).wait(30.0)
        best = min(best, time.perf_counter() - started)
    return best


def stream_seconds(sender: KVStreamSender, kv: torch.Tensor) -> float:
    """The best time from begin_step to everything landed (flush), timed on the sender."""
    best = float("inf")
    for step in range(REPS + 1):
        torch.cuda.synchronize(sender.channel.device)
        started = time.perf_counter()
        sender.begin_step((Segment(step, 0, TOKENS),))
        for layer in range(LAYERS):
            sender.send_layer(layer, kv[layer, 0], kv[layer, 1])
        sender.end_step()
        sender.flush()
        best = min(best, time.perf_counter() - started)
    return best


def run_sender(specs: list[ChannelSpec], results: mp.Queue) -> None:
    raw = open_channel(specs[0], SENDER_RANK, "cuda:0")
    buf = torch.empty(STEP_BYTES // DTYPE.itemsize, dtype=DTYPE, device="cuda:0")
    results.put((0, raw_seconds(raw, buf, sender=True)))
    raw.close()
    kv = torch.randn(LAYERS, 2, TOKENS, KV_HEADS, HEAD_DIM, device="cuda:0").to(DTYPE)
    for spec, lpm in zip(specs[1:], LAYERS_PER_MESSAGE, strict=True):
        sender = KVStreamSender(
            open_channel(spec, SENDER_RANK, "cuda:0"), LAYERS, KV_HEADS, HEAD_DIM, DTYPE, lpm
        )
        results.put((lpm, stream_seconds(sender, kv)))
        sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/kv_transfer_raw.json")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    listeners = [
        ChannelListener("nccl", f"bench-{i}", timeout_s=30.0) for i in range(1 + len(LAYERS_PER_MESSAGE))
    ]
    results = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=run_sender, args=([x.spec for x in listeners], results))
    process.start()
    raw = listeners[0].accept("cuda:1")
    raw_seconds(raw, torch.empty(STEP_BYTES // DTYPE.itemsize, dtype=DTYPE, device="cuda:1"), sender=False)
    _, raw_s = results.get(timeout=300)
    raw.close()
    report = {"step_bytes": STEP_BYTES, "raw_gbps": STEP_BYTES / raw_s / 1e9, "stream": []}
    print(f"raw NCCL p2p, 1 GiB: {report['raw_gbps']:.0f} GB/s")
    for listener, lpm in zip(listeners[1:], LAYERS_PER_MESSAGE, strict=True):
        failures: list[Exception] = []
        layout = (LAYERS, KV_HEADS, HEAD_DIM, DTYPE, lpm)
        channel = listener.accept("cuda:1")
        receiver = KVStreamReceiver(channel, *layout, lambda *_: None, lambda _: None, failures.append)
        receiver.start()
        got_lpm, seconds = results.get(timeout=300)
        assert got_lpm == lpm and receiver.join(60.0) and not failures, failures
        gbps = STEP_BYTES / seconds / 1e9
        report["stream"].append(
            {"layers_per_message": lpm, "gbps": gbps, "of_raw": gbps / report["raw_gbps"]}
        )
        print(
            f"stream, {lpm:2d} layer(s) a message: {gbps:.0f} GB/s ({gbps / report['raw_gbps']:.2f} of raw)"
        )
    process.join(60.0)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
