//! The `ouroc` command line: parses flags, wires the stages, prints.

/// `print!` that returns an error from the enclosing function instead of panicking when stdout
/// cannot be written (a full disk, `> /dev/full`); a closed pipe (`| head`) ends output quietly.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::commands::write_stdout(format_args!($($t)*))?
    };
}

/// `println!` as [`out!`].
macro_rules! outln {
    () => {
        $crate::commands::write_stdout(format_args!("\n"))?
    };
    ($($t:tt)*) => {
        $crate::commands::write_stdout(format_args!("{}\n", format_args!($($t)*)))?
    };
}

mod cli;
mod commands;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
