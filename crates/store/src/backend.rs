//! Store URLs and the `object_store` backends they open
//! (docs/formats/store-layout.md, "URLs and environment").
//!
//! - `file:///abs/path`: a local folder (created if missing).
//! - `az://container/prefix`: Azure Blob Storage, credentials and endpoint from `AZURE_*`.
//! - `s3://bucket/prefix`: S3 or an S3-compatible store, from `AWS_*`.
//!
//! Remote backends send their requests through tern's HTTP client (`crate::http`), and
//! get bounded retries and timeouts (see [`retry_config`]): a
//! transient failure is retried a few times with a short backoff, and an unreachable
//! endpoint fails within seconds instead of hanging. The URL's path becomes a prefix
//! wrapped around the backend, so two stores can share a bucket without seeing each
//! other.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use url::{Host, Url};

use crate::error::{Error, ErrorKind, Result};
use crate::http::Connector;

/// The Azurite emulator's well-known account, published in Azurite's documentation.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The Azurite emulator's well-known account key (public, not a secret).
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const EMULATOR_DEFAULT_URL: &str = "http://127.0.0.1:10000";

/// Time to establish a TCP (and TLS) connection; an endpoint that does not answer in
/// this time is reported as transient after the retries.
const CONNECT_TIMEOUT: &str = "3s";
/// Time for a whole request, body included. Generous because one chunk (up to 64 MiB)
/// may travel over a slow or throttled link; override with `AWS_TIMEOUT`/`AZURE_TIMEOUT`.
const REQUEST_TIMEOUT: &str = "120s";

/// Retries for transient failures (5xx, 429, connection errors, timeouts of
/// idempotent requests): 3 retries with backoff 100 ms, 200 ms, 400 ms (jittered,
/// capped at 1 s), and never starting a retry more than 15 s after the first attempt.
pub(crate) fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
    }
}

/// Where a store URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Local(PathBuf),
    Azure { container: String, prefix: Option<Path> },
    S3 { bucket: String, prefix: Option<Path> },
}

/// Parse a store URL; errors say what is wrong and what a good URL looks like.
pub(crate) fn parse(url: &str) -> Result<Target> {
    let bad = |why: &str| Error::new(ErrorKind::InvalidInput, format!("store URL {url:?}: {why}"));
    let parsed = Url::parse(url).map_err(|e| {
        bad(&format!(
            "not a URL ({e}); expected file:///abs/path, az://container/prefix or s3://bucket/prefix"
        ))
    })?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("query strings and fragments are not supported"));
    }
    match parsed.scheme() {
        "file" => {
            // `file://dir/x` parses with host "dir": a relative path written as a URL.
            let local_host = matches!(parsed.host_str(), None | Some("") | Some("localhost"));
            if !local_host {
                return Err(bad("a file URL needs an absolute path with three slashes: file:///abs/path"));
            }
            let path = parsed
                .to_file_path()
                .map_err(|()| bad("not a local absolute path; expected file:///abs/path"))?;
            if !path.is_absolute() {
                return Err(bad("relative path; expected file:///abs/path"));
            }
            Ok(Target::Local(path))
        }
        scheme @ ("az" | "s3") => {
            let what = if scheme == "az" { "container" } else { "bucket" };
            if parsed.cannot_be_a_base() {
                return Err(bad(&format!("expected {scheme}://{what}/prefix")));
            }
            let name = parsed.host_str().unwrap_or("");
            if name.is_empty() {
                return Err(bad(&format!("missing {what} name; expected {scheme}://{what}/prefix")));
            }
            if parsed.port().is_some() || !parsed.username().is_empty() {
                return Err(bad(&format!(
                    "a port or user belongs in the environment, not in {scheme}://{what}/prefix"
                )));
            }
            let prefix = parse_prefix(parsed.path()).map_err(|why| bad(&why))?;
            let name = name.to_string();
            Ok(if scheme == "az" {
                Target::Azure { container: name, prefix }
            } else {
                Target::S3 { bucket: name, prefix }
            })
        }
        other => Err(bad(&format!("unsupported scheme {other:?}; supported: file, az, s3"))),
    }
}

fn parse_prefix(path: &str) -> Result<Option<Path>, String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.contains('%') {
        return Err("percent-encoded characters are not supported in the prefix".into());
    }
    Path::parse(trimmed).map(Some).map_err(|e| format!("bad prefix {trimmed:?}: {e}"))
}

/// The variables a store is configured from (the process environment by default).
#[derive(Debug, Clone, Default)]
pub(crate) struct Env(HashMap<String, String>);

impl Env {
    pub(crate) fn from_process() -> Env {
        Env::from_pairs(std::env::vars_os().filter_map(|(k, v)| {
            // Variables that are not UTF-8 cannot be configuration we understand.
            Some((k.into_string().ok()?, v.into_string().ok()?))
        }))
    }

    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Env {
        Env(pairs.into_iter().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
    }

    fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0.iter().filter(move |(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// How a backend takes a chunk in paced parts ([`crate::Store::put_chunk_paced`],
/// `crate::paced`).
#[derive(Debug, Clone)]
pub(crate) enum Parts {
    /// A local folder: parts are appended to a hidden staging file next to the object,
    /// which is then linked under its name create-only.
    Staged(Arc<LocalFileSystem>),
    /// Azure Blob, S3: one put, whose request body is sent in parts
    /// (`crate::paced::body`).
    Body,
}

/// Open the backend for `target`; `url` is only used in messages.
pub(crate) fn open(url: &str, target: &Target, env: &Env) -> Result<(Arc<dyn ObjectStore>, Parts)> {
    let failed = |e: object_store::Error| Error::new(ErrorKind::InvalidInput, format!("store {url}: {e}"));
    match target {
        Target::Local(path) => {
            std::fs::create_dir_all(path)
                .map_err(|e| Error::from_io(&e, url, &format_args!("creating {}", path.display())))?;
            let local = Arc::new(LocalFileSystem::new_with_prefix(path).map_err(failed)?);
            Ok((local.clone(), Parts::Staged(local)))
        }
        Target::Azure { container, prefix } => {
            check_azure_credentials(url, env)?;
            let builder = azure_builder(url, container, env)?;
            let azure = builder.build().map_err(failed)?;
            Ok((with_prefix(azure, prefix), Parts::Body))
        }
        Target::S3 { bucket, prefix } => {
            check_s3_credentials(url, env)?;
            let builder = s3_builder(url, bucket, env)?;
            let s3 = builder.build().map_err(failed)?;
            Ok((with_prefix(s3, prefix), Parts::Body))
        }
    }
}

/// Credentials for an S3 store must be in the environment (docs/stores.md): static keys,
/// a web identity token, or container credentials. Without them object_store would ask
/// the cloud's instance metadata address and fail with a refused connection that says
/// nothing of credentials; that source is used only when `TERN_S3_INSTANCE_CREDENTIALS=1`
/// says this host is a cloud instance with a role.
fn check_s3_credentials(url: &str, env: &Env) -> Result<()> {
    let (id, secret) = (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"));
    let missing = match (id, secret) {
        (Some(_), Some(_)) => return Ok(()),
        (Some(_), None) => "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",
        (None, Some(_)) => "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not",
        (None, None) => {
            let other = [
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            ];
            if other.iter().any(|k| env.get(k).is_some()) || env.flag("TERN_S3_INSTANCE_CREDENTIALS") {
                return Ok(());
            }
            "no S3 credentials in the environment"
        }
    };
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "store {url}: {missing}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN \
             for temporary keys; AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible server), or \
             TERN_S3_INSTANCE_CREDENTIALS=1 on a cloud instance with a role (see docs/stores.md)"
        ),
    ))
}

/// An Azure store needs an account and a credential from the environment (docs/stores.md),
/// or `AZURE_STORAGE_USE_EMULATOR=1` for Azurite.
fn check_azure_credentials(url: &str, env: &Env) -> Result<()> {
    if env.flag("AZURE_STORAGE_USE_EMULATOR") {
        return Ok(());
    }
    let account = env.get("AZURE_STORAGE_ACCOUNT_NAME").is_some();
    let credential = [
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_MASTER_KEY",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_TOKEN",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
    ]
    .iter()
    .any(|k| env.get(k).is_some())
        || env.flag("AZURE_USE_AZURE_CLI");
    let missing = match (account, credential) {
        (true, true) => return Ok(()),
        (false, _) => "AZURE_STORAGE_ACCOUNT_NAME is not set",
        (true, false) => "no credential for the account in the environment",
    };
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "store {url}: {missing}: set AZURE_STORAGE_ACCOUNT_NAME and one of AZURE_STORAGE_ACCOUNT_KEY, \
             AZURE_STORAGE_SAS_KEY, or AZURE_CLIENT_ID + AZURE_CLIENT_SECRET + AZURE_TENANT_ID \
             (AZURE_STORAGE_USE_EMULATOR=1 for Azurite; see docs/stores.md)"
        ),
    ))
}

fn with_prefix<S: ObjectStore>(store: S, prefix: &Option<Path>) -> Arc<dyn ObjectStore> {
    match prefix {
        Some(prefix) => Arc::new(PrefixStore::new(store, prefix.clone())),
        None => Arc::new(store),
    }
}

fn azure_builder(url: &str, container: &str, env: &Env) -> Result<MicrosoftAzureBuilder> {
    let mut builder = MicrosoftAzureBuilder::new()
        .with_http_connector(Connector)
        .with_retry(retry_config())
        .with_config(AzureConfigKey::Client(ClientConfigKey::ConnectTimeout), CONNECT_TIMEOUT)
        .with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), REQUEST_TIMEOUT);
    for (key, value) in env.with_prefix("AZURE_") {
        let Ok(config_key) = key.to_ascii_lowercase().parse::<AzureConfigKey>() else {
            continue;
        };
        // The URL names the container; the emulator is configured below so that its
        // endpoint comes from `env`, not from object_store reading the process environment.
        if matches!(config_key, AzureConfigKey::ContainerName | AzureConfigKey::UseEmulator) {
            continue;
        }
        builder = builder.with_config(config_key, value);
    }
    builder = builder.with_container_name(container);

    if env.flag("AZURE_STORAGE_USE_EMULATOR") {
        let account = env.get("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or(EMULATOR_ACCOUNT).to_string();
        let has_key =
            env.get("AZURE_STORAGE_ACCOUNT_KEY").is_some() || env.get("AZURE_STORAGE_ACCESS_KEY").is_some();
        if !has_key {
            builder = builder.with_access_key(EMULATOR_KEY);
        }
        let base = env.get("AZURITE_BLOB_STORAGE_URL").unwrap_or(EMULATOR_DEFAULT_URL);
        // Azurite serves accounts path-style: http://host:port/<account>/<container>.
        let endpoint = format!("{}/{account}", base.trim_end_matches('/'));
        builder = builder.with_account(account).with_endpoint(endpoint).with_allow_http(true);
    }

    let endpoint = builder.get_config_value(&AzureConfigKey::Endpoint);
    let allow_http = builder
        .get_config_value(&AzureConfigKey::Client(ClientConfigKey::AllowHttp))
        .is_some_and(|v| v == "true");
    if let Some(endpoint) = endpoint {
        if check_endpoint(url, &endpoint, "AZURE_STORAGE_ENDPOINT", allow_http, "AZURE_ALLOW_HTTP")? {
            builder = builder.with_allow_http(true);
        }
    }
    Ok(builder)
}

fn s3_builder(url: &str, bucket: &str, env: &Env) -> Result<AmazonS3Builder> {
    let mut builder = AmazonS3Builder::new()
        .with_http_connector(Connector)
        .with_retry(retry_config())
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), CONNECT_TIMEOUT)
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), REQUEST_TIMEOUT);
    for (key, value) in env.with_prefix("AWS_") {
        let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
            continue;
        };
        if matches!(config_key, AmazonS3ConfigKey::Bucket) {
            continue;
        }
        builder = builder.with_config(config_key, value);
    }
    builder = builder.with_bucket_name(bucket);

    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let allow_http = builder
        .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
        .is_some_and(|v| v == "true");
    if let Some(endpoint) = endpoint {
        if check_endpoint(url, &endpoint, "AWS_ENDPOINT_URL", allow_http, "AWS_ALLOW_HTTP")? {
            builder = builder.with_allow_http(true);
        }
    }
    Ok(builder)
}

/// Validate an explicit endpoint; `Ok(true)` when plain http must be allowed because
/// the endpoint is on this machine (an emulator), where TLS protects nothing.
fn check_endpoint(
    url: &str,
    endpoint: &str,
    endpoint_var: &str,
    allow_http: bool,
    allow_var: &str,
) -> Result<bool> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("store {url}: endpoint {endpoint:?} ({endpoint_var}): {why}"),
        )
    };
    let parsed = Url::parse(endpoint).map_err(|e| bad(format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => Ok(false),
        "http" => {
            let loopback = match parsed.host() {
                Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(Host::Ipv4(ip)) => ip.is_loopback(),
                Some(Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(true)
            } else if allow_http {
                Ok(false)
            } else {
                Err(bad(format!(
                    "plain http to another machine sends credentials and data unencrypted; \
                     use https, or set {allow_var}=true"
                )))
            }
        }
        other => Err(bad(format!("unsupported scheme {other:?}; use https"))),
    }
}

#[cfg(test)]
mod tests {

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn missing_credentials_are_named_before_any_request() {
        let s3 = |pairs: &[(&str, &str)]| check_s3_credentials("s3://b/p", &env(pairs));
        let e = s3(&[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let m = e.to_string();
        assert!(
            m.contains("no S3 credentials")
                && m.contains("AWS_ACCESS_KEY_ID")
                && m.contains("AWS_SECRET_ACCESS_KEY"),
            "{m}"
        );
        assert!(s3(&[("AWS_ACCESS_KEY_ID", "k")])
            .unwrap_err()
            .to_string()
            .contains("AWS_SECRET_ACCESS_KEY is not"));
        s3(&[("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")]).unwrap();
        s3(&[("TERN_S3_INSTANCE_CREDENTIALS", "1")]).unwrap();
        let az = |pairs: &[(&str, &str)]| check_azure_credentials("az://c/p", &env(pairs));
        let m = az(&[]).unwrap_err().to_string();
        assert!(
            m.contains("AZURE_STORAGE_ACCOUNT_NAME is not set") && m.contains("AZURE_STORAGE_ACCOUNT_KEY"),
            "{m}"
        );
        let m = az(&[("AZURE_STORAGE_ACCOUNT_NAME", "a")]).unwrap_err().to_string();
        assert!(m.contains("no credential"), "{m}");
        az(&[("AZURE_STORAGE_ACCOUNT_NAME", "a"), ("AZURE_STORAGE_ACCOUNT_KEY", "k")]).unwrap();
        az(&[("AZURE_STORAGE_USE_EMULATOR", "true")]).unwrap();
        // Through the one entry point: no request is made, the store does not open.
        let e = crate::Store::open_with_env("s3://bucket/x", Vec::new()).unwrap_err();
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
    }

    use super::*;

    fn err(url: &str) -> String {
        let e = parse(url).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
        e.to_string()
    }

    #[test]
    fn good_urls() {
        assert_eq!(parse("file:///var/lib/tern/store").unwrap(), Target::Local("/var/lib/tern/store".into()));
        assert_eq!(
            parse("az://backups/tern/prod/").unwrap(),
            Target::Azure { container: "backups".into(), prefix: Some(Path::from("tern/prod")) }
        );
        assert_eq!(parse("s3://bucket").unwrap(), Target::S3 { bucket: "bucket".into(), prefix: None });
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(err("gs://b/p").contains("unsupported scheme \"gs\""));
        assert!(err("file://relative/dir").contains("absolute path"));
        assert!(err("relative/dir").contains("not a URL"));
        assert!(err("s3:///prefix").contains("missing bucket"));
        assert!(err("az://").contains("missing container"));
        assert!(err("s3://b/a//c").contains("bad prefix"));
        assert!(err("s3://b/x?y=1").contains("query"));
        assert!(err("s3://b:9000/x").contains("port"));
        assert!(err("gs://b/p").contains("store URL \"gs://b/p\""));
    }

    #[test]
    fn http_endpoints_only_on_loopback_unless_allowed() {
        assert!(check_endpoint("s3://b", "http://127.0.0.1:9000", "E", false, "A").unwrap());
        assert!(check_endpoint("s3://b", "http://localhost:9000", "E", false, "A").unwrap());
        assert!(check_endpoint("s3://b", "http://[::1]:9000", "E", false, "A").unwrap());
        assert!(!check_endpoint("s3://b", "https://s3.example", "E", false, "A").unwrap());
        let e = check_endpoint("s3://b", "http://10.1.2.3", "E", false, "A").unwrap_err();
        assert!(e.to_string().contains("set A=true"), "{e}");
        assert!(!check_endpoint("s3://b", "http://10.1.2.3", "E", true, "A").unwrap());
    }
}
