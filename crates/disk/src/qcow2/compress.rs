//! Decompression of compressed clusters (QEMU docs/interop/qcow2.txt, "Compressed
//! Clusters Descriptor" and header byte 104).
//!
//! A compressed cluster is a stream that decompresses to exactly one cluster; the
//! bytes the descriptor spans may run past the end of the stream (the last sector is
//! shared with the next cluster), so decoding stops as soon as the cluster is full and
//! trailing bytes are ignored. Type 0 is raw deflate (no zlib header), type 1 is zstd.

use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::header::Compression;

/// Decompress `input` into all of `out`; the error says why it could not be filled.
pub(crate) fn decompress_cluster(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Deflate => deflate(input, out),
        Compression::Zstd => zstd(input, out),
    }
}

fn deflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut state = Box::<DecompressorOxide>::default();
    // No TINFL_FLAG_HAS_MORE_INPUT: `input` is all there is. The output buffer is the
    // whole cluster, so back-references never wrap.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = inflate(&mut state, input, out, 0, flags);
    if written == out.len() {
        Ok(())
    } else {
        Err(format!("deflate stream yields {written} of {} bytes ({status:?})", out.len()))
    }
}

fn zstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut decoder = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut pos = 0;
    // Every round either fills the cluster, consumes input or produces output;
    // otherwise the data is truncated. Bounded by input + output length.
    while pos < out.len() {
        let (in_before, out_before) = (inb.pos, pos);
        let mut outb = OutBuffer::around_pos(&mut *out, pos);
        decoder.run(&mut inb, &mut outb).map_err(|e| format!("zstd: {e}"))?;
        pos = outb.pos();
        if inb.pos == in_before && pos == out_before {
            return Err(format!("zstd stream yields {pos} of {} bytes", out.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        c.extend_from_slice(&[0xAB; 300]);
        let mut out = vec![0u8; data.len()];
        decompress_cluster(Compression::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; data.len()];
        decompress_cluster(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_streams_are_errors() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(Compression::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress_cluster(Compression::Zstd, &[0xff; 64], &mut out).is_err());
        let short = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
        assert!(decompress_cluster(Compression::Zstd, &short, &mut out).is_err());
    }
}
