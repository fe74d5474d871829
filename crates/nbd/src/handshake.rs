//! The handshake phase: greeting, client flags, option haggling (fixed newstyle), up to
//! `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
//!
//! Every option is read whole (at most [`MAX_OPTION_LEN`] bytes, or the client is
//! disconnected) and answered; a malformed one gets `NBD_REP_ERR_INVALID`, an unknown
//! one `NBD_REP_ERR_UNSUP`, and negotiation goes on. With TLS configured the server is
//! in FORCEDTLS mode: until `NBD_OPT_STARTTLS` succeeds every option but STARTTLS and
//! ABORT is refused with `NBD_REP_ERR_TLS_REQD`.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::export::Export;
use crate::proto::*;
use crate::wire;

/// The largest option data read; more ends the connection (names are at most 4096
/// bytes, and no option of this server needs more than a few of them).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The most options one handshake may send before the client is disconnected.
pub const MAX_OPTIONS: usize = 1024;
/// The most metadata context queries in one option.
pub const MAX_QUERIES: usize = 128;

/// A stream the handshake runs on, which may be upgraded to TLS in place.
pub trait HandshakeStream: Read + Write {
    /// Start TLS (after `NBD_REP_ACK` to `NBD_OPT_STARTTLS` was sent).
    fn start_tls(&mut self, config: &Arc<rustls::ServerConfig>) -> io::Result<()>;
    /// Whether TLS is running.
    fn is_tls(&self) -> bool;
}

/// The exports a server offers, in order (the first one is the default export, the
/// one an empty name selects).
pub type Exports = [(String, Arc<dyn Export>)];

/// What the handshake settled for the transmission phase.
pub struct Negotiated {
    /// Index into the exports.
    pub export: usize,
    /// Structured replies are on.
    pub structured: bool,
    /// The context id of `base:allocation`, if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The transmission flags sent.
    pub flags: u16,
}

/// Why a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeEnd {
    /// The client sent `NBD_OPT_ABORT` or closed the connection between options.
    #[error("the client ended the handshake")]
    Closed,
    /// The client broke the protocol; the connection is dropped.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The transmission flags of `export`, given what was negotiated.
pub fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let caps = export.capabilities();
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if caps.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        if caps.trim {
            f |= FLAG_SEND_TRIM;
        }
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if caps.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

struct State {
    structured: bool,
    /// The export named by the last SET_META_CONTEXT and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
}

/// Run the handshake on `s`. `tls`: the server's TLS configuration (FORCEDTLS), if any.
pub fn negotiate<S: HandshakeStream>(
    s: &mut S,
    exports: &Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Negotiated, HandshakeEnd> {
    s.write_all(&wire::encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cf = [0u8; 4];
    read_or_closed(s, &mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut st = State { structured: false, meta: None };
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        read_or_closed(s, &mut h)?;
        let (option, len) =
            wire::decode_option_header(&h).map_err(|e| HandshakeEnd::Protocol(e.to_string()))?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeEnd::Protocol(format!("option {option} with {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, d: &[u8]| s.write_all(&wire::encode_option_reply(option, kind, d));
        let err = |s: &mut S, kind: u32, msg: &str| {
            s.write_all(&wire::encode_option_reply(option, kind, msg.as_bytes()))
        };

        if tls.is_some() && !s.is_tls() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeEnd::Protocol("NBD_OPT_EXPORT_NAME before TLS".into()));
            }
            err(s, REP_ERR_TLS_REQD, "this server requires TLS (NBD_OPT_STARTTLS) first")?;
            continue;
        }
        match option {
            OPT_ABORT => {
                // The client may already be gone: a failed ACK changes nothing.
                let _ = reply(s, REP_ACK, &[]);
                return Err(HandshakeEnd::Closed);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| HandshakeEnd::Protocol("export name is not UTF-8".into()))?;
                let Some(i) = find(exports, &name) else {
                    return Err(HandshakeEnd::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME of unknown export {name:?}"
                    )));
                };
                let export = &exports[i].1;
                let flags = transmission_flags(export.as_ref(), st.structured);
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&export.size().to_be_bytes());
                m.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&m)?;
                return Ok(finish(&st, exports, i, flags));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    err(s, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for (name, _) in exports {
                    reply(s, REP_SERVER, &wire::encode_rep_server(name))?;
                }
                reply(s, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    err(s, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                } else if s.is_tls() {
                    err(s, REP_ERR_INVALID, "TLS is already running")?;
                } else if let Some(cfg) = tls {
                    reply(s, REP_ACK, &[])?;
                    s.start_tls(cfg)?;
                    // Nothing negotiated before TLS survives it (proto.md, NBD_OPT_STARTTLS).
                    st = State { structured: false, meta: None };
                } else {
                    err(s, REP_ERR_POLICY, "TLS is not configured on this server")?;
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match wire::decode_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        err(s, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let Some(i) = find(exports, &req.name) else {
                    err(s, REP_ERR_UNKNOWN, &format!("no export named {:?}", req.name))?;
                    continue;
                };
                let export = &exports[i].1;
                let flags = transmission_flags(export.as_ref(), st.structured);
                reply(s, REP_INFO, &wire::encode_info_export(export.size(), flags))?;
                if req.infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(exports[i].0.as_bytes());
                    reply(s, REP_INFO, &d)?;
                }
                if req.infos.contains(&INFO_DESCRIPTION) {
                    if let Some(desc) = export.description() {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(desc.as_bytes());
                        reply(s, REP_INFO, &d)?;
                    }
                }
                // Always sent: clients that did not ask must ignore it, and those that
                // did learn the constraints the server enforces anyway.
                let b = export.block_sizes();
                reply(s, REP_INFO, &wire::encode_info_block_size(b.minimum, b.preferred, b.maximum))?;
                reply(s, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(finish(&st, exports, i, flags));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    err(s, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if st.structured {
                    err(s, REP_ERR_INVALID, "structured replies are already on")?;
                } else {
                    st.structured = true;
                    reply(s, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the previous selection even when it fails.
                    st.meta = None;
                }
                if !st.structured {
                    err(s, REP_ERR_INVALID, "negotiate structured replies first")?;
                    continue;
                }
                let req = match wire::decode_meta_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        err(s, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                if req.queries.len() > MAX_QUERIES {
                    err(s, REP_ERR_TOO_BIG, "too many metadata context queries")?;
                    continue;
                }
                if find(exports, &req.export).is_none() {
                    err(s, REP_ERR_UNKNOWN, &format!("no export named {:?}", req.export))?;
                    continue;
                }
                // `base:allocation` is the one context; LIST with no query or with the
                // namespace alone lists it. Other namespaces are ignored (proto.md).
                let selected = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty() || req.queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                };
                if selected {
                    let id = if set { 1 } else { 0 };
                    reply(s, REP_META_CONTEXT, &wire::encode_rep_meta_context(id, BASE_ALLOCATION))?;
                }
                if set {
                    st.meta = Some((req.export, selected));
                }
                reply(s, REP_ACK, &[])?;
            }
            _ => err(s, REP_ERR_UNSUP, &format!("option {option} is not supported"))?,
        }
    }
    Err(HandshakeEnd::Protocol(format!("more than {MAX_OPTIONS} options")))
}

fn find(exports: &Exports, name: &str) -> Option<usize> {
    if name.is_empty() {
        return if exports.is_empty() { None } else { Some(0) };
    }
    exports.iter().position(|(n, _)| n == name)
}

fn finish(st: &State, exports: &Exports, i: usize, flags: u16) -> Negotiated {
    // Block status needs a SET_META_CONTEXT for the export that was finally chosen.
    let base_allocation = match &st.meta {
        Some((name, true)) if find(exports, name) == Some(i) => Some(1),
        _ => None,
    };
    Negotiated { export: i, structured: st.structured, base_allocation, flags }
}

/// Read exactly `buf`, turning an end of stream before its first byte into `Closed`.
fn read_or_closed<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<(), HandshakeEnd> {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Err(HandshakeEnd::Closed),
            Ok(0) => return Err(HandshakeEnd::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
