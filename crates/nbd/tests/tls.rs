//! STARTTLS as qemu and libnbd speak it: a server with TLS configured refuses plain
//! clients, serves nbdinfo and qemu-img over TLS, and with a client CA requires their
//! certificates. Keys and certificates are made with openssl for each run.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use support::{bounded, ok, pattern, tool, Tern};
use tern_nbd::{Export, FileExport, ServerOptions};

/// A CA, a server certificate for `localhost` and a client certificate, laid out as
/// qemu's `tls-creds-x509` and libnbd's `tls-certificates` folders want them.
fn pki(dir: &Path) {
    let ssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tern test CA",
    ]);
    for (who, ext) in [
        ("server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{who}.ext")), format!("basicConstraints=CA:FALSE\n{ext}\n"))
            .unwrap();
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{who}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

fn serve(dir: &Path, img: &Path, client_ca: bool) -> Tern {
    let export: Arc<dyn Export> = Arc::new(FileExport::open(img, false).unwrap());
    let mut options = ServerOptions::new(vec![("d".into(), export)]);
    let ca = dir.join("ca-cert.pem");
    options.tls = Some(
        tern_nbd::tls_server_config(
            &dir.join("server-cert.pem"),
            &dir.join("server-key.pem"),
            client_ca.then_some(ca.as_path()),
        )
        .unwrap(),
    );
    let sockdir = dir.join(if client_ca { "mtls" } else { "tls" });
    std::fs::create_dir_all(&sockdir).unwrap();
    Tern::start_with(&sockdir, options)
}

#[test]
fn nbdinfo_and_qemu_img_over_tls_and_plain_clients_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d);
    // libnbd's folder for a client without a certificate: the CA only.
    let anon = d.join("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(d.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let img = d.join("d.raw");
    std::fs::write(&img, pattern(4 << 20, 5)).unwrap();
    let tern = serve(d, &img, false);
    let sock = tern.socket.display().to_string();

    let plain = bounded(tool("nbdinfo").arg("--size").arg(tern.uri("d")), std::time::Duration::from_secs(60));
    assert!(!plain.status.success(), "a plain client was served");
    let uri =
        format!("nbds+unix:///d?socket={sock}&tls-certificates={}&tls-hostname=localhost", anon.display());
    assert_eq!(ok(tool("nbdinfo").arg("--size").arg(&uri)).trim(), (4u64 << 20).to_string());

    let out = d.join("out.raw");
    ok(tool("qemu-img")
        .args(["convert", "-O", "raw", "--object"])
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", anon.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={sock},export=d,tls-creds=tls0,tls-hostname=localhost"
        ))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == pattern(4 << 20, 5));
    // Writes over TLS (one request at a time on a TLS connection).
    ok(tool("qemu-io")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", anon.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={sock},export=d,tls-creds=tls0,tls-hostname=localhost"
        ))
        .args(["-c", "write -P 0x77 1M 256k", "-c", "read -P 0x77 1M 256k"]));
    assert!(std::fs::read(&img).unwrap()[1 << 20..(1 << 20) + (256 << 10)].iter().all(|&b| b == 0x77));
}

#[test]
fn a_client_ca_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d);
    let anon = d.join("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(d.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    // The folder with ca-cert.pem, client-cert.pem and client-key.pem.
    let img = d.join("d.raw");
    std::fs::write(&img, pattern(1 << 20, 6)).unwrap();
    let tern = serve(d, &img, true);
    let sock = tern.socket.display().to_string();
    let with =
        format!("nbds+unix:///d?socket={sock}&tls-certificates={}&tls-hostname=localhost", d.display());
    assert_eq!(ok(tool("nbdinfo").arg("--size").arg(&with)).trim(), (1u64 << 20).to_string());
    let without =
        format!("nbds+unix:///d?socket={sock}&tls-certificates={}&tls-hostname=localhost", anon.display());
    let r = bounded(tool("nbdinfo").arg("--size").arg(&without), std::time::Duration::from_secs(60));
    assert!(!r.status.success(), "a client without a certificate was served");
}
