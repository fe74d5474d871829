//! A running `tern disk serve --json` or `tern points serve --json` (the NBD servers),
//! with the report it prints once ready; SIGKILLed on drop if still up.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub struct Serve {
    pub child: Child,
    pub report: serde_json::Value,
}

impl Serve {
    /// `tern COMMAND... --json ARGS...` (COMMAND `disk serve` or `points serve`), once
    /// it says it is ready.
    pub fn start(data: &Path, command: &[&str], args: &[&str]) -> Serve {
        let mut child = super::tern(data)
            .args(command)
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut text = String::new();
        // The report is one pretty-printed object: it ends with a line "}". Bounded by
        // the server printing it or exiting (end of stream).
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("tern {command:?} {args:?} exited before it was ready: {text}");
            }
            text.push_str(&line);
            if line == "}\n" {
                break;
            }
        }
        Serve { child, report: serde_json::from_str(&text).unwrap() }
    }

    /// Export `i`'s URI.
    pub fn uri(&self, i: usize) -> String {
        self.report["exports"][i]["uri"].as_str().unwrap().to_string()
    }

    /// Send `sig` and wait (bounded) for the server to exit.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: a signal to the child this test started.
        unsafe { libc_kill(self.child.id() as i32, sig) };
        super::wait_bounded(&mut self.child, Duration::from_secs(20)).expect("the server stops on a signal")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
