//! The `robust-dml` program; see `robust-dml --help`.

fn main() {
    // Before any thread or GPU instance exists: Mesa prints an alarming "XDG_RUNTIME_DIR is
    // invalid or not set" otherwise.
    robust_dml::cli::ensure_runtime_dir();
    robust_dml::engine::cpu::tune_allocator();
    let cli = robust_dml::cli::parse();
    if let Err(e) = robust_dml::cli::run(cli) {
        eprintln!("error: {e}");
        // Stopped by a signal after saving: the shell's code for that signal (128 + its number).
        let code = match e {
            robust_dml::error::Error::Interrupted { signal, .. } => 128 + signal,
            _ => 1,
        };
        std::process::exit(code);
    }
}
