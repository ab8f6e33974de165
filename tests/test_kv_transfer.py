"""KV transport: the header format, then real channels between two processes (gloo on CPU, NCCL on two GPUs).

The reference KV of a request is a function of (request tag, layer) only, so the receiver checks what it
reassembled against data it computes itself, never against what was sent.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
import torch

from diptych.engine.kv_transfer import (
    MAX_SEGMENTS,
    SENDER_RANK,
    ChannelListener,
    ChannelSpec,
    FinishCode,
    FirstToken,
    KVChannel,
    KVLayout,
    KVStreamReceiver,
    KVStreamSender,
    ProtocolError,
    Segment,
    StepFlags,
    StepHeader,
    TransferError,
    TransferTimeout,
    decode_header,
    encode_header,
    listen_channel,
    open_channel,
)

KV_HEADS, HEAD_DIM, DTYPE = 2, 8, torch.bfloat16
MAX_POSITIONS = 64
PROCESSES = mp.get_context("forkserver")
# Evaluated lazily (a string): the fork server imports this module, and must not touch CUDA.
TWO_GPUS = [pytest.mark.gpu, pytest.mark.skipif("torch.cuda.device_count() < 2", reason="needs two GPUs")]
BACKENDS = ["gloo", pytest.param("nccl", marks=TWO_GPUS)]
DEVICES = {"gloo": ("cpu", "cpu"), "nccl": ("cuda:0", "cuda:1")}  # (sender, receiver)


def request_kv(tag: int, layer: int, length: int) -> torch.Tensor:
    """The reference K and V of a request's first `length` tokens at one layer: [2, length, heads, dim]."""
    g = torch.Generator().manual_seed(tag * 1009 + layer)
    return torch.randn(2, MAX_POSITIONS, KV_HEADS, HEAD_DIM, generator=g).to(DTYPE)[:, :length]


def step_kv(segments: tuple[Segment, ...], layer: int) -> torch.Tensor:
    """What a prefill worker gathers for one layer of a step: each segment's rows, in segment order."""
    rows = [
        request_kv(s.request_tag, layer, s.start_position + s.num_tokens)[:, s.start_position :]
        for s in segments
    ]
    return torch.cat(rows, dim=1)


@dataclass(frozen=True)
class StepPlan:
    segments: tuple[Segment, ...]
    abort_after_first_layer: tuple[int, ...] = ()


@dataclass(frozen=True)
class Script:
    """What a sender process does on its channel."""

    steps: tuple[StepPlan, ...]
    num_layers: int
    layers_per_message: int
    idle_before_s: float = 0.0
    halt_at: tuple[int, int] | None = None  # (step, layer): after sending it, the process halts
    halt_signal: int = signal.SIGKILL


def run_sender(spec: ChannelSpec, script: Script) -> None:
    torch.set_num_threads(1)
    device = DEVICES[spec.backend][0]
    channel = open_channel(spec, SENDER_RANK, device)
    sender = KVStreamSender(channel, script.num_layers, KV_HEADS, HEAD_DIM, DTYPE, script.layers_per_message)
    time.sleep(script.idle_before_s)
    for i, plan in enumerate(script.steps):
        sender.begin_step(plan.segments)
        for layer in range(script.num_layers):
            kv = step_kv(plan.segments, layer).to(device)
            sender.send_layer(layer, kv[0], kv[1])
            if layer == 0:
                for tag in plan.abort_after_first_layer:
                    sender.abort(tag)
            if script.halt_at == (i, layer):
                sender.flush()
                os.kill(os.getpid(), script.halt_signal)
        sender.end_step()
    sender.close()


class Collector:
    """A receiver's consumer: keeps every delivered row per request tag and layer."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.rows: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # tag -> (layer, position, kv [2, n])
        self.headers: list[StepHeader] = []
        self.error: Exception | None = None
        self.error_time = 0.0
        self.last_payload_time = 0.0
        self.failed = threading.Event()

    def on_layers(self, header: StepHeader, a: int, b: int, payload: torch.Tensor) -> None:
        assert payload.shape == (b - a, 2, header.num_tokens, KV_HEADS, HEAD_DIM)
        for segment, rows in header.rows():
            for layer in range(a, b):
                chunk = payload[layer - a, :, rows].to("cpu", copy=True)
                self.rows.setdefault(segment.request_tag, []).append((layer, segment.start_position, chunk))
        self.last_payload_time = time.monotonic()

    def on_step(self, header: StepHeader) -> None:
        self.headers.append(header)

    def on_error(self, error: Exception) -> None:
        self.error, self.error_time = error, time.monotonic()
        self.failed.set()

    def assembled(self, tag: int) -> torch.Tensor:
        """All rows of `tag` in place, [layers, 2, length, heads, dim]; checks each position came once."""
        length = max(pos + kv.shape[1] for _, pos, kv in self.rows[tag])
        out = torch.zeros(self.num_layers, 2, length, KV_HEADS, HEAD_DIM, dtype=DTYPE)
        seen = torch.zeros(self.num_layers, length, dtype=torch.int32)
        for layer, pos, kv in self.rows[tag]:
            out[layer, :, pos : pos + kv.shape[1]] = kv
            seen[layer, pos : pos + kv.shape[1]] += 1
        assert bool((seen == 1).all()), f"request {tag}: positions missing or delivered twice"
        return out


def reference(tag: int, num_layers: int, length: int) -> torch.Tensor:
    return torch.stack([request_kv(tag, layer, length) for layer in range(num_layers)])


@dataclass
class Pair:
    receiver: KVStreamReceiver
    collector: Collector
    process: mp.process.BaseProcess

    def wait_steps(self, n: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.collector.headers) < n and not self.collector.failed.is_set():
            assert time.monotonic() < deadline, f"only {len(self.collector.headers)} of {n} steps arrived"
            time.sleep(0.01)
        assert self.collector.error is None, self.collector.error


@contextlib.contextmanager
def pair(
    script: Script, name: str, timeout_s: float = 5.0, backend: str = "gloo", lanes: int = 1
) -> Iterator[Pair]:
    """A sender process running `script` and a receiver in this process, torn down whatever happens."""
    listener = ChannelListener(backend, name, timeout_s=timeout_s, connect_timeout_s=60.0, lanes=lanes)
    # Sender processes fork from a server that imported torch once: a fresh interpreter per process costs
    # seconds on a busy 2-core host, and forking this (threaded) test process would not be safe.
    PROCESSES.set_forkserver_preload([__name__])
    process = PROCESSES.Process(target=run_sender, args=(listener.spec, script), daemon=True)
    process.start()
    receiver = None
    try:
        channel = listener.accept(DEVICES[backend][1])
        collector = Collector(script.num_layers)
        layout = (script.num_layers, KV_HEADS, HEAD_DIM, DTYPE, script.layers_per_message)
        receiver = KVStreamReceiver(
            channel, *layout, collector.on_layers, collector.on_step, collector.on_error
        )
        receiver.start()
        yield Pair(receiver, collector, process)
    finally:
        if receiver is not None:
            receiver.stop()
        if process.is_alive():
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


def check_exact(collector: Collector, lengths: dict[int, int]) -> None:
    assert set(collector.rows) == set(lengths)
    for tag, length in lengths.items():
        assert torch.equal(collector.assembled(tag), reference(tag, collector.num_layers, length)), tag


# Three steps of several requests each, at different lengths; a request spans steps (chunked prefill).
STEPS = (
    StepPlan((Segment(11, 0, 7), Segment(12, 0, 3), Segment(13, 0, 12))),
    StepPlan((Segment(11, 7, 3), Segment(13, 12, 1), Segment(14, 0, 5))),
    StepPlan((Segment(12, 3, 17),)),
)
LENGTHS = {11: 10, 12: 20, 13: 13, 14: 5}


def test_header_round_trip_and_checks() -> None:
    layout = KVLayout(num_layers=5, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE, layers_per_message=3)
    g = torch.Generator().manual_seed(0)
    segments = tuple(
        Segment(int(t), int(p), int(n))
        for t, p, n in zip(
            torch.randint(-(2**62), 2**62, (40,), generator=g),
            torch.randint(0, 10**6, (40,), generator=g),
            torch.randint(1, 10**4, (40,), generator=g),
            strict=True,
        )
    )
    header = StepHeader(7, segments, aborted=(5, -3, 2**40), flags=StepFlags.NONE, layer_start=0, layer_end=5)
    words = encode_header(header, layout)
    assert words.dtype == torch.int64 and words.numel() * 8 == 8192
    assert decode_header(words, layout) == header
    assert header.num_tokens == sum(s.num_tokens for s in segments)
    assert [r for _, r in header.rows()][1] == slice(
        segments[0].num_tokens, sum(s.num_tokens for s in segments[:2])
    )
    assert layout.groups() == [(0, 3), (3, 5)] and layout.group_of(4) == (3, 5)

    other = KVLayout(
        num_layers=5, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float16, layers_per_message=3
    )
    with pytest.raises(ProtocolError, match="disagree on the KV layout"):
        decode_header(words, other)
    with pytest.raises(ProtocolError, match="not a KV step header"):
        decode_header(torch.zeros_like(words), layout)
    too_many = tuple(Segment(i, 0, 1) for i in range(MAX_SEGMENTS + 1))
    with pytest.raises(ValueError, match="do not fit"):
        encode_header(StepHeader(0, too_many), layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers_per_message", [1, 3])
def test_steps_arrive_exact_per_request(backend: str, layers_per_message: int) -> None:
    script = Script(STEPS, num_layers=5, layers_per_message=layers_per_message)
    with pair(script, f"exact-{layers_per_message}", backend=backend) as p:
        p.wait_steps(len(STEPS))
        assert p.receiver.join(10.0), "the sender's close should end the receiver"
        assert p.collector.error is None
    assert [h.step_id for h in p.collector.headers] == [0, 1, 2]
    assert [h.segments for h in p.collector.headers] == [s.segments for s in STEPS]
    check_exact(p.collector, LENGTHS)


@pytest.mark.parametrize("layers_per_message", [pytest.param(n, marks=TWO_GPUS) for n in (1, 2)])
def test_messages_alternating_over_two_nccl_lanes_arrive_exact(layers_per_message: int) -> None:
    # 5 layers: an odd number of messages a step (1 layer each), so consecutive steps start on either lane.
    script = Script(STEPS, num_layers=5, layers_per_message=layers_per_message)
    with pair(script, f"lanes-{layers_per_message}", backend="nccl", lanes=2) as p:
        p.wait_steps(len(STEPS))
        assert p.receiver.join(10.0), "the sender's close should end the receiver"
    check_exact(p.collector, LENGTHS)


def test_abort_mid_stream_keeps_the_channel_in_step() -> None:
    # Request 21 is aborted after the first layer of step 0: that step is still sent in full, the next
    # header announces the abort, and a later request's data is still exact. The sender first idles for
    # longer than the timeout: an idle channel must not time out.
    steps = (
        StepPlan((Segment(21, 0, 6), Segment(22, 0, 4)), abort_after_first_layer=(21,)),
        StepPlan((Segment(22, 4, 5), Segment(23, 0, 3))),
        StepPlan((Segment(23, 3, 5),)),
    )
    script = Script(steps, num_layers=4, layers_per_message=3, idle_before_s=1.5)
    with pair(script, "abort", timeout_s=0.5) as p:
        p.wait_steps(3)
    assert [h.aborted for h in p.collector.headers] == [(), (21,), ()]
    check_exact(p.collector, {21: 6, 22: 9, 23: 8})


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_sender_fails_the_receiver_cleanly(backend: str) -> None:
    # gloo notices the lost connection at once; NCCL cannot, so there the receiver times out.
    timeout_s = 1.5
    script = Script(STEPS, num_layers=5, layers_per_message=1, halt_at=(1, 2))
    with pair(script, "killed", timeout_s=timeout_s, backend=backend) as p:
        p.process.join(30.0)
        died = time.monotonic()
        assert p.process.exitcode == -signal.SIGKILL
        assert p.collector.failed.wait(timeout_s + 2.0), "on_error was not called in time"
        assert p.receiver.join(2.0)
    error = p.collector.error
    assert isinstance(error, TransferError) and "'killed'" in str(error), error
    assert p.collector.error_time - died <= timeout_s + 2.0
    assert [h.step_id for h in p.collector.headers] == [0]  # step 0 landed in full, step 1 never completed


@pytest.mark.parametrize("backend", BACKENDS)
def test_stalled_sender_times_out(backend: str) -> None:
    timeout_s = 1.0
    script = Script(STEPS, num_layers=5, layers_per_message=1, halt_at=(1, 2), halt_signal=signal.SIGSTOP)
    with pair(script, "stalled", timeout_s=timeout_s, backend=backend) as p:
        assert p.collector.failed.wait(30.0), "on_error was not called"
        waited = p.collector.error_time - p.collector.last_payload_time
        assert p.receiver.join(2.0)
        p.process.kill()
    error = p.collector.error
    assert isinstance(error, TransferTimeout) and "'stalled'" in str(error) and "within 1 s" in str(error), (
        error
    )
    assert 0.9 * timeout_s <= waited <= timeout_s + 2.0
    assert p.receiver.channel.broken


def test_two_pairs_into_one_receiver_process_do_not_interfere() -> None:
    # Both senders run at once, with different layer counts and message grouping, and other request tags.
    other = tuple(
        StepPlan(tuple(Segment(s.request_tag + 100, s.start_position, s.num_tokens) for s in plan.segments))
        for plan in STEPS
    )
    with pair(Script(STEPS, 5, 1), "pair-a") as a, pair(Script(other, 6, 4), "pair-b") as b:
        a.wait_steps(3)
        b.wait_steps(3)
    check_exact(a.collector, LENGTHS)
    check_exact(b.collector, {tag + 100: n for tag, n in LENGTHS.items()})


@dataclass
class LocalPair:
    sender: KVStreamSender
    receiver: KVStreamReceiver
    collector: Collector

    def send_step(self, segments: tuple[Segment, ...], aborted: tuple[int, ...] = ()) -> None:
        self.sender.begin_step(segments, aborted)
        for layer in range(self.collector.num_layers if segments else 0):
            kv = step_kv(segments, layer)
            self.sender.send_layer(layer, kv[0], kv[1])
        self.sender.end_step()

    def wait_steps(self, n: int) -> None:
        deadline = time.monotonic() + 5.0
        while len(self.collector.headers) < n:
            assert time.monotonic() < deadline and self.collector.error is None, self.collector.error
            time.sleep(0.005)


def local_pair(name: str, num_layers: int = 2, layers_per_message: int = 1) -> LocalPair:
    """Both ends in this process (the sender connects from a helper thread): cheap, and all threads count."""
    listener = ChannelListener("gloo", name, timeout_s=2.0)
    opened: list[KVChannel] = []
    connect = threading.Thread(target=lambda: opened.append(open_channel(listener.spec, SENDER_RANK, "cpu")))
    connect.start()
    collector = Collector(num_layers)
    layout = (num_layers, KV_HEADS, HEAD_DIM, DTYPE, layers_per_message)
    receiver = KVStreamReceiver(
        listener.accept("cpu"), *layout, collector.on_layers, collector.on_step, collector.on_error
    )
    connect.join()
    receiver.start()
    return LocalPair(KVStreamSender(opened[0], *layout), receiver, collector)


def thread_counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/task"))


def test_an_idle_channel_outlives_its_connect_timeout() -> None:
    # The idle wait for the next step header has no deadline: a deployment with no traffic for longer than
    # connect_timeout_s (which bounds only the rendezvous) must keep its channels.
    listener = ChannelListener("gloo", "idle", timeout_s=1.0, connect_timeout_s=1.0)
    opened: list[KVChannel] = []
    joining = threading.Thread(target=lambda: opened.append(open_channel(listener.spec, SENDER_RANK, "cpu")))
    joining.start()
    receiver = listener.accept("cpu")
    joining.join()
    sender = opened[0]
    try:
        buf = torch.zeros(4)
        posted = receiver.recv(buf)

        def send_late() -> None:
            time.sleep(2.5)  # the receiver waits idle for 2.5 connect timeouts
            sender.send(torch.arange(4.0)).wait(5.0)

        late = threading.Thread(target=send_late)
        late.start()
        posted.wait(None)
        late.join()
        assert torch.equal(buf, torch.arange(4.0))
    finally:
        sender.close()
        receiver.close()


def test_open_close_repeatedly_leaks_no_threads() -> None:
    # Odd rounds stop the receiver while it is blocked on the next header; even ones close from the sender.
    # Python threads must come back exactly; native threads (torch and gloo start some lazily, once) must
    # not grow from round to round after the first two: a leak would add at least one a round.
    counts = []
    for round_ in range(8):
        p = local_pair(f"leak-{round_}")
        p.send_step((Segment(round_, 0, 3),))
        p.sender.flush()
        p.wait_steps(1)
        if round_ % 2:
            time.sleep(0.05)  # the receiver is blocked on the next header by now
            started = time.monotonic()
            p.receiver.stop()
            assert not p.receiver.running and time.monotonic() - started < 1.0
            p.sender.close(timeout_s=2.0)  # the receiver is gone: whatever this learns, it must not raise
        else:
            assert p.sender.close()
            assert p.receiver.join(5.0)
        assert p.collector.error is None and p.sender.channel.closed and p.receiver.channel.closed
        check_exact(p.collector, {round_: 3})
        del p
        counts.append(thread_counts())
    python_threads = {c[0] for c in counts}
    assert len(python_threads) == 1, counts
    native_after_warmup = [c[1] for c in counts[2:]]
    assert max(native_after_warmup) - native_after_warmup[0] <= 1, counts


def test_sender_checks_its_use_and_carries_abort_only_steps() -> None:
    p = local_pair("misuse", num_layers=3, layers_per_message=2)
    try:
        kv = step_kv((Segment(1, 0, 4),), 0)
        with pytest.raises(RuntimeError, match="no step is open"):
            p.sender.send_layer(0, kv[0], kv[1])
        p.sender.begin_step((Segment(1, 0, 4),))
        with pytest.raises(RuntimeError, match="still open"):
            p.sender.begin_step(())
        with pytest.raises(ValueError, match="expected layer 0, got 1"):
            p.sender.send_layer(1, kv[0], kv[1])
        with pytest.raises(ValueError, match="K and V must be"):
            p.sender.send_layer(0, kv[0, :3], kv[1, :3])
        p.sender.send_layer(0, kv[0], kv[1])
        with pytest.raises(RuntimeError, match="ended after 1 of 3 layers"):
            p.sender.end_step()
        for layer in (1, 2):
            kv = step_kv((Segment(1, 0, 4),), layer)
            p.sender.send_layer(layer, kv[0], kv[1])
        p.sender.end_step()
        with pytest.raises(ValueError, match="aborted"):
            p.sender.begin_step((Segment(1, 4, 1),), aborted=(1,))
        p.send_step((), aborted=(1,))  # an abort with no KV: a header alone
        p.send_step((Segment(2, 0, 5),))
        p.wait_steps(3)
        assert [(h.num_tokens, h.aborted) for h in p.collector.headers] == [(4, ()), (0, (1,)), (5, ())]
        check_exact(p.collector, {1: 4, 2: 5})
    finally:
        p.sender.close()
        p.receiver.stop()


def test_two_layer_bands_fill_one_request_and_first_tokens_ride_the_stream() -> None:
    """Two senders (pipeline stages) each stream their own band of layers of the same request into one
    receiver layout, and a payload-free header hands over the first token (with its finish and timings)."""
    stage0, stage1 = (
        local_pair("band-0", num_layers=5, layers_per_message=2),
        local_pair("band-1", num_layers=5, layers_per_message=2),
    )
    try:
        for p, band in ((stage0, (0, 3)), (stage1, (3, 5))):
            p.sender = KVStreamSender(p.sender.channel, 5, KV_HEADS, HEAD_DIM, DTYPE, 2, layers=band)
            seg = (Segment(7, 0, 6),)
            p.sender.begin_step(seg)
            with pytest.raises(ValueError, match=f"expected layer {band[0]}"):
                p.sender.send_layer(band[0] + 1, *step_kv(seg, 0))
            for layer in range(*band):
                kv = step_kv(seg, layer)
                p.sender.send_layer(layer, kv[0], kv[1])
            p.sender.end_step()
        first = FirstToken(7, 42, -0.25, FinishCode.LENGTH, sampled_time=1.5e9, queue_s=0.125)
        stage1.sender.send_first_tokens([first])
        stage0.wait_steps(1)
        stage1.wait_steps(2)
        h0, h1 = stage0.collector.headers[0], stage1.collector.headers[0]
        assert (h0.layer_start, h0.layer_end, h1.layer_start, h1.layer_end) == (0, 3, 3, 5)
        rows = {layer: kv for c in (stage0.collector, stage1.collector) for layer, _, kv in c.rows[7]}
        assert sorted(rows) == [0, 1, 2, 3, 4]
        for layer, kv in rows.items():
            assert torch.equal(kv, request_kv(7, layer, 6)), layer
        tokens = stage1.collector.headers[1]
        assert tokens.segments == () and tokens.first_tokens == (first,)
        no_logprob = replace(first, logprob=None, finish=FinishCode.NONE)
        layout = KVLayout(5, KV_HEADS, HEAD_DIM, DTYPE, 2)
        header = StepHeader(3, (), first_tokens=(no_logprob,) * 100)
        assert decode_header(encode_header(header, layout), layout) == header
        with pytest.raises(ValueError, match="not inside"):
            KVStreamSender(stage0.sender.channel, 5, KV_HEADS, HEAD_DIM, DTYPE, 2, layers=(3, 6))
    finally:
        for p in (stage0, stage1):
            p.sender.close()
            p.receiver.stop()


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        ChannelSpec("gloo", "127.0.0.1", 0, "x")
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        ChannelSpec("nccl", "127.0.0.1", 1, "x", lanes=0)
    with pytest.raises(ValueError, match="unknown KV transport 'tcp'"):
        open_channel(ChannelSpec("tcp", "127.0.0.1", 1, "x"), SENDER_RANK, "cpu")
    spec, accept = listen_channel("nccl", "bad-device", 1.0, "cpu")
    assert spec.backend == "nccl" and spec.port > 0 and spec.timeout_s == 1.0
    with pytest.raises(ValueError, match="NCCL carries CUDA tensors"):
        accept()


# Llama-3-8B KV shapes (layers, KV heads, head dim, dtype); 8192 tokens make a 1 GiB step.
BULK = (32, 8, 128, torch.bfloat16)
BULK_TOKENS, BULK_STEPS = 8192, 3


def run_bulk_sender(spec: ChannelSpec, layers_per_message: int, results: mp.Queue) -> None:
    channel = open_channel(spec, SENDER_RANK, "cuda:0")
    sender = KVStreamSender(channel, *BULK, layers_per_message=layers_per_message)
    layers, heads, dim, dtype = BULK
    kv = torch.randn(layers, 2, BULK_TOKENS, heads, dim, device="cuda:0").to(dtype)
    for step in range(BULK_STEPS):  # the first one warms up
        torch.cuda.synchronize()
        started = time.perf_counter()
        sender.begin_step((Segment(step, 0, BULK_TOKENS),))
        for layer in range(layers):
            sender.send_layer(layer, kv[layer, 0], kv[layer, 1])
        sender.end_step()
        sender.flush()
        results.put(time.perf_counter() - started)
    sender.close()


@pytest.mark.parametrize("layers_per_message", [pytest.param(n, marks=TWO_GPUS) for n in (1, 4)])
def test_nccl_throughput(layers_per_message: int) -> None:
    listener = ChannelListener("nccl", f"bulk-{layers_per_message}", timeout_s=30.0)
    results = PROCESSES.Queue()
    PROCESSES.set_forkserver_preload([__name__])
    process = PROCESSES.Process(target=run_bulk_sender, args=(listener.spec, layers_per_message, results))
    process.start()
    received: list[int] = []
    failed: list[Exception] = []
    receiver = KVStreamReceiver(
        listener.accept("cuda:1"),
        *BULK,
        layers_per_message,
        on_layers=lambda header, a, b, payload: received.append(payload.nbytes),
        on_step=lambda header: None,
        on_error=failed.append,
    )
    receiver.start()
    times = [results.get(timeout=120) for _ in range(BULK_STEPS)]
    assert receiver.join(30.0) and not failed, failed
    process.join(30)
    layers, heads, dim, dtype = BULK
    step_bytes = layers * 2 * BULK_TOKENS * heads * dim * dtype.itemsize
    assert sum(received) == BULK_STEPS * step_bytes
    best = min(times[1:])
    rate = step_bytes / best / 1e9
    print(f"\nKV stream over NCCL, 1 GiB step, {layers_per_message} layer(s) a message: {rate:.0f} GB/s")
