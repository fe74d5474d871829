//! `tern store verify`: every point's manifest -> its indexes -> every chunk they
//! reference exists (listing the store once) or, with `read_data`, fetches and opens
//! (authenticated, hashed back to its address, right length). Every problem is
//! reported with the VM, point, disk and chunk number that reference it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tern_chunk::{ChunkAddress, IndexEntry, ENVELOPE_OVERHEAD};

use crate::point::{fetch_chunk_into, fetch_index, fetch_piece};
use crate::{Engine, Manifest, Result};

/// Options.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Fetch and open every chunk instead of only checking that it exists.
    pub read_data: bool,
    /// Chunks fetched at once with `read_data`, 1 to 32.
    pub threads: usize,
    /// The store to verify; `None`: the engine's ([`Engine::store_url`]).
    pub store_url: Option<String>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { read_data: false, threads: crate::DEFAULT_THREADS, store_url: None }
    }
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// VM name (or id when the manifest is unreadable).
    pub vm: String,
    /// Point id.
    pub point: String,
    /// Disk number, when the problem is in a disk.
    pub disk: Option<u32>,
    /// Chunk number, when the problem is a chunk.
    pub chunk: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {} point {}", self.vm, self.point)?;
        if let Some(d) = self.disk {
            write!(f, " disk {d}")?;
        }
        if let Some(c) = self.chunk {
            write!(f, " chunk {c}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What verify found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// The store verified.
    pub store_url: String,
    /// Whether every chunk was fetched and opened (`read_data`), not only listed.
    pub read_data: bool,
    /// VMs seen.
    pub vms: u64,
    /// Points checked.
    pub points: u64,
    /// Chunk references checked.
    pub chunk_refs: u64,
    /// Distinct chunks checked.
    pub distinct_chunks: u64,
    /// Segment pieces checked (each once, however many points list it).
    pub segment_pieces: u64,
    /// Problems.
    pub problems: Vec<Problem>,
}

/// Verify the engine's store.
pub fn verify(engine: &Engine, opts: &VerifyOptions) -> Result<VerifyReport> {
    crate::check_threads(opts.threads)?;
    let store = engine.open_store_at(opts.store_url.as_deref().unwrap_or(engine.store_url()), false)?;
    let key = engine.load_key()?;
    let rt = engine.runtime()?;
    rt.block_on(engine.check_store(&store, &key, false))?;
    let mut report =
        VerifyReport { store_url: store.url().to_string(), read_data: opts.read_data, ..Default::default() };
    let listed: HashMap<ChunkAddress, u64> = rt.block_on(store.list_chunks())?.into_iter().collect();
    // Result per distinct chunk: None = good, Some(message) = bad.
    let mut checked: HashMap<ChunkAddress, Option<String>> = HashMap::new();
    // The same, per segment piece (point, disk, piece).
    let mut pieces: HashMap<(String, u32, usize), Option<String>> = HashMap::new();
    for vm_id in rt.block_on(store.list_vms())? {
        report.vms += 1;
        for point in rt.block_on(store.list_points(&vm_id))? {
            report.points += 1;
            let manifest = rt
                .block_on(store.get_manifest(&vm_id, &point))
                .map_err(crate::Error::from)
                .and_then(|env| Manifest::open(&key, &env, &vm_id, &point));
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(Problem {
                        vm: vm_id.clone(),
                        point,
                        disk: None,
                        chunk: None,
                        message: format!("manifest: {e}"),
                    });
                    continue;
                }
            };
            let vm = manifest.vm.name.clone();
            for d in &manifest.disks {
                let index = match rt.block_on(fetch_index(&key, &store, &vm_id, &point, d)) {
                    Ok(i) => i,
                    Err(e) => {
                        report.problems.push(Problem {
                            vm: vm.clone(),
                            point: point.clone(),
                            disk: Some(d.index),
                            chunk: None,
                            message: e.to_string(),
                        });
                        continue;
                    }
                };
                let refs: Vec<(usize, ChunkAddress)> = index
                    .entries()
                    .iter()
                    .enumerate()
                    .filter_map(|(n, e)| match e {
                        IndexEntry::Chunk(a) => Some((n, *a)),
                        _ => None,
                    })
                    .collect();
                // Verdicts for chunks not seen before; those to read are read below.
                let mut to_read = Vec::new();
                for &(n, addr) in &refs {
                    report.chunk_refs += 1;
                    if checked.contains_key(&addr) {
                        continue;
                    }
                    report.distinct_chunks += 1;
                    let verdict = match listed.get(&addr) {
                        None => Some(format!("chunk object {addr} is missing from the store")),
                        Some(&size) if size < ENVELOPE_OVERHEAD as u64 => {
                            Some(format!("chunk object {addr} is truncated ({size} bytes)"))
                        }
                        Some(_) if opts.read_data => {
                            let range = index.chunk_range(n);
                            to_read.push((addr, range.end - range.start));
                            None
                        }
                        Some(_) => None,
                    };
                    checked.insert(addr, verdict);
                }
                let read = read_chunks(&key, &store, rt.handle(), &to_read, opts.threads);
                for ((addr, _), verdict) in to_read.iter().zip(read) {
                    checked.insert(*addr, verdict);
                }
                for (si, seg) in d.segments.iter().enumerate() {
                    for k in 0..seg.pieces.len() {
                        let id = (seg.point_id.clone(), d.index, k);
                        let verdict = pieces.entry(id).or_insert_with(|| {
                            report.segment_pieces += 1;
                            let res = if opts.read_data {
                                rt.block_on(fetch_piece(&key, &store, &vm_id, d, si, k)).map(|_| ())
                            } else {
                                rt.block_on(store.segment_exists(&vm_id, &seg.point_id, d.index, k as u32))
                                    .map_err(crate::Error::from)
                                    .and_then(|found| {
                                        if found {
                                            Ok(())
                                        } else {
                                            Err(crate::Error::corrupt(format!(
                                                "segment piece {k} of disk {} from point {} is missing from the store",
                                                d.index, seg.point_id
                                            )))
                                        }
                                    })
                            };
                            res.err().map(|e| e.to_string())
                        });
                        if let Some(msg) = verdict {
                            report.problems.push(Problem {
                                vm: vm.clone(),
                                point: point.clone(),
                                disk: Some(d.index),
                                chunk: None,
                                message: msg.clone(),
                            });
                        }
                    }
                }
                for &(n, addr) in &refs {
                    if let Some(msg) = &checked[&addr] {
                        report.problems.push(Problem {
                            vm: vm.clone(),
                            point: point.clone(),
                            disk: Some(d.index),
                            chunk: Some(n as u64),
                            message: msg.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Fetch and open `chunks` (address, guest length) with `threads` workers; per chunk
/// `None` when it is good, else what is wrong.
fn read_chunks(
    key: &tern_chunk::Key,
    store: &tern_store::Store,
    rt: &tokio::runtime::Handle,
    chunks: &[(ChunkAddress, u64)],
    threads: usize,
) -> Vec<Option<String>> {
    let next = AtomicUsize::new(0);
    let verdicts: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; chunks.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, crate::MAX_THREADS) {
            s.spawn(|| {
                // One buffer per worker, as long as the longest chunk.
                let longest = chunks.iter().map(|&(_, len)| len).max().unwrap_or(0);
                let mut buf = vec![0u8; usize::try_from(longest).unwrap_or(0)];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((addr, len)) = chunks.get(i) else { break };
                    let verdict = match buf.get_mut(..*len as usize) {
                        Some(out) => {
                            rt.block_on(fetch_chunk_into(key, store, addr, out)).err().map(|e| e.to_string())
                        }
                        None => Some(format!("chunk {addr}: length {len} is out of range")),
                    };
                    verdicts.lock().unwrap_or_else(|p| p.into_inner())[i] = verdict;
                }
            });
        }
    });
    verdicts.into_inner().unwrap_or_else(|p| p.into_inner())
}
