//! Progress of the long commands (`train`, `attack`, `eval`, `embed`, `experiment`) on stderr,
//! through `indicatif`: a bar with the rate and the ETA on a terminal; when stderr is not a
//! terminal (a log file, CI), no bar, only one line when a phase (an epoch, an attack pass)
//! ends. Nothing is written to stdout, so `--json` output stays clean.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// One phase's progress, counted in `unit`s (images).
pub struct Progress {
    bar: ProgressBar,
    label: String,
    unit: &'static str,
    start: Instant,
    /// A one-line summary is printed at the end (stderr is not a terminal).
    summary_line: bool,
}

impl Progress {
    /// A bar for `total` units; `quiet` silences it entirely (the summary line too).
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str, quiet: bool) -> Self {
        let label = label.into();
        let tty = std::io::stderr().is_terminal();
        let bar = if quiet || !tty {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!(
                "{{prefix}} [{{bar:24}}] {{pos}}/{{len}} {unit} {{rate}} ETA {{eta}} {{msg}}"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                // indicatif's own {per_sec} prints four decimals.
                let rate = move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1} {unit}/s", s.per_sec());
                };
                bar.set_style(style.with_key("rate", rate).progress_chars("=> "));
            }
            bar.set_prefix(label.clone());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        };
        Progress {
            bar,
            label,
            unit,
            start: Instant::now(),
            summary_line: !quiet && !tty,
        }
    }

    /// Adds `n` units done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Shows a short status after the rate (e.g. the last loss).
    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// Ends the phase: the bar stays on screen as it is; without a terminal, one line with
    /// the count, the time and the rate, and `extra` (e.g. the mean loss).
    pub fn finish(self, extra: &str) {
        self.bar.finish();
        if !self.bar.is_hidden() {
            // The finished bar stays; what comes next starts on its own line.
            eprintln!();
        }
        if self.summary_line {
            let seconds = self.start.elapsed().as_secs_f64();
            let done = self.bar.position();
            eprintln!(
                "{}: {done} {} in {seconds:.1}s ({:.1} {}/s){}{extra}",
                self.label,
                self.unit,
                done as f64 / seconds.max(1e-9),
                self.unit,
                if extra.is_empty() { "" } else { ", " },
            );
        }
    }
}
