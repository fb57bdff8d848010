//! Loading credentials and trust, and writing outputs so that nothing is ever
//! half-written: every output goes to a temporary file in the destination
//! directory, is flushed to disk, and is renamed into place only when complete.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use exchange_core::identity::{DecryptionKey, Identity};
use exchange_core::trust::TrustStore;
use indicatif::{ProgressBar, ProgressStyle};
use tempfile::NamedTempFile;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use crate::error::{CliError, Result};

/// Inputs larger than this show a progress bar (on a terminal).
const PROGRESS_THRESHOLD: u64 = 8 << 20;

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a private key file into a buffer that is zeroized when dropped.
pub(crate) fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    read(path).map(Zeroizing::new)
}

/// Opens a file for reading.
pub(crate) fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Write {
        path: path.to_owned(),
        source,
    }
}

/// The directory a file will be written in.
pub(crate) fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// A temporary file next to `dest`, to be renamed onto it by [`publish`].
pub(crate) fn temp_for(dest: &Path) -> Result<NamedTempFile> {
    NamedTempFile::new_in(dir_of(dest)).map_err(write_err(dest))
}

/// Flushes `tmp` to disk and renames it onto `dest` (replacing it).
pub(crate) fn publish(tmp: NamedTempFile, dest: &Path) -> Result<()> {
    tmp.as_file().sync_all().map_err(write_err(dest))?;
    tmp.persist(dest).map_err(|e| CliError::Write {
        path: dest.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Writes `data` to `dest` atomically, replacing any previous file.
pub(crate) fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = temp_for(dest)?;
    tmp.write_all(data).map_err(write_err(dest))?;
    publish(tmp, dest)
}

/// Writes `data` to a new file `dest`; fails if it exists. `secret` files are mode 0600.
pub(crate) fn write_new(dest: &Path, data: &[u8], secret: bool) -> Result<()> {
    if dest.exists() {
        return Err(CliError::Exists(dest.to_owned()));
    }
    let mut tmp = temp_for(dest)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if secret { 0o600 } else { 0o644 };
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
            .map_err(write_err(dest))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    tmp.write_all(data).map_err(write_err(dest))?;
    tmp.as_file().sync_all().map_err(write_err(dest))?;
    tmp.persist_noclobber(dest).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::Exists(dest.to_owned())
        } else {
            CliError::Write {
                path: dest.to_owned(),
                source: e.error,
            }
        }
    })?;
    Ok(())
}

/// Creates a directory (and parents).
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(write_err(dir))
}

/// Trust anchors from `ca` (PEM), plus CRLs from `crl` if given.
pub(crate) fn trust(ca: &Path, crl: Option<&Path>) -> Result<TrustStore> {
    let mut b = TrustStore::builder()
        .anchors_pem(&read(ca)?)
        .map_err(CliError::about(ca.display().to_string()))?;
    if let Some(crl) = crl {
        b = b
            .crls_pem(&read(crl)?)
            .map_err(CliError::about(crl.display().to_string()))?;
    }
    Ok(b.build()?)
}

/// The identity in `dir` (identity.pem + identity.key.pem).
pub(crate) fn identity(dir: &Path) -> Result<Identity> {
    let cert = dir.join("identity.pem");
    let key = dir.join("identity.key.pem");
    Identity::from_pem(&read(&cert)?, &read_secret(&key)?)
        .map_err(CliError::about(format!("identity in {}", dir.display())))
}

/// Every decryption key in `dir`: `encryption.pem` with `encryption.key.pem`,
/// and rotated ones `encryption-<tag>.pem` with `encryption-<tag>.key.pem`.
pub(crate) fn decryption_keys(dir: &Path) -> Result<Vec<DecryptionKey>> {
    let entries = fs::read_dir(dir).map_err(|source| CliError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("encryption") && n.ends_with(".pem") && !n.ends_with(".key.pem"))
        .collect();
    names.sort();
    // The current key first.
    names.sort_by_key(|n| n != "encryption.pem");
    let mut keys = Vec::new();
    for name in names {
        let cert = dir.join(&name);
        let key = dir.join(name.replace(".pem", ".key.pem"));
        keys.push(
            DecryptionKey::from_pem(&read(&cert)?, &read_secret(&key)?)
                .map_err(CliError::about(cert.display().to_string()))?,
        );
    }
    if keys.is_empty() {
        return Err(CliError::Usage(format!(
            "no encryption.pem in {}",
            dir.display()
        )));
    }
    Ok(keys)
}

/// A random number generator from the operating system.
pub(crate) fn rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

/// RFC 3339 in UTC, to the millisecond (the precision of envelope and receipt
/// times), always with three fractional digits so that the width is fixed
/// (`2026-11-27T09:31:21.490Z`): the `--json` outputs promise this form.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses an RFC 3339 time.
pub(crate) fn parse_time(s: &str) -> Result<SystemTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| {
            CliError::Usage(format!(
                "invalid time {s:?} (RFC 3339, e.g. 2026-06-01T09:00:00+09:00): {e}"
            ))
        })
}

/// Parses `30m`, `12h`, `7d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || CliError::Usage(format!("invalid duration {s:?} (e.g. 30m, 12h, 7d)"));
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?))
}

/// A progress bar on stderr for large transfers, only when stderr is a terminal.
pub(crate) fn progress(total: u64, what: &str) -> Option<ProgressBar> {
    progress_over(total, PROGRESS_THRESHOLD, what)
}

/// A progress bar on stderr when `total` exceeds `threshold` and stderr is a terminal.
pub(crate) fn progress_over(total: u64, threshold: u64, what: &str) -> Option<ProgressBar> {
    use std::io::IsTerminal;
    if total <= threshold || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    Some(bar)
}

/// Human-readable byte count.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {} ({n} bytes)", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_always_have_three_fractional_digits_and_parse_back() {
        for (ms, want) in [
            (1_795_771_881_490, "2026-11-27T09:31:21.490Z"),
            (1_795_771_881_000, "2026-11-27T09:31:21.000Z"),
            (1_795_771_881_007, "2026-11-27T09:31:21.007Z"),
            (0, "1970-01-01T00:00:00.000Z"),
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let s = fmt_time(t);
            assert_eq!(s, want);
            assert_eq!(parse_time(&s).unwrap(), t, "{s} parses back");
        }
    }
}
