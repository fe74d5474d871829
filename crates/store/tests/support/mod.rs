//! Test support shared by the store's integration tests: emulators and their setup.

pub mod azure;
pub mod emulator;
pub mod http;

/// Creates `bucket` on the moto S3 server at 127.0.0.1:`port` (moto accepts an unsigned
/// `PUT /bucket`).
pub fn create_bucket(port: u16, bucket: &str) {
    let (status, body) = http::request(port, "PUT", &format!("/{bucket}"), &[], b"")
        .unwrap_or_else(|e| panic!("creating moto bucket {bucket}: {e}"));
    assert_eq!(status, 200, "creating moto bucket {bucket}: {body}");
}
