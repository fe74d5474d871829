# Several libnbd connections at once to one export, each with 16 requests in flight
# (libnbd's aio calls): writes of a pattern per connection and region, then reads that
# check it. Prints "ok N" (requests completed) or raises. Run by
# crates/nbd/tests/robustness.rs while other clients misbehave.
#   TERN_URI  the export (writable, at least CONNS MiB)
import os

import nbd

uri = os.environ["TERN_URI"]
conns = int(os.environ.get("TERN_CONNS", "8"))
handles = []
for i in range(conns):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)

block = 65536
per = (1 << 20) // block
done = 0


def drain(h):
    # Bounded: every command completes or the connection fails (an exception).
    while h.aio_in_flight() > 0:
        h.poll(-1)


for i, h in enumerate(handles):
    for j in range(per):
        h.aio_pwrite(bytes([(i * 16 + j) % 251 + 1]) * block, (i << 20) + j * block)
for h in handles:
    drain(h)
    done += per
bufs = []
for i, h in enumerate(handles):
    for j in range(per):
        b = nbd.Buffer(block)
        h.aio_pread(b, (i << 20) + j * block)
        bufs.append((i, j, b))
for h in handles:
    drain(h)
for i, j, b in bufs:
    want = bytes([(i * 16 + j) % 251 + 1]) * block
    assert b.to_bytearray() == want, f"connection {i} block {j}"
    done += 1
for h in handles:
    h.shutdown()
print("ok", done)
