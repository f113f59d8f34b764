//! The `tern` binary: `tern serve` runs a node; the other subcommands are its clients.

fn main() {
    if let Err(e) = tern::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
