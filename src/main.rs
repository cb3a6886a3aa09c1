//! The `robust-dml` program; see `robust-dml --help`.

use clap::Parser;

fn main() {
    let cli = robust_dml::cli::Cli::parse();
    if let Err(e) = robust_dml::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
