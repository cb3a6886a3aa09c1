//! Progress of the long commands (`train`, `attack`, `eval`, `embed`, `experiment`) on stderr,
//! through `indicatif`: a bar with the rate and the ETA on a terminal; when stderr is not a
//! terminal (a log file, CI), no bar: a line at most once a minute while a phase runs (how far,
//! the rate, the ETA), and one when a phase (an epoch, an attack pass) ends. Nothing is written
//! to stdout, so `--json` output stays clean.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// One phase's progress, counted in `unit`s (images).
pub struct Progress {
    bar: ProgressBar,
    label: String,
    unit: &'static str,
    /// Units in the phase (a hidden bar keeps no length).
    total: u64,
    start: Instant,
    /// A one-line summary is printed at the end (stderr is not a terminal).
    summary_line: bool,
    /// Units done before this process started the phase (a resumed epoch): not in the rate.
    skipped: AtomicU64,
    /// When the last progress line was printed, in ms since `start` (no terminal only).
    last_line_ms: AtomicU64,
}

/// Without a terminal, a progress line at most this often: a log of a run whose epochs take an
/// hour shows that it is alive, how far it is and when it should end.
const LINE_EVERY: Duration = Duration::from_secs(60);

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
            total,
            start: Instant::now(),
            summary_line: !quiet && !tty,
            skipped: AtomicU64::new(0),
            last_line_ms: AtomicU64::new(0),
        }
    }

    /// Adds `n` units done before this process took the phase up (a resumed epoch): counted
    /// towards the total, not towards the rate.
    pub fn skip(&self, n: u64) {
        self.bar.inc(n);
        self.skipped.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` units done; without a terminal, prints a progress line when one is due.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if self.summary_line {
            self.line_if_due();
        }
    }

    fn line_if_due(&self) {
        let now = self.start.elapsed();
        let last = self.last_line_ms.load(Ordering::Relaxed);
        if !line_due(Duration::from_millis(last), now) {
            return;
        }
        let now_ms = now.as_millis() as u64;
        // One thread prints; another that raced it here finds the time moved on.
        if self
            .last_line_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let done = self.bar.position();
            let counts = Counts {
                done,
                total: self.total,
                skipped: self.skipped.load(Ordering::Relaxed),
            };
            let message = self.bar.message();
            eprintln!(
                "{}",
                progress_line(&self.label, counts, self.unit, now, &message)
            );
        }
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

/// A progress line is due when [`LINE_EVERY`] has passed since the last one (or the start).
fn line_due(last: Duration, now: Duration) -> bool {
    now.saturating_sub(last) >= LINE_EVERY
}

/// Units of one phase: done so far (`skipped` of them before this process), out of `total`.
#[derive(Clone, Copy)]
struct Counts {
    done: u64,
    total: u64,
    skipped: u64,
}

/// `epoch 2/8: 31744/119808 img (26%), 52.3 img/s, ETA 0:28:03, loss 0.0712`.
fn progress_line(label: &str, c: Counts, unit: &str, elapsed: Duration, message: &str) -> String {
    let percent = 100.0 * c.done as f64 / c.total.max(1) as f64;
    let rate = c.done.saturating_sub(c.skipped) as f64 / elapsed.as_secs_f64().max(1e-9);
    let eta = match rate > 0.0 {
        true => clock(c.total.saturating_sub(c.done) as f64 / rate),
        false => "unknown".to_string(),
    };
    let tail = match message.is_empty() {
        true => String::new(),
        false => format!(", {message}"),
    };
    format!(
        "{label}: {}/{} {unit} ({percent:.0}%), {rate:.1} {unit}/s, ETA {eta}{tail}",
        c.done, c.total
    )
}

/// Seconds as h:mm:ss.
fn clock(seconds: f64) -> String {
    let s = seconds.round().min(u64::MAX as f64) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_due_once_a_minute() {
        let s = Duration::from_secs;
        assert!(!line_due(s(0), s(59)));
        assert!(line_due(s(0), s(60)));
        assert!(!line_due(s(60), s(100)));
        assert!(line_due(s(60), s(121)));
        // A clock read before the last line (two threads) is never due.
        assert!(!line_due(s(120), s(100)));
    }

    #[test]
    fn the_line_counts_rate_and_eta_from_this_process_only() {
        // 1,000 of 4,000 images done, 200 of them by an earlier process, in 40 s: 20 img/s,
        // 3,000 left at that rate: 150 s.
        let counts = Counts {
            done: 1000,
            total: 4000,
            skipped: 200,
        };
        let line = progress_line(
            "epoch 2/8",
            counts,
            "img",
            Duration::from_secs(40),
            "loss 0.07",
        );
        assert_eq!(
            line,
            "epoch 2/8: 1000/4000 img (25%), 20.0 img/s, ETA 0:02:30, loss 0.07"
        );
        let none = Counts {
            done: 200,
            total: 4000,
            skipped: 200,
        };
        let line = progress_line("attack", none, "img", Duration::from_secs(5), "");
        assert_eq!(line, "attack: 200/4000 img (5%), 0.0 img/s, ETA unknown");
    }

    #[test]
    fn clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(0.4), "0:00:00");
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(clock(f64::MAX), clock(u64::MAX as f64));
    }
}
