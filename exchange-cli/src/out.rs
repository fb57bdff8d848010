//! Standard output as a Unix tool uses it: when the reader of a pipe goes
//! away (`exchange inbox --json | head -c 100`), the command ends quietly,
//! with no message and exit status [`CLOSED_PIPE_STATUS`], as `cat` and
//! `grep` end (killed by SIGPIPE, which a shell reports as 141). The crate's
//! `println!` and `print!` are the macros in `main.rs` that write through
//! here; any other write to stdout goes through [`PipeAware`].
//!
//! A closed pipe unwinds the stack to `main` (so temporary files and
//! directories are removed on the way) without running the panic hook, so
//! nothing is printed.

use std::fmt;
use std::io::{self, Write};

/// Exit status when standard output was closed by its reader: 128 + SIGPIPE,
/// what a shell reports for `cat` or `grep` in the same place.
pub(crate) const CLOSED_PIPE_STATUS: u8 = 141;

/// The unwinding payload that marks a closed standard output.
pub(crate) struct ClosedPipe;

/// Ends the command: its standard output is gone.
fn closed() -> ! {
    std::panic::resume_unwind(Box::new(ClosedPipe))
}

/// Handles a failed write to standard output: a closed pipe ends the
/// command quietly; any other error (a full disk behind a redirection) ends
/// it with one `error:` line and status 1.
fn failed(e: &io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        closed()
    }
    let _ = writeln!(io::stderr(), "error: cannot write to standard output: {e}");
    std::process::exit(1)
}

/// `print!` with a closed pipe handled.
pub(crate) fn write(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        failed(&e)
    }
}

/// `println!` with a closed pipe handled.
pub(crate) fn write_line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        failed(&e)
    }
}

/// `eprintln!` that never panics: a closed standard error loses the message.
pub(crate) fn write_err_line(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// A writer over standard output (or anything) whose closed pipe ends the
/// command quietly, as [`write()`] does.
pub(crate) struct PipeAware<W>(pub(crate) W);

impl<W: Write> Write for PipeAware<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => closed(),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => closed(),
            other => other,
        }
    }
}

/// Runs the command; `Err(status)` when its standard output was closed by
/// the reader. Any other panic goes on unwinding.
pub(crate) fn catching_closed_pipe<T>(f: impl FnOnce() -> T) -> Result<T, u8> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) if payload.is::<ClosedPipe>() => Err(CLOSED_PIPE_STATUS),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}
