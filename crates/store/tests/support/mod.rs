//! Test support shared by the store's integration tests: emulators and their setup,
//! backend environments, sample objects.

// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod azure;
pub mod emulator;
pub mod http;

use bytes::Bytes;
use tern_chunk::ChunkAddress;

/// Creates `bucket` on the moto S3 server at 127.0.0.1:`port` (moto accepts an unsigned
/// `PUT /bucket`).
pub fn create_bucket(port: u16, bucket: &str) {
    let (status, body) = http::request(port, "PUT", &format!("/{bucket}"), &[], b"")
        .unwrap_or_else(|e| panic!("creating moto bucket {bucket}: {e}"));
    assert_eq!(status, 200, "creating moto bucket {bucket}: {body}");
}

/// A runtime for one test; stores and emulators are shared only within a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// Azurite through the explicit endpoint (the way any Azure-compatible endpoint is
/// configured); `emulator_flag_reaches_azurite` covers AZURE_STORAGE_USE_EMULATOR.
/// Also used with a fake server or a closed port at `port`.
pub fn azurite_env(port: u16) -> Vec<(String, String)> {
    vec![
        ("AZURE_STORAGE_ACCOUNT_NAME".into(), azure::ACCOUNT.into()),
        ("AZURE_STORAGE_ACCOUNT_KEY".into(), azure::KEY.into()),
        ("AZURE_STORAGE_ENDPOINT".into(), format!("http://127.0.0.1:{port}/{}", azure::ACCOUNT)),
    ]
}

/// An S3 server at 127.0.0.1:`port`; moto accepts any credentials.
pub fn s3_env(port: u16) -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ENDPOINT_URL".into(), format!("http://127.0.0.1:{port}")),
    ]
}

/// A distinct chunk address per `n`, spread over shards.
pub fn address(n: u8) -> ChunkAddress {
    let mut bytes = [0u8; 32];
    bytes[0] = n;
    bytes[31] = n.wrapping_mul(37);
    ChunkAddress(bytes)
}

/// `len` bytes that differ per `n`.
pub fn payload(n: u8, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_add(n)).collect::<Vec<u8>>())
}

/// Reports a test skipped because an emulator is missing and TERN_SKIP_EMULATORS=1.
pub fn skipped(test: &str, skip: emulator::Skipped) {
    println!("SKIPPED {test}: {} (TERN_SKIP_EMULATORS=1)", skip.0);
}
