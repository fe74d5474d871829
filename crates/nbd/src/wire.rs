//! Encoding and decoding of NBD messages, with no I/O: the server, tern's client
//! (`tern_disk::nbd`) and the fuzz targets all go through these functions, so that
//! every byte received from a peer is parsed by one audited piece of code.
//!
//! Layouts (all integers big-endian, `doc/proto.md`):
//! - option request: `IHAVEOPT` u64, option u32, length u32, data
//! - option reply: `OPT_REPLY_MAGIC` u64, option u32, reply type u32, length u32, data
//! - request: `REQUEST_MAGIC` u32, flags u16, type u16, cookie u64, offset u64, length u32
//! - simple reply: `SIMPLE_REPLY_MAGIC` u32, error u32, cookie u64
//! - structured chunk: `STRUCTURED_REPLY_MAGIC` u32, flags u16, type u16, cookie u64,
//!   length u32, payload

use crate::proto::*;

/// A message that does not parse. Each variant says what was wrong; the server answers
/// an option with `NBD_REP_ERR_INVALID` and ends a connection whose framing is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number that is not the one the protocol puts there.
    #[error("bad magic {found:#x} in {what} (expected {expected:#x})")]
    BadMagic { what: &'static str, found: u64, expected: u64 },
    /// A length field that points past the end of the data that carries it.
    #[error("{what}: a length of {length} bytes runs past the {available} bytes sent")]
    Truncated { what: &'static str, length: u64, available: u64 },
    /// Bytes left over after the last field.
    #[error("{what}: {extra} unexpected bytes after the last field")]
    Trailing { what: &'static str, extra: usize },
    /// A string that is not UTF-8.
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    /// Anything else that breaks a documented rule.
    #[error("{0}")]
    Invalid(String),
}

/// A cursor over the data of one message; every read is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Cursor { data, at: 0, what }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], WireError> {
        let left = (self.data.len() - self.at) as u64;
        if n > left {
            return Err(WireError::Truncated { what: self.what, length: n, available: left });
        }
        let s = &self.data[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn string(&mut self, len: u32, what: &'static str) -> Result<String, WireError> {
        let bytes = self.take(u64::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8 { what })
    }

    fn finish(self) -> Result<(), WireError> {
        match self.data.len() - self.at {
            0 => Ok(()),
            extra => Err(WireError::Trailing { what: self.what, extra }),
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("2 bytes"))
}

// ---------------------------------------------------------------------------------
// Handshake

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut m = [0u8; 18];
    m[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    m[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    m[16..].copy_from_slice(&flags.to_be_bytes());
    m
}

/// The header of an option request: (option, data length).
pub fn decode_option_header(h: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), WireError> {
    let magic = be64(&h[..8]);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic { what: "an option request", found: magic, expected: IHAVEOPT });
    }
    Ok((be32(&h[8..12]), be32(&h[12..16])))
}

/// An option request: header and data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// An option reply: header and data.
pub fn encode_option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// The header of an option reply: (option, reply type, data length).
pub fn decode_option_reply_header(h: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<(u32, u32, u32), WireError> {
    let magic = be64(&h[..8]);
    if magic != OPT_REPLY_MAGIC {
        return Err(WireError::BadMagic { what: "an option reply", found: magic, expected: OPT_REPLY_MAGIC });
    }
    Ok((be32(&h[8..12]), be32(&h[12..16]), be32(&h[16..20])))
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name (empty: the default export).
    pub name: String,
    /// The `NBD_INFO_*` items asked for.
    pub infos: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    let mut c = Cursor::new(data, "NBD_OPT_GO/INFO");
    let len = c.u32()?;
    let name = c.string(len, "the export name")?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { name, infos })
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (`base:allocation`, `base:`, ...).
    pub queries: Vec<String>,
}

/// Parse the data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn decode_meta_request(data: &[u8]) -> Result<MetaRequest, WireError> {
    let mut c = Cursor::new(data, "NBD_OPT_*_META_CONTEXT");
    let len = c.u32()?;
    let export = c.string(len, "the export name")?;
    let n = c.u32()?;
    // Every query takes at least its 4-byte length: a count beyond that is a lie.
    if u64::from(n) * 4 > (data.len() - c.at) as u64 {
        return Err(WireError::Truncated {
            what: "NBD_OPT_*_META_CONTEXT queries",
            length: u64::from(n) * 4,
            available: (data.len() - c.at) as u64,
        });
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let l = c.u32()?;
        queries.push(c.string(l, "a metadata context query")?);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// The data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn encode_meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// `NBD_INFO_EXPORT`: size and transmission flags (12 bytes with the type).
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload (14 bytes with the type).
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// A decoded `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export { size: u64, flags: u16 },
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// An item this code does not know (clients must ignore those).
    Other(u16),
}

/// Parse the data of an `NBD_REP_INFO` reply.
pub fn decode_info(data: &[u8]) -> Result<Info, WireError> {
    let mut c = Cursor::new(data, "NBD_REP_INFO");
    let kind = c.u16()?;
    let info = match kind {
        INFO_EXPORT => {
            let size = be64(c.take(8)?);
            Info::Export { size, flags: c.u16()? }
        }
        INFO_BLOCK_SIZE => Info::BlockSize { min: c.u32()?, preferred: c.u32()?, max: c.u32()? },
        INFO_NAME | INFO_DESCRIPTION => {
            let s = c.string((data.len() - 2) as u32, "an export name or description")?;
            if kind == INFO_NAME {
                Info::Name(s)
            } else {
                Info::Description(s)
            }
        }
        other => return Ok(Info::Other(other)),
    };
    c.finish()?;
    Ok(info)
}

/// `NBD_REP_SERVER` data: a name (and no description).
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` data: id and name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Parse `NBD_REP_META_CONTEXT` data: (id, name).
pub fn decode_rep_meta_context(data: &[u8]) -> Result<(u32, String), WireError> {
    let mut c = Cursor::new(data, "NBD_REP_META_CONTEXT");
    let id = c.u32()?;
    let name = c.string((data.len() - 4) as u32, "a metadata context name")?;
    Ok((id, name))
}

// ---------------------------------------------------------------------------------
// Transmission

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Chosen by the client, echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parse a request header (magic checked).
    pub fn decode(h: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        let magic = be32(&h[..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "a request",
                found: u64::from(magic),
                expected: u64::from(REQUEST_MAGIC),
            });
        }
        Ok(Request {
            flags: be16(&h[4..6]),
            kind: be16(&h[6..8]),
            cookie: be64(&h[8..16]),
            offset: be64(&h[16..24]),
            length: be32(&h[24..28]),
        })
    }

    /// The 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut m = [0u8; REQUEST_LEN];
        m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[4..6].copy_from_slice(&self.flags.to_be_bytes());
        m[6..8].copy_from_slice(&self.kind.to_be_bytes());
        m[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        m[16..24].copy_from_slice(&self.offset.to_be_bytes());
        m[24..28].copy_from_slice(&self.length.to_be_bytes());
        m
    }
}

/// A simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut m = [0u8; SIMPLE_REPLY_LEN];
    m[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m[4..8].copy_from_slice(&error.to_be_bytes());
    m[8..].copy_from_slice(&cookie.to_be_bytes());
    m
}

/// The 12 bytes of a simple reply after its magic: (error, cookie).
pub fn decode_simple_reply_rest(r: &[u8; 12]) -> (u32, u64) {
    (be32(&r[..4]), be64(&r[4..]))
}

/// A structured reply chunk header.
pub fn encode_structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut m = [0u8; STRUCTURED_HEADER_LEN];
    m[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&kind.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..20].copy_from_slice(&length.to_be_bytes());
    m
}

/// The 16 bytes of a structured chunk header after its magic: (flags, type, cookie, length).
pub fn decode_structured_rest(r: &[u8; 16]) -> (u16, u16, u64, u32) {
    (be16(&r[..2]), be16(&r[2..4]), be64(&r[4..12]), be32(&r[12..16]))
}

/// The payload of an `NBD_REPLY_TYPE_ERROR` chunk: error, message length, message
/// (cut at 4096 bytes, on a character boundary).
pub fn encode_error_payload(error: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut d = Vec::with_capacity(6 + msg.len());
    d.extend_from_slice(&error.to_be_bytes());
    d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    d.extend_from_slice(msg);
    d
}

/// Parse an error chunk's payload: (error, message).
pub fn decode_error_payload(p: &[u8]) -> Result<(u32, String), WireError> {
    let mut c = Cursor::new(p, "an error chunk");
    let err = c.u32()?;
    let len = c.u16()?;
    let msg = String::from_utf8_lossy(c.take(u64::from(len))?).into_owned();
    // NBD_REPLY_TYPE_ERROR_OFFSET carries an offset after the message.
    Ok((err, msg))
}

/// Parse a block status chunk's payload: (context id, descriptors (length, flags)).
pub fn decode_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>), WireError> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(WireError::Invalid(format!("a block status chunk of {} bytes", p.len())));
    }
    let id = be32(&p[..4]);
    let descs = p[4..].chunks_exact(8).map(|d| (be32(&d[..4]), be32(&d[4..]))).collect();
    Ok((id, descs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request { flags: 3, kind: CMD_WRITE, cookie: u64::MAX - 1, offset: 1 << 40, length: 4096 };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(matches!(Request::decode(&bad), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn info_and_meta_requests_round_trip_and_refuse_lies() {
        let d = encode_info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            decode_info_request(&d),
            Ok(InfoRequest { name: "disk".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        assert!(decode_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(matches!(decode_info_request(&long), Err(WireError::Trailing { .. })));
        let m = encode_meta_request("", &["base:allocation", "qemu:"]);
        let got = decode_meta_request(&m).unwrap();
        assert_eq!(got.queries, vec!["base:allocation".to_string(), "qemu:".to_string()]);
        // A count of queries far beyond the data.
        let mut lie = encode_meta_request("x", &[]);
        let at = lie.len() - 4;
        lie[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_meta_request(&lie), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn infos_decode() {
        assert_eq!(decode_info(&encode_info_export(5, 7)), Ok(Info::Export { size: 5, flags: 7 }));
        assert_eq!(
            decode_info(&encode_info_block_size(1, 4096, 1 << 25)),
            Ok(Info::BlockSize { min: 1, preferred: 4096, max: 1 << 25 })
        );
        assert!(decode_info(&encode_info_export(5, 7)[..11]).is_err());
        assert_eq!(decode_info(&[0, 9]), Ok(Info::Other(9)));
    }

    #[test]
    fn error_payload_is_cut_on_a_char_boundary() {
        let msg = "é".repeat(3000);
        let p = encode_error_payload(EINVAL, &msg);
        let (e, m) = decode_error_payload(&p).unwrap();
        assert_eq!(e, EINVAL);
        assert!(m.len() <= 4096 && m.chars().all(|c| c == 'é'));
    }
}
