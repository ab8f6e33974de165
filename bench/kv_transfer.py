"""KV handoff between two GPUs against raw NCCL p2p in the same run: a 1 GiB step (Llama-3-8B KV shapes,
8192 tokens) through KVStreamSender/KVStreamReceiver, layer by layer, `layers_per_message` layers a message.

- raw: one 1 GiB send over the channel's communicator to a receive already posted, timed on the sender.
- stream payload: from the step header landing at the receiver (its payload receives are posted from then
  on, as raw's is before its clock starts) to the last message landing. Compared with raw: the target.
- stream end to end: from the sender's begin_step to the last message landing, the header's trip over the
  host side channel included. In serving the header goes out before layer 0 is computed, so its trip hides
  behind compute (bench/disagg_serving.py measures what stays exposed).
Both processes stamp time.perf_counter (CLOCK_MONOTONIC: one clock for the host). Best of REPS,
after a warm-up.

    python -m bench.kv_transfer
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

from bench.results import Row, format_table, write_result
from diptych.engine.kv_transfer import (
    SENDER_RANK,
    ChannelListener,
    ChannelSpec,
    KVChannel,
    KVStreamReceiver,
    KVStreamSender,
    Segment,
    StepHeader,
    open_channel,
)

LAYERS, KV_HEADS, HEAD_DIM, DTYPE, TOKENS = 32, 8, 128, torch.bfloat16, 8192
STEP_BYTES = LAYERS * 2 * TOKENS * KV_HEADS * HEAD_DIM * DTYPE.itemsize  # 1 GiB


@dataclass(frozen=True)
class Setup:
    """Where the two ends live: two GPUs over NCCL, or (--smoke, to check this script) the host, gloo."""

    backend: str = "nccl"
    sender_device: str = "cuda:0"
    receiver_device: str = "cuda:1"
    tokens: int = TOKENS

    @property
    def step_numel(self) -> int:
        return LAYERS * 2 * self.tokens * KV_HEADS * HEAD_DIM

    @property
    def step_bytes(self) -> int:
        return self.step_numel * DTYPE.itemsize


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPS = 10  # after one warm-up
TARGET = 0.90


@dataclass(frozen=True)
class StreamCase:
    layers_per_message: int
    sender_in_flight: int  # staging buffers (messages posted and not yet complete) on the sender
    lanes: int  # NCCL communicators the messages take turns on (ChannelSpec.lanes)

    @property
    def label(self) -> str:
        return f"lpm{self.layers_per_message}_inflight{self.sender_in_flight}_lanes{self.lanes}"


CASES = tuple(
    StreamCase(*case)
    for case in ((1, 2, 1), (2, 2, 1), (4, 2, 1), (8, 2, 1), (1, 4, 2), (2, 2, 2), (2, 4, 2), (4, 4, 2))
)


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
        synchronize(channel.device)
        started = time.perf_counter()
        channel.send(buf).wait(30.0)
        best = min(best, time.perf_counter() - started)
    return best


def send_steps(sender: KVStreamSender, kv: torch.Tensor) -> list[float]:
    """Sends REPS + 1 steps one after another; returns when each began (begin_step)."""
    starts = []
    for step in range(REPS + 1):
        synchronize(kv.device)
        starts.append(time.perf_counter())
        sender.begin_step((Segment(step, 0, kv.shape[2]),))
        for layer in range(LAYERS):
            sender.send_layer(layer, kv[layer, 0], kv[layer, 1])
        sender.end_step()
        sender.flush()
    return starts


class StampedReceiver(KVStreamReceiver):
    """A receiver that stamps when each step's header lands and when its last message has."""

    def __init__(self, channel: KVChannel, layers_per_message: int) -> None:
        self.failures: list[Exception] = []
        super().__init__(
            channel, LAYERS, KV_HEADS, HEAD_DIM, DTYPE, layers_per_message,
            lambda *_: None, self._landed, self.failures.append,
        )  # fmt: skip
        self.header_times: list[float] = []
        self.landed_times: list[float] = []

    def _recv_header(self) -> StepHeader | None:
        header = super()._recv_header()
        if header is not None:  # None: the sender closed the stream
            self.header_times.append(time.perf_counter())
        return header

    def _landed(self, _: StepHeader) -> None:
        self.landed_times.append(time.perf_counter())


def run_sender(setup: Setup, specs: list[ChannelSpec], results: mp.Queue) -> None:
    device = setup.sender_device
    raw = open_channel(specs[0], SENDER_RANK, device)
    buf = torch.empty(setup.step_numel, dtype=DTYPE, device=raw.device)
    results.put(raw_seconds(raw, buf, sender=True))
    raw.close()
    kv = torch.randn(LAYERS, 2, setup.tokens, KV_HEADS, HEAD_DIM, device=device).to(DTYPE)
    for spec, case in zip(specs[1:], CASES, strict=True):
        channel = open_channel(spec, SENDER_RANK, device)
        sender = KVStreamSender(
            channel, LAYERS, KV_HEADS, HEAD_DIM, DTYPE, case.layers_per_message,
            max_in_flight=case.sender_in_flight,
        )  # fmt: skip
        results.put(send_steps(sender, kv))
        sender.close()


def stream_rows(
    case: StreamCase, starts: list[float], receiver: StampedReceiver, raw_gbps: float, step_bytes: int
) -> list[Row]:
    # Step i's header landed at header_times[i] and its last message at landed_times[i]; skip the warm-up.
    landed = receiver.landed_times[1:]
    payload = min(end - head for head, end in zip(receiver.header_times[1:], landed, strict=True))
    end_to_end = min(end - start for start, end in zip(starts[1:], landed, strict=True))
    header = min(head - start for start, head in zip(starts[1:], receiver.header_times[1:], strict=True))
    payload_gbps = step_bytes / payload / 1e9
    met = "met" if payload_gbps / raw_gbps >= TARGET else "missed"
    name = f"kv_handoff_1GiB_{case.label}"
    return [
        Row(name, payload_gbps, "GB/s", raw_gbps, "stream", f"target {TARGET}: {met}"),
        Row(f"{name}_end_to_end", step_bytes / end_to_end / 1e9, "GB/s", raw_gbps, "stream"),
        Row(f"kv_step_header_{case.label}", header * 1e3, "ms", None, "stream", "begin_step to header in"),
    ]


def measure(setup: Setup) -> list[Row]:
    lanes = (1, *(case.lanes for case in CASES))
    listeners = [ChannelListener(setup.backend, f"bench-{i}", lanes=n) for i, n in enumerate(lanes)]
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=run_sender, args=(setup, [x.spec for x in listeners], results))
    process.start()
    raw = listeners[0].accept(setup.receiver_device)
    raw_seconds(raw, torch.empty(setup.step_numel, dtype=DTYPE, device=raw.device), sender=False)
    raw_gbps = setup.step_bytes / results.get(timeout=300) / 1e9
    raw.close()
    rows = [Row("nccl_p2p_1GiB", raw_gbps, "GB/s", None, "raw")]
    for listener, case in zip(listeners[1:], CASES, strict=True):
        receiver = StampedReceiver(listener.accept(setup.receiver_device), case.layers_per_message)
        receiver.start()
        starts = results.get(timeout=300)
        assert receiver.join(60.0) and not receiver.failures, receiver.failures
        assert len(receiver.landed_times) == len(starts) == REPS + 1
        rows += stream_rows(case, starts, receiver, raw_gbps, setup.step_bytes)
    process.join(60.0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="check the script on the host: gloo, 64 tokens")
    args = parser.parse_args()
    if args.smoke:
        print(format_table(measure(Setup("gloo", "cpu", "cpu", tokens=64))))
        return
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    rows = measure(Setup())
    write_result("kv_transfer", rows, {"step_bytes": STEP_BYTES, "tokens": TOKENS, "reps": REPS})


if __name__ == "__main__":
    main()
