//! Progress bars on a terminal, nothing when stderr is not one (scripts, CI logs).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A byte progress bar labelled `label`, hidden unless stderr is a terminal and
/// `enabled` holds.
pub fn bytes_bar(label: &str, total: u64, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}
