//! `exchange ca …` and `exchange cert verify`: a network CA for test and small
//! networks (rcgen through `exchange_core::ca`), and certificate checks.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use exchange_core::ca::{
    CertificateAuthority, CrlState, LeafSpec, RevokedSerial, Validity, read_crl,
};
use exchange_core::identity::{Certificate, KeyRole};
use exchange_core::{PartyUri, TrustError};

use crate::error::{CliError, Result};
use crate::files::{self, fmt_time};

/// How long a CRL stays fresh after it is issued.
const CRL_DAYS: u64 = 30;

fn crl_window(now: SystemTime) -> (SystemTime, SystemTime) {
    (
        now - Duration::from_secs(60),
        now + Duration::from_secs(CRL_DAYS * 86_400),
    )
}

/// The file in a subordinate CA's directory holding the certificates that
/// its parties' files carry after their leaf (the subordinate's own).
const CHAIN_FILE: &str = "chain.pem";

/// `ca init`: a new CA in `dir` (ca.pem, ca.key.pem, crl.pem); with
/// `issuer`, a subordinate CA signed by the CA in that directory (and
/// chain.pem).
pub(crate) fn init(
    dir: &Path,
    name: &str,
    days: u32,
    issuer: Option<&Path>,
    now: SystemTime,
) -> Result<()> {
    let (cert, key, crl, chain) = (
        dir.join("ca.pem"),
        dir.join("ca.key.pem"),
        dir.join("crl.pem"),
        dir.join(CHAIN_FILE),
    );
    for p in [&cert, &key, &crl, &chain] {
        if p.exists() {
            return Err(CliError::Exists(p.clone()));
        }
    }
    let validity = Validity::days_from(now, days);
    let ca = match issuer {
        None => CertificateAuthority::generate(name, validity)?,
        Some(parent_dir) => {
            if parent_dir.join(CHAIN_FILE).exists() {
                return Err(CliError::Usage(format!(
                    "{} is a subordinate CA (path length 0): it cannot sign another CA",
                    parent_dir.display()
                )));
            }
            load_ca(parent_dir)?.issue_subordinate(name, validity)?
        }
    };
    files::create_dir(dir)?;
    let (this, next) = crl_window(now);
    let crl_pem = ca.crl(
        &CrlState {
            number: 1,
            revoked: Vec::new(),
        },
        this,
        next,
    )?;
    files::write_new(&key, ca.key_pem().as_bytes(), true)?;
    files::write_new(&cert, ca.certificate_pem().as_bytes(), false)?;
    files::write_new(&crl, crl_pem.as_bytes(), false)?;
    if let Some(parent_dir) = issuer {
        files::write_new(&chain, ca.certificate_pem().as_bytes(), false)?;
        println!(
            "subordinate CA \"{name}\" created in {}, signed by the CA in {}",
            dir.display(),
            parent_dir.display()
        );
        println!(
            "  {}  its certificate: the parties it issues carry it after their leaf ({})",
            cert.display(),
            chain.display()
        );
        println!(
            "  the trust anchor stays {}; give parties both CRLs",
            parent_dir.join("ca.pem").display()
        );
    } else {
        println!("CA \"{name}\" created in {}", dir.display());
        println!("  {}  trust anchor: give it to every party", cert.display());
    }
    println!(
        "  {}  private key (mode 0600): keep it offline",
        key.display()
    );
    println!("  {}  CRL, fresh until {}", crl.display(), fmt_time(next));
    Ok(())
}

/// What a certificate issued by the CA in `dir` carries after its leaf: a
/// subordinate CA's chain.pem, nothing for a root.
fn issuer_chain(dir: &Path) -> Result<String> {
    let path = dir.join(CHAIN_FILE);
    if !path.exists() {
        return Ok(String::new());
    }
    String::from_utf8(files::read(&path)?)
        .map_err(|_| CliError::Usage(format!("{} is not PEM text", path.display())))
}

fn load_ca(dir: &Path) -> Result<CertificateAuthority> {
    let cert = files::read(&dir.join("ca.pem"))?;
    let key = files::read_secret(&dir.join("ca.key.pem"))?;
    let text = |b: &[u8], p: &str| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| CliError::Usage(format!("{}/{p} is not PEM text", dir.display())))
    };
    // The key is borrowed from its zeroizing buffer, not copied.
    let key = std::str::from_utf8(&key)
        .map_err(|_| CliError::Usage(format!("{}/ca.key.pem is not PEM text", dir.display())))?;
    Ok(CertificateAuthority::from_pem(
        &text(&cert, "ca.pem")?,
        key,
    )?)
}

/// `ca issue`: identity and encryption credentials for one party.
pub(crate) fn issue(
    ca_dir: &Path,
    party: &str,
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<Vec<PathBuf>> {
    let (party, paths) = issue_files(ca_dir, party, name, out, days, now)?;
    println!("issued {party} (\"{name}\") into {}", out.display());
    println!("  identity.pem / identity.key.pem      signs envelopes and receipts, TLS");
    println!(
        "  encryption.pem / encryption.key.pem  receives envelopes (give encryption.pem to senders)"
    );
    Ok(paths)
}

/// Writes a party's four credential files into `out` (nothing printed).
pub(crate) fn issue_files(
    ca_dir: &Path,
    party: &str,
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<(PartyUri, Vec<PathBuf>)> {
    let party = PartyUri::new(party)?;
    let ca = load_ca(ca_dir)?;
    let names = [
        "identity.pem",
        "identity.key.pem",
        "encryption.pem",
        "encryption.key.pem",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(CliError::Exists(p.clone()));
    }
    let creds = ca.issue_party(&party, name, Validity::days_from(now, days))?;
    let chain = issuer_chain(ca_dir)?;
    files::create_dir(out)?;
    files::write_new(&paths[1], creds.identity.key_pem.as_bytes(), true)?;
    files::write_new(
        &paths[0],
        (creds.identity.cert_pem + &chain).as_bytes(),
        false,
    )?;
    files::write_new(&paths[3], creds.encryption.key_pem.as_bytes(), true)?;
    files::write_new(
        &paths[2],
        (creds.encryption.cert_pem + &chain).as_bytes(),
        false,
    )?;
    Ok((party, paths))
}

/// `ca issue-client`: a local application's client certificate (identity
/// profile, named by a local URI such as urn:local:clinic:emr) for the
/// daemon's client service: `out/client.pem` and `out/client.key.pem`.
pub(crate) fn issue_client(
    ca_dir: &Path,
    client: &str,
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = issue_client_files(ca_dir, client, name, out, days, now)?;
    println!("issued client {client} (\"{name}\") into {}", out.display());
    println!(
        "  client.pem / client.key.pem  TLS client certificate for the daemon's client service"
    );
    println!(
        "  the daemon admits it once its configuration lists party = \"{client}\" under [[client]]"
    );
    Ok((cert, key))
}

/// Writes a client certificate and key into `out` (nothing printed).
pub(crate) fn issue_client_files(
    ca_dir: &Path,
    client: &str,
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf)> {
    let party = PartyUri::new(client)?;
    let ca = load_ca(ca_dir)?;
    let (cert, key) = (out.join("client.pem"), out.join("client.key.pem"));
    if let Some(p) = [&cert, &key].into_iter().find(|p| p.exists()) {
        return Err(CliError::Exists(p.clone()));
    }
    let issued = ca.issue_leaf(&LeafSpec {
        party: Some(party),
        name: name.to_owned(),
        role: KeyRole::Identity,
        validity: Validity::days_from(now, days),
    })?;
    let chain = issuer_chain(ca_dir)?;
    files::create_dir(out)?;
    files::write_new(&key, issued.key_pem.as_bytes(), true)?;
    files::write_new(&cert, (issued.cert_pem + &chain).as_bytes(), false)?;
    Ok((cert, key))
}

/// `ca issue-server`: a TLS server certificate for a daemon's client
/// listener, valid for the host names and addresses that local applications
/// dial (`out/server.pem`, `out/server.key.pem`), naming the facility's
/// party too when given (the `exchange` CLI pins it; stock gRPC clients
/// check the host name).
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_server(
    ca_dir: &Path,
    party: Option<&str>,
    dns: &[String],
    ips: &[std::net::IpAddr],
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = issue_server_files(ca_dir, party, dns, ips, name, out, days, now)?;
    let names: Vec<String> = dns
        .iter()
        .cloned()
        .chain(ips.iter().map(ToString::to_string))
        .collect();
    println!(
        "issued server certificate \"{name}\" into {}",
        out.display()
    );
    println!("  server.pem / server.key.pem  the client listener's TLS certificate");
    println!("  valid for: {}", names.join(", "));
    if let Some(party) = party {
        println!("  names the party {party} (for clients that pin it)");
    }
    println!(
        "  the daemon presents it once [listen] sets client_cert and client_key to these files"
    );
    Ok((cert, key))
}

/// Writes a server certificate and key into `out` (nothing printed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_server_files(
    ca_dir: &Path,
    party: Option<&str>,
    dns: &[String],
    ips: &[std::net::IpAddr],
    name: &str,
    out: &Path,
    days: u32,
    now: SystemTime,
) -> Result<(PathBuf, PathBuf)> {
    let party = party.map(PartyUri::new).transpose()?;
    let ca = load_ca(ca_dir)?;
    let (cert, key) = (out.join("server.pem"), out.join("server.key.pem"));
    if let Some(p) = [&cert, &key].into_iter().find(|p| p.exists()) {
        return Err(CliError::Exists(p.clone()));
    }
    let issued = ca.issue_tls_server(
        name,
        party.as_ref(),
        dns,
        ips,
        Validity::days_from(now, days),
    )?;
    files::create_dir(out)?;
    files::write_new(&key, issued.key_pem.as_bytes(), true)?;
    files::write_new(&cert, issued.cert_pem.as_bytes(), false)?;
    Ok((cert, key))
}

/// `ca revoke`: adds the certificate's serial to the CA's CRL.
pub(crate) fn revoke(ca_dir: &Path, cert_path: &Path, now: SystemTime) -> Result<()> {
    let ca = load_ca(ca_dir)?;
    let cert = first_cert(cert_path)?;
    // Only certificates this CA issued (valid chain at some point of their life).
    let trust = files::trust(&ca_dir.join("ca.pem"), None)?;
    let at = cert.not_before() + Duration::from_secs(1);
    let issued_here = match cert.key_role() {
        Some(KeyRole::Encryption) => trust.verify_encryption(&cert, at).map(drop),
        _ => trust
            .verify_identity(std::slice::from_ref(&cert), at)
            .map(drop),
    };
    if let Err(
        e @ exchange_core::Error::Trust(
            TrustError::UnknownIssuer | TrustError::BadCertificateSignature,
        ),
    ) = issued_here
    {
        return Err(CliError::About {
            what: format!("{} was not issued by this CA", cert_path.display()),
            source: e,
        });
    }
    let crl_path = ca_dir.join("crl.pem");
    let mut state = read_crl(&files::read(&crl_path)?)?;
    let serial =
        hex::decode(cert.serial_hex()).map_err(|_| CliError::Usage("bad serial".into()))?;
    if state.revoked.iter().any(|r| r.serial == serial) {
        println!(
            "{} (serial {}) is already revoked",
            cert_path.display(),
            cert.serial_hex()
        );
        return Ok(());
    }
    state.revoked.push(RevokedSerial {
        serial,
        revoked_at: now,
    });
    state.number += 1;
    let (this, next) = crl_window(now);
    files::write_atomic(&crl_path, ca.crl(&state, this, next)?.as_bytes())?;
    let who = cert
        .party()
        .map(ToString::to_string)
        .unwrap_or_else(|_| cert.subject().to_owned());
    println!(
        "revoked {who} (serial {}); {} now lists {} certificate(s), CRL number {}, fresh until {}",
        cert.serial_hex(),
        crl_path.display(),
        state.revoked.len(),
        state.number,
        fmt_time(next)
    );
    Ok(())
}

/// `ca crl`: re-issues the CRL with a fresh nextUpdate.
pub(crate) fn refresh_crl(ca_dir: &Path, now: SystemTime) -> Result<()> {
    let ca = load_ca(ca_dir)?;
    let crl_path = ca_dir.join("crl.pem");
    let mut state = read_crl(&files::read(&crl_path)?)?;
    state.number += 1;
    let (this, next) = crl_window(now);
    files::write_atomic(&crl_path, ca.crl(&state, this, next)?.as_bytes())?;
    println!(
        "{}: CRL number {}, {} revoked, fresh until {}",
        crl_path.display(),
        state.number,
        state.revoked.len(),
        fmt_time(next)
    );
    Ok(())
}

fn first_cert(path: &Path) -> Result<Certificate> {
    Certificate::from_pem(&files::read(path)?)
        .map_err(CliError::about(path.display().to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| CliError::Usage(format!("no certificate in {}", path.display())))
}

/// `cert verify`: validates an identity or encryption certificate and prints its party.
pub(crate) fn verify(
    trust_path: &Path,
    crl: Option<&Path>,
    at: SystemTime,
    cert_path: &Path,
) -> Result<()> {
    let trust = files::trust(trust_path, crl)?;
    let chain = Certificate::from_pem(&files::read(cert_path)?)
        .map_err(CliError::about(cert_path.display().to_string()))?;
    let leaf = &chain[0];
    let about = CliError::about(cert_path.display().to_string());
    let (party, role) = match leaf.key_role() {
        Some(KeyRole::Identity) => (
            trust
                .verify_identity(&chain, at)
                .map_err(about)?
                .party()
                .clone(),
            "identity",
        ),
        Some(KeyRole::Encryption) => (
            trust
                .verify_encryption_chain(&chain, at)
                .map_err(about)?
                .party()
                .clone(),
            "encryption",
        ),
        None => {
            return Err(about(
                TrustError::WrongKeyUsage("identity or encryption").into(),
            ));
        }
    };
    println!("{party}");
    println!(
        "  {role} certificate of {}, serial {}",
        leaf.common_name().unwrap_or(leaf.subject()),
        leaf.serial_hex()
    );
    println!(
        "  valid {} to {}; checked at {}{}",
        fmt_time(leaf.not_before()),
        fmt_time(leaf.not_after()),
        fmt_time(at),
        if crl.is_some() {
            ", against the CRL"
        } else {
            " (no CRL given: revocation not checked)"
        }
    );
    Ok(())
}
