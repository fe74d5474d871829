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

/// An emulated remote backend, for tests that run the same case against Azure and S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    Azurite,
    Moto,
}

impl Remote {
    /// The emulator, with a container or bucket named "tern"; `None` when skipped.
    pub fn start(self) -> Option<emulator::Emulator> {
        let started = match self {
            Remote::Azurite => emulator::azurite(),
            Remote::Moto => emulator::moto(),
        };
        let emulator = match started {
            Ok(emulator) => emulator,
            Err(skip) => {
                skipped(self.name(), skip);
                return None;
            }
        };
        match self {
            Remote::Azurite => azure::create_container(emulator.port, "tern"),
            Remote::Moto => create_bucket(emulator.port, "tern"),
        }
        Some(emulator)
    }

    /// A store under `prefix` in "tern", reached at `port` (the emulator's, or a proxy's
    /// in front of it), with `extra` settings added to the environment.
    pub fn open(self, port: u16, prefix: &str, extra: &[(&str, &str)]) -> tern_store::Store {
        let (url, mut env) = match self {
            Remote::Azurite => (format!("az://tern/{prefix}"), azurite_env(port)),
            Remote::Moto => (format!("s3://tern/{prefix}"), s3_env(port)),
        };
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        tern_store::Store::open_with_env(&url, env).expect("opening the store")
    }

    pub fn name(self) -> &'static str {
        match self {
            Remote::Azurite => "azurite",
            Remote::Moto => "moto",
        }
    }
}
