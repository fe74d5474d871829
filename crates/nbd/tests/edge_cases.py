# Edge cases sent with libnbd (nbdsh), strict checks off so that libnbd sends what a
# careless client would. Prints one JSON object: case -> "ok", or the errno the server
# answered, or "disconnected". Run by crates/nbd/tests/edge_cases.rs against tern and
# against nbdkit / qemu-nbd serving the same kind of file, which must agree.
#   TERN_URI      the export to test (writable unless TERN_READ_ONLY=1)
#   TERN_SR       "0" to refuse structured replies
import json
import os

import nbd

uri = os.environ["TERN_URI"]
structured = os.environ.get("TERN_SR", "1") == "1"
results = {}


def connect():
    c = nbd.NBD()
    c.set_strict_mode(0)
    c.set_request_structured_replies(structured)
    if structured:
        c.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    c.connect_uri(uri)
    return c


h = connect()
size = h.get_size()


def case(name, f):
    global h
    try:
        f()
        results[name] = "ok"
    except nbd.Error as e:
        results[name] = e.errno if e.errno is not None else str(e.string)
        if not h.aio_is_ready() and not h.aio_is_processing():
            results[name] = "disconnected"
            h = connect()


def bs(count, offset, flags=0):
    h.block_status(count, offset, lambda *a: 0, flags)


results["structured"] = h.get_structured_replies_negotiated()
results["read_only"] = h.is_read_only()
results["can_trim"] = h.can_trim()
results["can_zero"] = h.can_zero()
results["can_fast_zero"] = h.can_fast_zero()
results["can_flush"] = h.can_flush()
results["can_fua"] = h.can_fua()
results["can_cache"] = h.can_cache()
case("read_unaligned", lambda: h.pread(1, 3))
case("write_unaligned", lambda: h.pwrite(b"abc", 1001))
case("read_zero_length", lambda: h.pread(0, 0))
case("read_past_end", lambda: h.pread(512, size))
case("read_straddling_end", lambda: h.pread(1024, size - 512))
case("read_offset_overflow", lambda: h.pread(512, 2**64 - 256))
case("write_past_end", lambda: h.pwrite(b"x" * 512, size))
case("trim_past_end", lambda: h.trim(512, size))
case("zero_past_end", lambda: h.zero(512, size))
case("cache_past_end", lambda: h.cache(512, size))
case("write_fua", lambda: h.pwrite(b"y" * 4096, 8192, nbd.CMD_FLAG_FUA))
case("zero_no_hole", lambda: h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE))
case("trim", lambda: h.trim(65536, 131072))
case("cache", lambda: h.cache(65536, 0))
case("flush", lambda: h.flush())
case("read_flag_no_hole", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
case("read_flag_req_one", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
case("read_flag_unknown", lambda: h.pread(512, 0, 1 << 9))
case("write_flag_fast_zero", lambda: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_FAST_ZERO))
case("write_flag_df", lambda: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_DF))
case("zero_flag_req_one", lambda: h.zero(512, 0, nbd.CMD_FLAG_REQ_ONE))
case("read_df", lambda: h.pread(65536, 0, nbd.CMD_FLAG_DF))
if structured:
    case("block_status", lambda: bs(65536, 0))
    case("block_status_req_one", lambda: bs(65536, 0, nbd.CMD_FLAG_REQ_ONE))
    case("block_status_past_end", lambda: bs(512, size))
    case("block_status_flag_fua", lambda: bs(512, 0, nbd.CMD_FLAG_FUA))
case("read_32m", lambda: h.pread(32 << 20, 0))
case("read_33m", lambda: h.pread(33 << 20, 0))
case("write_33m", lambda: h.pwrite(b"w" * (33 << 20), 0))
case("read_after_oversized", lambda: h.pread(512, 0))
h.shutdown()
print(json.dumps(results, sort_keys=True))
