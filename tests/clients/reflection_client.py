"""A client that knows no .proto: it learns tern.v1 from the server by reflection (grpcio-reflection
speaks v1alpha), with gRPC's default settings (a 4 MiB receive limit), and reads large records
by Fetch, Subscribe and both kinds of Consume.

usage: reflection_client.py ADDR[,ADDR...]   (publishes through the first, reads through the last)
"""
import queue
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

addrs = sys.argv[1].split(",")
DEFAULT_LIMIT = 4 * 1024 * 1024
RECORD_MAX = 4 * 1024 * 1024 - 128 * 1024
channels = [grpc.insecure_channel(a) for a in addrs]  # gRPC's defaults, nothing raised
pub_ch, read_ch = channels[0], channels[-1]


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


# Reflection, v1alpha: the public services are listed, the node-to-node one is not.
db = ProtoReflectionDescriptorDatabase(read_ch)
services = set(db.get_services())
for want in ["tern.v1.Tern", "broker.Broker", "grpc.health.v1.Health"]:
    if want not in services:
        fail(f"reflection does not list {want}: {sorted(services)}")
hidden = [s for s in services if s.startswith("tern.internal")]
if hidden:
    fail(f"reflection lists the node-to-node protocol: {hidden}")
print(f"reflection v1alpha lists {sorted(services)}")
pool = descriptor_pool.DescriptorPool(db)


def M(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tern.v1.{name}"))


def unary(ch, method, resp):
    return ch.unary_unary(
        f"/tern.v1.Tern/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=M(resp).FromString,
    )


def streaming(ch, method, resp):
    return ch.stream_stream(
        f"/tern.v1.Tern/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=M(resp).FromString,
    )


topic = f"big-{int(time.time() * 1000)}"
create = unary(pub_ch, "CreateTopic", "CreateTopicResponse")
try:
    create(M("CreateTopicRequest")(name=topic + "-x", partitions=1,
                                   config=M("TopicConfig")(max_record_bytes=DEFAULT_LIMIT)),
           timeout=30)
    fail("a topic whose records could not be read by a default client was created")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
        fail(f"max_record_bytes 4 MiB: {e.code()} {e.details()}")
create(M("CreateTopicRequest")(name=topic, partitions=1,
                               config=M("TopicConfig")(max_record_bytes=RECORD_MAX)), timeout=30)

# What is published: one record near the maximum; 12 of 1 MB in one request (one stored
# batch of 12 MB); 3 of 3 MB in one request; 200 small ones.
sizes = [RECORD_MAX - 1] + [1_000_000] * 12 + [3_000_000] * 3 + [100] * 200
requests = [[0], list(range(1, 13)), list(range(13, 16)), list(range(16, 216))]


def value(i):
    return bytes([i % 251]) * sizes[i]


publish = unary(pub_ch, "Publish", "PublishResponse")
for idx in requests:
    records = [M("PublishRecord")(key=b"k", value=value(i)) for i in idx]
    r = publish(M("PublishRequest")(topic=topic, records=records), timeout=60)
    if len(r.acks) != len(idx):
        fail(f"{len(r.acks)} acks for {len(idx)} records")
N = len(sizes)
print(f"published {N} records ({sum(sizes) / 1e6:.1f} MB) in {len(requests)} requests")


def check(name, values):
    if len(values) != N:
        fail(f"{name}: {len(values)} records, want {N}")
    for i, v in enumerate(values):
        if v != value(i):
            fail(f"{name}: record {i} is {len(v)} bytes of {v[:1]!r}, want {sizes[i]} of "
                 f"{value(i)[:1]!r}")


# Fetch, with the default max_bytes and with 2 MiB: every response within what was asked
# (or one record alone), and within the default limit (else this client could not read it).
fetch = unary(read_ch, "Fetch", "FetchResponse")
for max_bytes in [0, 2 * 1024 * 1024]:
    values, offset, largest, responses = [], 0, 0, 0
    deadline = time.time() + 120
    while len(values) < N:
        if time.time() > deadline:
            fail(f"fetch max_bytes={max_bytes}: {len(values)} of {N} records in 120 s")
        r = fetch(M("FetchRequest")(topic=topic, partition=0, offset=offset,
                                    max_bytes=max_bytes, max_wait_ms=1000), timeout=30)
        size = r.ByteSize()
        budget = max_bytes or 1024 * 1024
        if size > budget and len(r.records) > 1:
            fail(f"fetch max_bytes={max_bytes}: {len(r.records)} records in {size} bytes")
        largest = max(largest, size)
        values += [rec.value for rec in r.records]
        # An empty answer is a long poll that ran out (this node's replica still catching up
        # with 25 MB): ask again.
        offset = max(offset, r.next_offset)
        responses += 1
    check(f"fetch max_bytes={max_bytes}", values)
    print(f"fetch max_bytes={max_bytes or 'default'}: {N} records in {responses} responses, "
          f"largest {largest} bytes")


def stream_until(method, resp, first, take, count_of, want, acks=None):
    """Opens a bidirectional stream, sends `first`, and collects what `take` returns until
    `count_of(collected)` reaches `want`."""
    out = queue.Queue()
    out.put(first)
    stop = object()

    def requests():
        while True:
            m = out.get()
            if m is stop:
                return
            yield m

    call = streaming(read_ch, method, resp)(requests(), timeout=120)
    got = []
    try:
        for r in call:
            got += take(r)
            if acks:
                for a in acks(r):
                    out.put(a)
            if count_of(got) >= want:
                break
    except grpc.RpcError as e:
        fail(f"{method}: {e.code()} {e.details()}")
    finally:
        out.put(stop)
        call.cancel()
    return got


earliest = M("StartPosition")(earliest=True)
got = stream_until(
    "Subscribe", "SubscribeResponse",
    M("SubscribeRequest")(add=[M("TopicSubscription")(topic=topic, **{"from": earliest})]),
    lambda r: [rec.value for rec in r.records], len, N)
check("subscribe", got)
print(f"subscribe: {N} records")

join = M("JoinGroup")
req = M("ConsumeRequest")
got = stream_until(
    "Consume", "ConsumeResponse",
    req(join=join(group="stream-" + topic, topic=topic, mode=1, max_in_flight=100)),
    lambda r: [d.record.value for d in r.deliveries.deliveries]
    if r.WhichOneof("kind") == "deliveries" else [],
    len, N)
check("consume, stream mode", got)
print(f"consume, stream mode: {N} records")


def queue_acks(r):
    if r.WhichOneof("kind") != "deliveries":
        return []
    refs = [M("DeliveryRef")(partition=d.record.partition, offset=d.record.offset)
            for d in r.deliveries.deliveries]
    return [req(ack=M("Acks")(deliveries=refs))]


got = stream_until(
    "Consume", "ConsumeResponse",
    req(join=join(group="queue-" + topic, topic=topic, mode=2, max_in_flight=1000)),
    lambda r: [(d.record.offset, d.record.value) for d in r.deliveries.deliveries]
    if r.WhichOneof("kind") == "deliveries" else [],
    lambda g: len({o for o, _ in g}), N, acks=queue_acks)
by_offset = dict(got)
check("consume, queue mode", [by_offset[o] for o in sorted(by_offset)])
print(f"consume, queue mode (all {N} in flight at once): {N} records")
print("OK")
