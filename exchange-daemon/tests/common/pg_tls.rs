//! A PostgreSQL cluster of the test's own that accepts TCP connections over
//! TLS only: `initdb` and `pg_ctl` (run as the `postgres` user through
//! `runuser`, since the tests run as root) on a temporary directory and a
//! free port, with a CA, a server certificate for 127.0.0.1 and localhost,
//! a client certificate and a second, unrelated CA, all made by the openssl
//! command line.
//!
//! `pg_hba.conf` refuses every TCP connection without TLS (`hostnossl …
//! reject`), admits TLS ones with trust, except the role `certuser`, which
//! must present a client certificate the CA issued (`cert`). The Unix
//! socket (in the temporary directory) is trusted, for the test's own
//! set-up queries. The cluster is stopped (`pg_ctl stop -m immediate`) and
//! its directory removed when the [`TlsCluster`] is dropped.
//!
//! Missing tools are a test failure that says what is missing, not a skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::openssl_pki::openssl;

/// The role that must authenticate with a client certificate.
pub const CERT_USER: &str = "certuser";

/// A running TLS-only PostgreSQL cluster (see the module documentation).
pub struct TlsCluster {
    dir: tempfile::TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {what} ({e}): the TLS store tests need PostgreSQL's initdb and pg_ctl \
             (in PATH, e.g. /usr/local/bin), runuser and the openssl command line"
        )
    });
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `runuser -u postgres -- <args>`.
fn as_postgres(args: &[&str]) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).args(args);
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A self-signed P-256 CA `<name>.pem` / `<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &[],
    );
}

/// A P-256 leaf `<name>.pem` / `<name>.key` (PKCS#8) issued by `ca`, with
/// the extensions in `ext` (an openssl extension file's lines).
fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
        &[],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
        &[],
    );
}

impl TlsCluster {
    /// Makes the certificates (the server's for 127.0.0.1 and localhost),
    /// initialises and starts the cluster, and creates the role
    /// [`CERT_USER`].
    pub fn start() -> Self {
        Self::start_for("IP:127.0.0.1,DNS:localhost")
    }

    /// [`TlsCluster::start`] with a server certificate for `names` (an
    /// openssl subjectAltName value).
    pub fn start_for(names: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("exchange-pg-tls-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        make_ca(d, "ca", "exchange test PostgreSQL CA");
        make_ca(d, "other-ca", "an unrelated CA");
        make_leaf(
            d,
            "ca",
            "server",
            "localhost",
            &format!(
                "subjectAltName={names}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        );
        make_leaf(
            d,
            "ca",
            "client",
            CERT_USER,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
        // The server runs as postgres and refuses a key others may read.
        std::fs::set_permissions(
            d.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let path = d.to_str().unwrap();
        run(
            "chown",
            Command::new("chown").args(["-R", "postgres:postgres", path]),
        );
        let data = format!("{path}/data");
        run(
            "initdb",
            &mut as_postgres(&[
                "initdb",
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]),
        );
        std::fs::write(
            d.join("data/pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostnossl all all all reject\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={path} \
             -c ssl=on -c ssl_cert_file={path}/server.pem -c ssl_key_file={path}/server.key \
             -c ssl_ca_file={path}/ca.pem -c fsync=off -c max_connections=40"
        );
        let log = format!("{path}/server.log");
        run(
            "pg_ctl start",
            &mut as_postgres(&[
                "pg_ctl", "-D", &data, "-l", &log, "-w", "-o", &options, "start",
            ]),
        );
        let cluster = Self { dir, port };
        cluster.admin(&format!("CREATE ROLE {CERT_USER} LOGIN"));
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that issued the server's (and the client's) certificate.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that issued neither.
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// The client certificate for [`CERT_USER`] and its key.
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.path("client.pem"), self.path("client.key"))
    }

    /// A TCP URL of database `db` as `user`, with `params` appended.
    pub fn url(&self, user: &str, db: &str, params: &str) -> String {
        let sep = if params.is_empty() { "" } else { "?" };
        format!(
            "postgres://{user}@127.0.0.1:{}/{db}{sep}{params}",
            self.port
        )
    }

    /// The Unix-socket connection string of the maintenance database.
    fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().display(),
            self.port
        )
    }

    /// Runs `sql` as postgres over the Unix socket.
    pub fn admin(&self, sql: &str) {
        super::pg::execute(&self.socket_url(), sql);
    }

    /// Creates database `name`, owned by `owner`.
    pub fn create_db(&self, name: &str, owner: &str) {
        self.admin(&format!("CREATE DATABASE {name} OWNER {owner}"));
    }

    /// Runs `sql` (one bigint) on database `db` as postgres over the Unix socket.
    pub fn count(&self, db: &str, sql: &str) -> u64 {
        let url = self
            .socket_url()
            .replace("dbname=postgres", &format!("dbname={db}"));
        super::pg::count(&url, sql)
    }

    /// How many connections to `db` are over TLS, and how many are not.
    pub fn connections(&self, db: &str) -> (u64, u64) {
        let count = |ssl: bool| {
            super::pg::count(
                &self.socket_url(),
                &format!(
                    "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.datname = '{db}' AND s.ssl = {ssl}"
                ),
            )
        };
        (count(true), count(false))
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.path("data");
        let _ = as_postgres(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap_or_default(),
            "-m",
            "immediate",
            "stop",
        ])
        .output();
    }
}
