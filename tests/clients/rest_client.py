"""A REST client with Python's own http.client: topics, publishing (text and base64), a long
poll and Server-Sent Events, and a queue group whose unacked deliveries come back and end as
dead letters; each call through another node.

usage: rest_client.py ADDR[,ADDR...]
"""
import base64
import http.client
import json
import sys
import time

addrs = sys.argv[1].split(",")
run = str(int(time.time() * 1000))
topic = f"rest-{run}"


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def call(i, method, path, body=None, headers=None, timeout=60):
    host, port = addrs[i % len(addrs)].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    raw = r.read()
    c.close()
    ctype = r.getheader("Content-Type", "")
    parsed = json.loads(raw) if raw and "json" in ctype else raw
    return r.status, ctype, parsed


def expect(what, got, status, ctype="application/json"):
    if got[0] != status or not got[1].startswith(ctype):
        fail(f"{what}: {got[0]} {got[1]} {got[2]!r}, want {status} {ctype}")
    return got[2]


t = expect("create", call(0, "POST", "/topics", {"name": topic, "partitions": 3}), 201)
if t["partitions"] != 3 or t["name"] != topic:
    fail(f"created {t}")
p = expect("create again", call(1, "POST", "/topics", {"name": topic}), 409,
           "application/problem+json")
if p["code"] != "ALREADY_EXISTS" or p["status"] != 409:
    fail(f"problem {p}")
expect("bad name", call(2, "POST", "/topics", {"name": "a/b"}), 400, "application/problem+json")
expect("not json", call(2, "POST", f"/topics/{topic}/publish", ["x"]), 400,
       "application/problem+json")
print("create: 201; again: 409 ALREADY_EXISTS; a bad name and a non-object body: 400 problems")

values = [f"order-{i}" for i in range(20)]
ids = []
for i, v in enumerate(values):
    r = expect("publish", call(i, "POST", f"/topics/{topic}/publish",
                               {"key": f"k{i % 5}", "value": v, "headers": {"n": str(i)}}), 200)
    ids.append(r["messageId"])
binary = bytes([0, 255, 1, 254])
r = expect("publish base64", call(1, "POST", f"/topics/{topic}/publish",
                                  {"value": base64.b64encode(binary).decode(),
                                   "encoding": "base64", "partition": 0}), 200)
print(f"published 20 text records and one binary through {len(addrs)} nodes")

# A long poll of each partition from the earliest, through another node than the publishes.
seen = []
for part in range(3):
    offset = 0
    while True:
        ms = expect("poll", call(part + 1, "GET", f"/topics/{topic}/subscribe?partition={part}"
                                 f"&offset={offset}&waitMs=200&max=7"), 200)
        if not ms:
            break
        if len(ms) > 7:
            fail(f"poll returned {len(ms)} messages, max was 7")
        seen += ms
        offset = ms[-1]["offset"] + 1
texts = sorted(m["value"] for m in seen if m["encoding"] == "utf8")
if texts != sorted(values):
    fail(f"polled {texts}")
bins = [m for m in seen if m["encoding"] == "base64"]
if len(bins) != 1 or base64.b64decode(bins[0]["value"]) != binary:
    fail(f"the binary record came back as {bins}")
for m in seen:
    if m["encoding"] == "utf8" and m["headers"].get("n") != m["value"].split("-")[1]:
        fail(f"headers lost: {m}")
print("long polls per partition: every record once, the binary one in base64")

# Server-Sent Events: the first events of the topic, each with the message id as event id.
host, port = addrs[-1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=30)
c.request("GET", f"/topics/{topic}/subscribe", headers={"Accept": "text/event-stream"})
r = c.getresponse()
if r.status != 200 or not r.getheader("Content-Type", "").startswith("text/event-stream"):
    fail(f"SSE answered {r.status} {r.getheader('Content-Type')}")
events, cur = [], {}
while len(events) < 21:
    line = r.fp.readline().decode().rstrip("\n")
    if line.startswith("id: "):
        cur["id"] = line[4:]
    elif line.startswith("data: "):
        cur["data"] = json.loads(line[6:])
    elif line == "" and cur:
        events.append(cur)
        cur = {}
c.close()
if any(e["id"] != e["data"]["messageId"] for e in events):
    fail("an event id is not its message id")
if sorted(e["data"]["value"] for e in events if e["data"]["encoding"] == "utf8") != sorted(values):
    fail("SSE did not deliver every record")
print("Server-Sent Events: all 21 records, event ids = message ids")

# A queue group: ack most, leave 3 unacked: redelivered after ackWaitMs, then dead letters.
group = f"billing-{run}"
q = f"/topics/{topic}/subscribe?group={group}&ackWaitMs=1000&maxDeliveries=2&waitMs=2000&max=100"
# Polls of 4 while more are ready, through every node: a member leaves holding only what its
# poll answered, so nothing comes twice here (a held-back delivery would come again with
# deliveryCount 2 after the ack wait).
# First polls that do not wait (waitMs=0): through a node that relays to the coordinator they
# mostly answer before the deliveries arrive, which must then go back uncounted.
got = []
for i in range(3):
    got += expect("group poll", call(i, "GET", q.replace("waitMs=2000", "waitMs=0")), 200)
deadline = time.time() + 30
while len(got) < 21 and time.time() < deadline:
    got += expect("group poll", call(len(got), "GET", q.replace("max=100", "max=4")), 200)
if len(got) != 21 or any(m["deliveryCount"] != 1 for m in got) \
        or len({m["messageId"] for m in got}) != 21:
    fail(f"the group delivered {len(got)}: {[(m['messageId'], m['deliveryCount']) for m in got]}")
poison = {m["messageId"] for m in got if m["value"] in ("order-3", "order-7", "order-11")}
for i, m in enumerate(got):
    if m["messageId"] not in poison:
        expect("ack", call(i, "POST", f"/topics/{topic}/ack", {"messageId": m["messageId"]}), 200)
p = expect("ack twice", call(0, "POST", f"/topics/{topic}/ack", {"messageId": got[0]["messageId"]}
                              if got[0]["messageId"] not in poison else
                              {"messageId": got[1]["messageId"]}), 409, "application/problem+json")
expect("ack of a plain id", call(0, "POST", f"/topics/{topic}/ack", {"messageId": "0-1"}), 400,
       "application/problem+json")
print(f"group: 21 first deliveries; 18 acked through every node; a second ack 409; "
      f"{len(poison)} left unacked")

again = []
deadline = time.time() + 30
while len(again) < 3 and time.time() < deadline:
    again += expect("redelivery", call(len(again) + 1, "GET", q), 200)
if {m["messageId"] for m in again} != poison or any(m["deliveryCount"] != 2 for m in again):
    fail(f"redelivered {[(m['messageId'], m['deliveryCount']) for m in again]}, want {poison} "
         f"at count 2")
print("after ackWaitMs: exactly the 3 unacked ones again, deliveryCount 2")

# Not acked again: after their second (last) delivery they go to <topic>.dlq.
dead = []
deadline = time.time() + 30
while len(dead) < 3 and time.time() < deadline:
    time.sleep(0.5)
    st, _, body = call(2, "GET", f"/topics/{topic}.dlq/subscribe?offset=earliest&waitMs=500")
    if st == 200:
        dead = body
if sorted(m["value"] for m in dead) != ["order-11", "order-3", "order-7"]:
    fail(f"dead letters: {dead}")
more = expect("after dead letters", call(0, "GET", q.replace("waitMs=2000", "waitMs=1500")), 200)
if more:
    fail(f"delivered after dead-lettering: {more}")
print("after maxDeliveries: the 3 are in the dead-letter topic, and the group is done")

expect("delete", call(1, "DELETE", f"/topics/{topic}"), 204, "")
expect("poll deleted", call(2, "GET", f"/topics/{topic}/subscribe?waitMs=0"), 404,
       "application/problem+json")
print("delete: 204; then 404")
print("OK")
