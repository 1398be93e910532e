"""The gloo transport under our vLLM weight-transfer engine (learner/weight_sync.py): the bucket
plan by hand, a bit-exact transfer between real processes, and the timeouts that must fail a
sync instead of hanging it. (The engine driven through vLLM's API: tests/test_weight_transfer.py.)

Every rank runs in its own process (no Ray); the test process only collects results
through pipes and kills any child that outlives its deadline, so a hang shows up as a failed
test, never as a stuck suite.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import socket
import time
import traceback

import pytest
import torch

from learner.weight_sync import Bucket, ParamSpec, plan_buckets, param_specs

MiB = 2**20
TIMEOUT_S = 3.0
# A child may wait for the forkserver's one torch import before it reaches the code under test.
START_S = 60.0


# ----------------------------------------------------------------------------------------
# plan_buckets / param_specs: hand-checked plans


def _f32(name: str, mib: float) -> ParamSpec:
    return ParamSpec(name, (int(mib * MiB) // 4,), "float32")


def _names(buckets: list[Bucket]) -> list[list[str]]:
    return [[p.name for p in b.params] for b in buckets]


def test_plan_buckets_fills_up_to_the_limit_then_starts_a_new_bucket():
    a, b, c = _f32("a", 1), _f32("b", 1), _f32("c", 3)
    buckets = plan_buckets([a, b, c], bucket_mb=2)
    # a + b is exactly 2 MiB: still fits; c (3 MiB) is larger than a bucket and gets its own.
    assert _names(buckets) == [["a", "b"], ["c"]]
    assert [b.dtype for b in buckets] == ["float32", "float32"]
    assert [bk.numel for bk in buckets] == [2 * MiB // 4, 3 * MiB // 4]


def test_plan_buckets_oversized_parameter_does_not_absorb_its_neighbours():
    buckets = plan_buckets([_f32("s1", 0.5), _f32("big", 3), _f32("s2", 0.5)], bucket_mb=2)
    assert _names(buckets) == [["s1"], ["big"], ["s2"]]


def test_plan_buckets_dtype_change_starts_a_new_bucket():
    specs = [
        ParamSpec("a", (4,), "float32"),
        ParamSpec("b", (2, 3), "bfloat16"),
        ParamSpec("c", (5,), "bfloat16"),
        ParamSpec("d", (7,), "float32"),
    ]
    buckets = plan_buckets(specs, bucket_mb=64)  # size never binds: only the dtype splits
    assert _names(buckets) == [["a"], ["b", "c"], ["d"]]
    assert [b.dtype for b in buckets] == ["float32", "bfloat16", "float32"]
    assert [b.numel for b in buckets] == [4, 11, 7]


def test_plan_buckets_counts_bytes_of_the_dtype_not_elements():
    n = MiB  # 1 Mi elements: 2 MiB in bf16, 4 MiB in fp32
    bf16 = [ParamSpec("x", (n,), "bfloat16"), ParamSpec("y", (n,), "bfloat16")]
    f32 = [ParamSpec("x", (n,), "float32"), ParamSpec("y", (n,), "float32")]
    assert _names(plan_buckets(bf16, bucket_mb=4)) == [["x", "y"]]
    assert _names(plan_buckets(f32, bucket_mb=4)) == [["x"], ["y"]]


def test_param_specs_record_name_shape_and_dtype_in_order():
    named = [("w", torch.zeros(3, 4)), ("b", torch.zeros(4, dtype=torch.bfloat16)), ("s", torch.zeros(()))]
    assert param_specs(named) == [
        ParamSpec("w", (3, 4), "float32"),
        ParamSpec("b", (4,), "bfloat16"),
        ParamSpec("s", (), "float32"),
    ]


# ----------------------------------------------------------------------------------------
# Process helpers (module-level functions: children look them up by name in this module, which
# therefore imports nothing heavier than torch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A model-like dict: mixed dtypes (so dtype changes split buckets), a scalar and a
    non-contiguous view (the sender must flatten it in logical order)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(24, 40, generator=g)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layer.0.q.weight": torch.randn(32, 32, generator=g),
        "layer.0.norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "layer.0.mlp.weight": torch.randn(48, 32, generator=g).to(torch.bfloat16),
        "layer.1.k.weight": base.t(),  # 40×24, non-contiguous
        "layer.1.scale": torch.randn((), generator=g),
        "lm_head.weight": torch.randn(100, 32, generator=g),
    }


def _report(conn, fn, *args) -> None:
    """Run ``fn`` and send ("ok", value, elapsed) or ("raised", type name, message, elapsed)."""
    t0 = time.perf_counter()
    try:
        value = fn(*args)
        conn.send(("ok", value, time.perf_counter() - t0))
    except BaseException as e:  # noqa: BLE001 - the parent asserts on what was raised
        conn.send(("raised", type(e).__name__, f"{e}\n{traceback.format_exc()}", time.perf_counter() - t0))
    finally:
        conn.close()


def _group(port: int, rank: int, world: int):
    from learner.weight_sync import WeightSyncGroup

    return WeightSyncGroup(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world,
                           timeout_s=TIMEOUT_S)


def _sender_main(conn, port: int, world: int, seed: int, bucket_mb: float) -> None:
    def run():
        g = _group(port, 0, world)
        tensors = _make_tensors(seed)
        return g.send(plan_buckets(param_specs(tensors.items()), bucket_mb), iter(tensors.items()))

    _report(conn, run)


def _receiver_main(conn, port: int, rank: int, world: int, seed: int, bucket_mb: float) -> None:
    def run():
        g = _group(port, rank, world)
        # The plan is agreed at set-up from the specs alone (the receiver never sees the values).
        buckets = plan_buckets(param_specs(_make_tensors(seed).items()), bucket_mb)
        got = {name: t.clone() for views in g.receive(buckets) for name, t in views}
        buf = io.BytesIO()
        torch.save(got, buf)  # bf16 survives, bit for bit
        return buf.getvalue()

    _report(conn, run)


def _silent_peer_main(port: int, rank: int, world: int) -> None:
    """Joins the group, then never takes part in a collective."""
    group = _group(port, rank, world)  # kept alive: a collected group closes its sockets (peer "died")
    time.sleep(120)  # the fixture kills it long before
    del group


def _store_only_peer_main(port: int, world: int) -> None:
    """Reaches the rendezvous store but never creates its process group (crashed or stuck in between)."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    time.sleep(120)  # the fixture kills it long before
    del store


def _join_main(conn, port: int, rank: int, world: int) -> None:
    """Only joins the group (no peer is expected to complete it)."""
    _report(conn, _group, port, rank, world)


def _construct_then_send_main(conn, port: int, world: int) -> None:
    """Rank 0 joins (untimed), then times only the send to a peer that never receives."""
    try:
        g = _group(port, 0, world)
    except BaseException as e:  # noqa: BLE001
        conn.send(("setup_failed", type(e).__name__, str(e), 0.0))
        conn.close()
        return
    tensors = {"w": torch.randn(1000)}
    _report(conn, g.send, plan_buckets(param_specs(tensors.items()), 64), iter(tensors.items()))


def _construct_then_receive_main(conn, port: int, rank: int, world: int) -> None:
    try:
        g = _group(port, rank, world)
    except BaseException as e:  # noqa: BLE001
        conn.send(("setup_failed", type(e).__name__, str(e), 0.0))
        conn.close()
        return
    buckets = plan_buckets([ParamSpec("w", (1000,), "float32")], 64)
    _report(conn, lambda: [t.clone() for views in g.receive(buckets) for _, t in views])


class _Procs:
    """Child processes with result pipes; everything still alive at the end is killed.

    Children come from a forkserver that imported torch and this module once: each is a fresh
    fork of a process with no threads and no process group (as safe as spawn), without paying
    for a torch import per child."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", __name__])
        self.procs: list[mp.Process] = []

    def start(self, target, *args, result: bool = True):
        rx = None
        if result:
            rx, tx = self.ctx.Pipe(duplex=False)
            args = (tx, *args)
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        if result:
            tx.close()  # the child holds the only write end: EOF if it dies without reporting
        self.procs.append(p)
        return rx

    @staticmethod
    def result(rx, deadline_s: float, what: str):
        if not rx.poll(deadline_s):
            pytest.fail(f"{what}: no result within {deadline_s:.0f}s (hung)")
        try:
            return rx.recv()
        except EOFError:
            pytest.fail(f"{what}: the process died without reporting")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)


@pytest.fixture
def procs():
    ps = _Procs()
    yield ps
    ps.kill_all()


# ----------------------------------------------------------------------------------------
# Transfer


def test_broadcast_moves_every_tensor_bit_exactly_to_two_receivers_over_several_buckets(procs):
    seed, bucket_mb, world = 7, 0.01, 3  # 10 KiB buckets: the dict needs several
    expected = _make_tensors(seed)
    buckets = plan_buckets(param_specs(expected.items()), bucket_mb)
    assert len(buckets) >= 4 and len({b.dtype for b in buckets}) == 2  # premise: a multi-bucket, mixed plan

    port = _free_port()
    send_rx = procs.start(_sender_main, port, world, seed, bucket_mb)
    recv_rx = [procs.start(_receiver_main, port, r, world, seed, bucket_mb) for r in (1, 2)]

    status, sent, _ = _Procs.result(send_rx, START_S, "sender")
    assert status == "ok", sent
    assert sent == sum(t.numel() * t.element_size() for t in expected.values())
    for r, rx in zip((1, 2), recv_rx):
        status, payload, _ = _Procs.result(rx, START_S, f"receiver {r}")
        assert status == "ok", payload
        got = torch.load(io.BytesIO(payload))
        assert list(got) == list(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(got[name], t), f"receiver {r}: {name} differs"


# ----------------------------------------------------------------------------------------
# Timeouts: an absent or silent peer fails the sync, naming it, in about timeout_s


def _assert_weight_sync_timeout(res, what: str) -> None:
    status, kind, msg, elapsed = res
    assert status == "raised", f"{what}: expected WeightSyncTimeout, got {status} {kind} {msg}"
    assert kind == "WeightSyncTimeout", f"{what}: raised {kind}, not WeightSyncTimeout: {msg}"
    assert "weight sync" in msg.splitlines()[0], msg
    # It waited out the deadline (a live but silent peer, not a fast connection error) and no longer.
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 10, f"{what}: took {elapsed:.1f}s with timeout_s={TIMEOUT_S}"


def test_send_to_a_peer_that_never_receives_raises_weight_sync_timeout(procs):
    port = _free_port()
    procs.start(_silent_peer_main, port, 1, 2, result=False)
    rx = procs.start(_construct_then_send_main, port, 2)
    res = _Procs.result(rx, START_S + TIMEOUT_S + 10, "send to a silent peer")
    assert res[0] != "setup_failed", f"the silent peer should have joined: {res}"
    _assert_weight_sync_timeout(res, "send to a silent peer")
    assert "broadcast of bucket 0/1" in res[2]


def test_receive_from_a_learner_that_never_sends_raises_weight_sync_timeout(procs):
    port = _free_port()
    procs.start(_silent_peer_main, port, 0, 2, result=False)
    rx = procs.start(_construct_then_receive_main, port, 1, 2)
    res = _Procs.result(rx, START_S + TIMEOUT_S + 10, "receive from a silent learner")
    assert res[0] != "setup_failed", f"the silent learner should have joined: {res}"
    _assert_weight_sync_timeout(res, "receive from a silent learner")
    assert "receive of bucket 0/1" in res[2]


def test_learner_group_setup_fails_in_time_when_no_sampler_ever_joins(procs):
    rx = procs.start(_join_main, _free_port(), 0, 2)
    _assert_weight_sync_timeout(_Procs.result(rx, START_S + TIMEOUT_S + 10, "rank 0 alone"), "rank 0 alone")


def test_sampler_group_setup_fails_in_time_when_the_learner_never_starts(procs):
    rx = procs.start(_join_main, _free_port(), 1, 2)
    _assert_weight_sync_timeout(_Procs.result(rx, START_S + TIMEOUT_S + 10, "rank 1 alone"), "rank 1 alone")


def test_learner_group_setup_names_weight_sync_when_a_peer_joins_the_store_but_not_the_group(procs):
    port = _free_port()
    procs.start(_store_only_peer_main, port, 2, result=False)
    rx = procs.start(_join_main, port, 0, 2)
    _assert_weight_sync_timeout(_Procs.result(rx, START_S + TIMEOUT_S + 10, "half-joined peer"), "half-joined peer")
