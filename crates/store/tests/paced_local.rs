//! Paced uploads into a local folder, seen on disk: what a crash or a cancelled upload
//! leaves behind. (What every backend shows through the store's API is in the
//! conformance suite.)

mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::Duration;

use support::{address, payload, runtime};
use tern_store::Store;

const PART: u64 = 64 << 10;

/// The files in `dir` and below, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    // Bounded by the (small) tree a test makes.
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Poll a paced put of `len` bytes of chunk `n` until its third part is admitted, then
/// stop; returns the unfinished upload.
async fn stop_at_third_part<'a>(
    store: &'a Store,
    n: u8,
    len: usize,
    calls: &'a AtomicU32,
    pacer: &'a (dyn Fn(u64) -> u64 + Sync),
) -> std::pin::Pin<Box<impl Future<Output = tern_store::Result<()>> + 'a>> {
    let a = address(n);
    let mut put = Box::pin(async move { store.put_chunk_paced(&a, payload(n, len), &pacer).await });
    let stopped = || calls.load(Ordering::Relaxed) >= 3;
    let finished = std::future::poll_fn(|cx| match put.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result.map(|()| true).unwrap()),
        Poll::Pending if stopped() => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    })
    .await;
    assert!(!finished, "stopped midway");
    put
}

#[test]
fn a_crash_leaves_a_hidden_staging_file_and_a_cancel_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let len = 8 * PART as usize;
    runtime().block_on(async {
        // A crash: the upload is neither finished nor dropped, so nothing cleans up.
        let calls = AtomicU32::new(0);
        let pacer = |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            PART
        };
        let put = stop_at_third_part(&store, 1, len, &calls, &pacer).await;
        std::mem::forget(put);
        let left = files(dir.path());
        assert_eq!(left.len(), 1, "{left:?}");
        let name = left[0].file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.ends_with("#1"), "staged under a hidden name: {name}");
        assert!(!store.chunk_exists(&address(1)).await.unwrap());
        assert!(store.list_chunks().await.unwrap().is_empty());

        // A cancel (the upload dropped midway): its staging file goes.
        let calls = AtomicU32::new(0);
        let pacer = |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            PART
        };
        drop(stop_at_third_part(&store, 2, len, &calls, &pacer).await);
        // The file work in flight finishes on the blocking pool, then drops the file.
        // Bounded generously: on a loaded machine the blocking pool can lag for seconds.
        // On a loaded machine the blocking pool may run every part before the future
        // is next polled, so the drop can land while the commit is under way: then the
        // chunk is complete. Either way no staging file of the cancelled upload stays.
        let staging = |f: &Vec<PathBuf>| -> Vec<PathBuf> {
            f.iter().filter(|p| p.to_string_lossy().contains('#')).cloned().collect()
        };
        // (The crashed upload's file was checked above; the forgotten future's part
        // already on the blocking pool may still finish with it, which a real crash
        // would not: only the cancelled upload's files are asserted here.)
        let cancelled = || -> Vec<PathBuf> {
            staging(&files(dir.path())).into_iter().filter(|p| !left.contains(p)).collect()
        };
        for _ in 0..3000 {
            if cancelled().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cancelled(), Vec::<PathBuf>::new(), "no staging file of the cancelled upload stays");
        let committed = store.chunk_exists(&address(2)).await.unwrap();
        if committed {
            assert_eq!(
                store.get_chunk(&address(2)).await.unwrap(),
                payload(2, len),
                "a commit under way is whole"
            );
        }

        // The crashed chunk uploads again; its old staging file stays hidden.
        store.put_chunk_paced(&address(1), payload(1, len), &|_| PART).await.unwrap();
        assert_eq!(store.get_chunk(&address(1)).await.unwrap(), payload(1, len));
        let mut want = vec![(address(1), len as u64)];
        if committed {
            want.push((address(2), len as u64));
        }
        let mut chunks = store.list_chunks().await.unwrap();
        chunks.sort();
        want.sort();
        assert_eq!(chunks, want);
        assert_eq!(files(dir.path()).len(), 2 + usize::from(committed));
    });
}
