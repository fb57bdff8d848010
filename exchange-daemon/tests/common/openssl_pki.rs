//! A two-level PKI made by the openssl command line, as a regional network
//! brings it: a root, an intermediate with pathlen 0, party and client
//! certificates issued by `openssl ca` with the exchange's profiles, PEM files
//! holding the leaf then the intermediate, revocations, and CRLs from
//! `openssl ca -gencrl` for both CAs.
//!
//! Shared by the daemon's and the CLI's tests (the CLI includes this file by
//! path); it needs only std.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the openssl command line is installed. When it is not, the
/// caller prints why it skips and returns.
pub fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs openssl in `dir`, panicking with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("openssl");
    // The configuration reads PARTY when it loads, whatever it issues.
    cmd.current_dir(dir)
        .args(args)
        .env("PARTY", "urn:invalid:unset");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `openssl ca` configuration of one CA directory: its database, and the
/// extension sections of what it issues (the exchange's profiles).
fn ca_config(dir: &Path) -> String {
    format!(
        r#"[ ca ]
default_ca = CA_default

[ CA_default ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/ca.pem
private_key = $dir/ca.key.pem
default_md = sha256
default_days = 30
default_crl_days = 7
policy = policy_any
unique_subject = no
copy_extensions = none
crl_extensions = crl_ext

[ policy_any ]
commonName = supplied

[ crl_ext ]
authorityKeyIdentifier = keyid:always

[ intermediate ]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ identity ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth, serverAuth
subjectAltName = URI:${{ENV::PARTY}}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ encryption ]
basicConstraints = critical, CA:false
keyUsage = critical, keyAgreement
subjectAltName = URI:${{ENV::PARTY}}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"#,
        dir = dir.display()
    )
}

/// One CA directory managed by `openssl ca`.
fn init_ca_dir(dir: &Path) {
    std::fs::create_dir_all(dir.join("newcerts")).unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    std::fs::write(dir.join("crlnumber"), "01\n").unwrap();
    std::fs::write(dir.join("ca.cnf"), ca_config(dir)).unwrap();
}

/// A root and an intermediate CA, and what they issued, in one directory.
pub struct OpensslPki {
    /// Everything lives here.
    pub dir: PathBuf,
}

impl OpensslPki {
    /// Creates the root (`root/ca.pem`, the trust anchor) and the
    /// intermediate (`inter/ca.pem`, pathlen 0) and both CRLs.
    pub fn new(dir: &Path) -> Self {
        let root = dir.join("root");
        let inter = dir.join("inter");
        init_ca_dir(&root);
        init_ca_dir(&inter);
        openssl(
            &root,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key.pem",
                "-out",
                "ca.pem",
                "-days",
                "60",
                "-subj",
                "/O=Regional Health Network/CN=Regional Root CA",
                "-addext",
                "basicConstraints=critical,CA:true",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            &[],
        );
        openssl(
            &inter,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key.pem",
                "-out",
                "ca.csr",
                "-subj",
                "/CN=Regional Issuing CA 1",
            ],
            &[],
        );
        openssl(
            &root,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-extensions",
                "intermediate",
                "-notext",
                "-in",
                "../inter/ca.csr",
                "-out",
                "../inter/ca.pem",
            ],
            &[],
        );
        let pki = Self {
            dir: dir.to_owned(),
        };
        pki.write_crls();
        pki
    }

    /// The trust anchor (the root certificate).
    pub fn anchor(&self) -> PathBuf {
        self.dir.join("root/ca.pem")
    }

    /// The root's and the intermediate's CRLs, in one PEM file.
    pub fn crls(&self) -> PathBuf {
        self.dir.join("crls.pem")
    }

    /// Re-issues both CRLs with `openssl ca -gencrl` and writes `crls.pem`.
    pub fn write_crls(&self) {
        let mut all = String::new();
        for ca in ["root", "inter"] {
            let d = self.dir.join(ca);
            openssl(
                &d,
                &[
                    "ca", "-batch", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem",
                ],
                &[],
            );
            all.push_str(&std::fs::read_to_string(d.join("crl.pem")).unwrap());
        }
        std::fs::write(self.crls(), all).unwrap();
    }

    /// Issues one leaf from the intermediate with `profile` (identity or
    /// encryption) naming `uri`; writes `<out>/<stem>.pem` (leaf then
    /// intermediate), `<out>/<stem>.key.pem` (PKCS#8) and the leaf alone as
    /// `<out>/<stem>.leaf.crt` (not `.pem`: `exchange open` reads every
    /// `encryption*.pem` of a directory as a key).
    pub fn issue(&self, out: &Path, stem: &str, profile: &str, uri: &str, name: &str) {
        std::fs::create_dir_all(out).unwrap();
        let key = out.join(format!("{stem}.key.pem"));
        let csr = out.join(format!("{stem}.csr"));
        let leaf = out.join(format!("{stem}.leaf.crt"));
        openssl(
            out,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
                "-subj",
                &format!("/CN={name}"),
            ],
            &[],
        );
        openssl(
            &self.dir.join("inter"),
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-extensions",
                profile,
                "-notext",
                "-in",
                csr.to_str().unwrap(),
                "-out",
                leaf.to_str().unwrap(),
            ],
            &[("PARTY", uri)],
        );
        let chain = std::fs::read_to_string(&leaf).unwrap()
            + &std::fs::read_to_string(self.dir.join("inter/ca.pem")).unwrap();
        std::fs::write(out.join(format!("{stem}.pem")), chain).unwrap();
    }

    /// A party's four files in `<dir>/<name>/`: identity.pem, identity.key.pem,
    /// encryption.pem, encryption.key.pem, each certificate file leaf then
    /// intermediate.
    pub fn party(&self, dir_name: &str, uri: &str, name: &str) -> PathBuf {
        let out = self.dir.join(dir_name);
        self.issue(&out, "identity", "identity", uri, name);
        self.issue(&out, "encryption", "encryption", uri, name);
        out
    }

    /// A local application's client certificate (identity profile):
    /// `<dir>/client.pem` (leaf then intermediate) and `client.key.pem`.
    pub fn client(&self, dir_name: &str, uri: &str) -> PathBuf {
        let out = self.dir.join(dir_name);
        self.issue(&out, "client", "identity", uri, "local application");
        out
    }

    /// Revokes a certificate issued by the intermediate (`openssl ca -revoke`
    /// on its leaf file) and re-issues the CRLs.
    pub fn revoke(&self, leaf_pem: &Path) {
        openssl(
            &self.dir.join("inter"),
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-revoke",
                leaf_pem.to_str().unwrap(),
                "-crl_reason",
                "keyCompromise",
            ],
            &[],
        );
        self.write_crls();
    }
}

/// A daemon configuration (exchanged.toml text) for a party whose four
/// files are in the configuration's directory: the openssl root as trust
/// anchor, both CRLs, `peers` as (URI, address, encryption certificate file),
/// and one local client `client_uri` that may send and read anything for
/// the purpose "treatment".
pub fn daemon_config(
    pki: &OpensslPki,
    peer_addr: &str,
    client_addr: &str,
    peers: &[(String, String, PathBuf)],
    client_uri: &str,
) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        r#"data_dir = "data"
log = "debug"

[identity]
cert = "identity.pem"
key = "identity.key.pem"
encryption_cert = "encryption.pem"
encryption_key = "encryption.key.pem"

[trust]
anchors = ["{anchor}"]
crls = ["{crls}"]

[listen]
peer = "{peer_addr}"
client = "{client_addr}"

[delivery]
initial_backoff_ms = 100
max_backoff_ms = 1000
"#,
        anchor = pki.anchor().display(),
        crls = pki.crls().display(),
    );
    for (uri, address, encryption) in peers {
        write!(
            s,
            "\n[[peer]]\nparty = \"{uri}\"\naddress = \"{address}\"\nencryption_cert = \"{}\"\n",
            encryption.display()
        )
        .unwrap();
    }
    write!(
        s,
        "\n[[client]]\nname = \"app\"\nparty = \"{client_uri}\"\nsend_to = [\"*\"]\npurposes = [\"treatment\"]\nread_purposes = [\"*\"]\n"
    )
    .unwrap();
    s
}
