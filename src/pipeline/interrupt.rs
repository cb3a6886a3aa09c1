//! SIGTERM and SIGINT during training: the step in progress finishes, the checkpoint of that
//! step is written, and the command ends with an error that says how to resume and exits with
//! 128 + the signal's number. Without this, a job scheduler's SIGTERM (Slurm before a time
//! limit, `timeout`, a shutdown) or a Ctrl-C lost everything since the last checkpoint, up to
//! `--checkpoint-minutes` of training. A second signal stops the process at once.
//!
//! Only while training ([`Deferred`]) and only once the program opted in ([`enable`]): outside
//! training (evaluation, attacks) nothing could be saved, so the signals keep their default
//! action there, and a library user's own signal handling is left alone. A signal the process
//! was started ignoring stays ignored (a script's `robust-dml ... &` ignores the Ctrl-C meant
//! for the script), as in most programs that handle Ctrl-C.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Set by [`enable`]: training defers the signals.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The signal received during training and not yet acted on (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);

/// Lets training defer SIGTERM and SIGINT (the command-line program calls this).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// The signal received since the last call, if any; training saves and stops on it.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// A signal's name for messages.
pub fn signal_name(signal: i32) -> String {
    match signal {
        15 => "SIGTERM".into(),
        2 => "SIGINT".into(),
        n => format!("signal {n}"),
    }
}

/// While alive, SIGTERM and SIGINT are noted for [`take`] instead of ending the process (when
/// [`enable`]d). When dropped, the default actions return, and a signal that arrived after
/// training last looked ends the process then, as it would have without the deferral.
pub struct Deferred {
    installed: bool,
}

impl Deferred {
    pub fn begin() -> Deferred {
        let installed = ENABLED.load(Ordering::SeqCst) && os::install();
        Deferred { installed }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if self.installed {
            os::restore();
            if let Some(signal) = take() {
                os::raise(signal);
            }
        }
    }
}

#[cfg(unix)]
mod os {
    use super::PENDING;
    use std::sync::atomic::{AtomicBool, Ordering};

    const SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];
    /// Which of [`SIGNALS`] [`install`] handles (not ignored when training began).
    static HANDLED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

    /// Only async-signal-safe calls: an atomic swap, and for a second signal `signal` and
    /// `raise`.
    extern "C" fn on_signal(signal: libc::c_int) {
        if PENDING.swap(signal, Ordering::SeqCst) != 0 {
            // SAFETY: restoring the default action and raising are async-signal-safe.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
        }
    }

    /// Handles each of [`SIGNALS`] that is not ignored; true when any is handled.
    pub(super) fn install() -> bool {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        let mut any = false;
        for (&s, handled) in SIGNALS.iter().zip(&HANDLED) {
            // SAFETY: the handler only touches an atomic (above); an ignored signal is put
            // back to ignored at once.
            let previous = unsafe { libc::signal(s, handler) };
            let ignored = previous == libc::SIG_IGN;
            if ignored {
                unsafe { libc::signal(s, libc::SIG_IGN) };
            }
            let ok = previous != libc::SIG_ERR && !ignored;
            handled.store(ok, Ordering::SeqCst);
            any |= ok;
        }
        any
    }

    pub(super) fn restore() {
        for (&s, handled) in SIGNALS.iter().zip(&HANDLED) {
            if handled.swap(false, Ordering::SeqCst) {
                // SAFETY: restores the default action.
                unsafe {
                    libc::signal(s, libc::SIG_DFL);
                }
            }
        }
    }

    pub(super) fn raise(signal: i32) {
        // SAFETY: the default action is back, so this ends the process as the signal would.
        unsafe {
            libc::raise(signal);
        }
    }
}

#[cfg(not(unix))]
mod os {
    pub(super) fn install() -> bool {
        false
    }
    pub(super) fn restore() {}
    pub(super) fn raise(_signal: i32) {}
}
