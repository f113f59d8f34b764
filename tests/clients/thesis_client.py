"""The thesis seed's client: publishes to three topics through different nodes, subscribes with
a map of start times, and checks that it gets exactly the right records.

usage: thesis_client.py GENERATED_DIR ADDR[,ADDR...]
"""
import re
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import broker_pb2 as pb  # noqa: E402
import broker_pb2_grpc as rpc  # noqa: E402

addrs = sys.argv[2].split(",")
stubs = [rpc.BrokerStub(grpc.insecure_channel(a)) for a in addrs]
run = str(int(time.time() * 1000))
a, b, c = f"orders-{run}", f"events-{run}", f"audit-{run}"
ID = re.compile(r"^(?P<topic>[^/]+)/(?P<partition>\d+)@(?P<offset>\d+)$")


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def publish(i, topic, body):
    r = stubs[i % len(stubs)].Publish(pb.PublishRequest(topic=topic, body=body), timeout=30)
    m = ID.match(r.id)
    if not m or m["topic"] != topic:
        fail(f"id {r.id!r} does not name topic {topic}")
    return r.id


# Topics are created on first publish; each publish goes through another node.
early = [publish(i, a, f"a-early-{i}".encode()) for i in range(5)]
time.sleep(0.05)
since_ms = int(time.time() * 1000)
time.sleep(0.05)
late = [publish(i, a, f"a-late-{i}".encode()) for i in range(5)]
bs = [publish(i, b, f"b-{i}".encode()) for i in range(4)]
old_c = [publish(i, c, f"c-old-{i}".encode()) for i in range(3)]
ids = early + late + bs + old_c
if len(set(ids)) != len(ids):
    fail(f"ids are not unique: {ids}")
print(f"published 17 records to 3 topics through {len(stubs)} nodes")

# a from a time (ms), b from 0 (its first record), c new records only (negative).
call = stubs[-1].Subscribe(pb.SubscribeRequest(topics={a: since_ms, b: 0, c: -1}))
call.initial_metadata()  # the subscription's start offsets are fixed once it answers
got = []
done = threading.Event()


def read():
    try:
        for m in call:
            got.append(m)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            got.append(e)
    done.set()


threading.Thread(target=read, daemon=True).start()
new_c = [publish(i, c, f"c-new-{i}".encode()) for i in range(2)]
deadline = time.time() + 30
while len(got) < 11 and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # anything more that was going to come
call.cancel()
done.wait(5)
errors = [g for g in got if isinstance(g, Exception)]
if errors:
    fail(f"the subscription failed: {errors[0]}")

by_topic = {}
for m in got:
    by_topic.setdefault(m.topic, []).append(m)
want = {
    a: ([f"a-late-{i}" for i in range(5)], late),
    b: ([f"b-{i}" for i in range(4)], bs),
    c: ([f"c-new-{i}" for i in range(2)], new_c),
}
for topic, (bodies, want_ids) in want.items():
    ms = by_topic.get(topic, [])
    if [m.body.decode() for m in ms] != bodies:
        fail(f"{topic}: got {[m.body for m in ms]}, want {bodies}")
    if [m.id for m in ms] != want_ids:
        fail(f"{topic}: ids {[m.id for m in ms]} are not the ids Publish returned {want_ids}")
    for m in ms:
        if m.timestamp < since_ms - 60_000 or m.timestamp > time.time() * 1000 + 60_000:
            fail(f"{topic}: timestamp {m.timestamp} is not Unix milliseconds of now")
if any(m.timestamp < since_ms for m in by_topic[a]):
    fail("a record from before the start time was delivered")
if len(got) != 11:
    fail(f"{len(got)} messages, want exactly 11: {[(m.topic, m.body) for m in got]}")
print("subscription from {a: time, b: 0, c: -1}: exactly the 11 right records, in order")

# Bad input gets a clear status and changes nothing.
try:
    stubs[0].Publish(pb.PublishRequest(topic="bad/name", body=b"x"), timeout=30)
    fail("a bad topic name was accepted")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
        fail(f"bad topic name: {e.code()} {e.details()}")
try:
    next(iter(stubs[0].Subscribe(pb.SubscribeRequest(topics={}), timeout=30)))
    fail("an empty subscription was accepted")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
        fail(f"empty subscription: {e.code()} {e.details()}")
print("bad topic name and empty subscription: INVALID_ARGUMENT")
print("OK")
