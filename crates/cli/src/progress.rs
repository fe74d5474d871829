//! Progress bars on a terminal, nothing when stderr is not one (scripts, CI logs).

use std::fmt::Write as _;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use tern_types::ByteSize;

/// A byte progress bar labelled `label`, hidden unless stderr is a terminal and
/// `enabled` holds. The rate is shown in bytes per second and in Mbps, the unit
/// bandwidth limits are given in.
pub fn bytes_bar(label: &str, total: u64, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {bytes}/{total_bytes} {rate} eta {eta}")
            .expect("valid template")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&rate_text(s.per_sec()));
            })
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// A rate as `5.7 MiB/s (47.8 Mbps)`: bytes as the sizes are shown, bits with
/// decimal prefixes as limits are given (1 Mbps = 1,000,000 bit/s).
pub fn rate_text(bytes_per_sec: f64) -> String {
    let mut s = format!("{}/s", ByteSize(bytes_per_sec.max(0.0) as u64));
    let mbps = bytes_per_sec * 8.0 / 1e6;
    let _ = write!(s, " ({mbps:.1} Mbps)");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_show_bytes_and_megabits() {
        assert_eq!(super::rate_text(6_250_000.0), "6.0 MiB/s (50.0 Mbps)");
    }
}
