//! `exchange demo`: a live network on loopback, step by step.
//!
//! A fresh CA certifies a clinic, a hospital, a claims agent (代行請求) and a
//! payer (審査支払機関). Each runs its own daemon (exchange-daemon's
//! `Daemon`, the code `exchanged` runs, started in this process from its own
//! configuration file, with its own SQLite store) and each facility has a
//! local application with a client certificate. The clinic sends a referral
//! to the hospital (a third party) and a claim to the payer through the agent
//! (an entrusted relay); the recipients fetch and acknowledge; every receipt
//! is shown, verified offline, with the provision boundary marked. Then a
//! short burst measures end-to-end throughput. All data is synthetic.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use exchange_core::MessageId;
use exchange_core::receipt::SignedReceipt;
use exchange_daemon::proto::{MessageStatus, SendStart, SubjectIdentifier};
use exchange_daemon::{Config, Daemon};

use crate::client_cmd::{self, Client, ConnArgs, toml_string};
use crate::error::{CliError, Result};
use crate::{ca, files};

const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";
const AGENT: &str = "urn:jp:example:agent:claims-agent-01";
const PAYER: &str = "urn:jp:example:payer:shiharai-kikin-13";

/// How long the demo waits for a delivery or an acknowledgement to come back.
const WAIT: Duration = Duration::from_secs(30);
/// How long the burst may take in all.
const BURST_WAIT: Duration = Duration::from_secs(300);

const REFERRAL: &str = r#"{
  "resourceType": "Bundle",
  "type": "document",
  "meta": { "tag": [{ "code": "synthetic", "display": "Synthetic demo data: not a real patient" }] },
  "entry": [
    { "resource": { "resourceType": "Composition", "status": "final", "title": "診療情報提供書",
        "type": { "coding": [{ "system": "http://loinc.org", "code": "57133-1", "display": "Referral note" }] },
        "subject": { "display": "山田 太郎 (synthetic)" },
        "section": [{ "title": "紹介目的", "text": { "status": "generated", "div": "<div>精査加療のお願い (synthetic)</div>" } }] } },
    { "resource": { "resourceType": "Patient", "identifier": [{ "value": "P-000123" }],
        "name": [{ "text": "山田 太郎 (synthetic)" }], "birthDate": "1970-01-01" } }
  ]
}
"#;

/// A monthly claim in the shape of a UKE file (レセプト電算処理): synthetic
/// records, not a valid claim.
const CLAIM: &str = "IR,1,13,1,1310000013,,サクラクリニック（デモ）,202611,00,03\r\n\
RE,1,1112,202611,ヤマダ　タロウ（合成）,1,19700101,,,,,,,,,,,,,\r\n\
HO,06139999,,12345678,,1,1234,\r\n\
SY,8830417,20261101,01,,\r\n\
SI,11,1,111000110,,1,\r\n\
GO,1,1234,\r\n";

/// Patient identifiers of the demo (synthetic): the CLI's default system,
/// so that `--subject P-000123` names the demo patient in every command.
const SUBJECT_SYSTEM: &str = crate::envelope_cmd::DEFAULT_SUBJECT_SYSTEM;

/// One party of the demo network.
struct Site {
    dir: &'static str,
    uri: &'static str,
    name: &'static str,
    kind: &'static str,
    app: &'static str,
    app_name: &'static str,
    /// (recipients, purposes, read purposes) of its application.
    role: (
        &'static [&'static str],
        &'static [&'static str],
        &'static [&'static str],
    ),
    /// Peers: (site dir, with its encryption certificate, with its address,
    /// its contracted role). A party reached only through a relay needs no
    /// address.
    peers: &'static [(&'static str, bool, bool, &'static str)],
}

const SITES: [Site; 4] = [
    Site {
        dir: "clinic",
        uri: CLINIC,
        name: "Sakura Clinic",
        kind: "clinic, 医療機関コード 13 1 000001 3",
        app: "urn:local:clinic:emr",
        app_name: "Sakura Clinic EMR",
        role: (
            &[HOSPITAL, PAYER, AGENT],
            &["treatment", "claims"],
            &["treatment"],
        ),
        peers: &[
            ("hospital", true, true, "third-party"),
            ("agent", false, true, "entrusted"),
            ("payer", true, false, "third-party"),
        ],
    },
    Site {
        dir: "hospital",
        uri: HOSPITAL,
        name: "Minato General Hospital",
        kind: "hospital, 医療機関コード 13 1 000002 1",
        app: "urn:local:hospital:his",
        app_name: "Minato General Hospital HIS",
        role: (&[CLINIC], &["treatment"], &["treatment"]),
        peers: &[("clinic", true, true, "third-party")],
    },
    Site {
        dir: "agent",
        uri: AGENT,
        name: "Demo Claims Agent",
        kind: "claims agent, 代行請求: an entrusted relay",
        app: "urn:local:agent:ops",
        app_name: "Demo Claims Agent operations",
        role: (&[], &[], &["*"]),
        peers: &[
            ("clinic", false, true, "third-party"),
            ("payer", false, true, "third-party"),
        ],
    },
    Site {
        dir: "payer",
        uri: PAYER,
        name: "Demo Claims Review Office",
        kind: "payer, 審査支払機関",
        app: "urn:local:payer:intake",
        app_name: "Demo Claims Review Office intake",
        role: (&[], &[], &["claims"]),
        peers: &[("agent", false, true, "third-party")],
    },
];

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn site(dir: &str) -> Result<&'static Site> {
    SITES
        .iter()
        .find(|s| s.dir == dir)
        .ok_or_else(|| CliError::Usage(format!("no demo site {dir}")))
}

/// Free loopback ports: all bound at once (so they differ), then released.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let err = |source| CliError::Write {
        path: PathBuf::from("127.0.0.1:0"),
        source,
    };
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(err))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(err))
        .collect()
}

struct Ports {
    peer: u16,
    client: u16,
}

/// The longest Unix socket path the demo configures (sun_path holds 108
/// bytes with its terminator); a demo in a deeper directory serves TCP only.
const MAX_SOCKET_PATH: usize = 100;

/// Where site `s`'s daemon serves its client socket, if the path fits.
fn socket_path(root: &Path, s: &Site) -> Option<PathBuf> {
    let p = root.join(s.dir).join("client.sock");
    (p.as_os_str().len() <= MAX_SOCKET_PATH).then_some(p)
}

fn daemon_config(root: &Path, s: &Site, ports: &[Ports]) -> Result<String> {
    let mut t = String::new();
    let q = toml_string;
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|x| toml_string(x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let me = &ports[index(s.dir)?];
    // Writing to a String cannot fail.
    let _ = write!(
        t,
        "# exchanged configuration of {name} ({uri}), written by `exchange demo`.\n\
         # Run it: exchanged --config THIS_FILE (paths are relative to this file).\n\
         data_dir = \"data\"\n\
         log = \"info\"\n\n\
         [identity]\n\
         cert = \"identity.pem\"\n\
         key = \"identity.key.pem\"\n\
         encryption_cert = \"encryption.pem\"\n\
         encryption_key = \"encryption.key.pem\"\n\n\
         [trust]\n\
         anchors = [\"../ca/ca.pem\"]\n\
         crls = [\"../ca/crl.pem\"]\n\n\
         [listen]\n\
         peer = \"127.0.0.1:{pp}\"\n\
         client = \"127.0.0.1:{cp}\"\n\
         # The client listener's certificate, valid for localhost and 127.0.0.1\n\
         # (`exchange ca issue-server`): stock gRPC clients check that name.\n\
         client_cert = \"server.pem\"\n\
         client_key = \"server.key.pem\"\n\
         {socket}\n\
         [delivery]\n\
         initial_backoff_ms = 200\n\
         max_backoff_ms = 5000\n",
        name = s.name,
        uri = s.uri,
        pp = me.peer,
        cp = me.client,
        socket = if socket_path(root, s).is_some() {
            "# The client service on a Unix socket too (mode 0600: this user only).\n\
             client_socket = \"client.sock\"\n"
        } else {
            ""
        },
    );
    for (dir, with_key, with_address, role) in s.peers {
        let p = site(dir)?;
        let _ = write!(t, "\n[[peer]]\nparty = {}\nrole = \"{role}\"\n", q(p.uri));
        if *with_address {
            let _ = writeln!(t, "address = \"127.0.0.1:{}\"", ports[index(dir)?].peer);
        }
        if *with_key {
            let _ = writeln!(t, "encryption_cert = \"../{dir}/encryption.pem\"");
        }
    }
    let _ = write!(
        t,
        "\n[[client]]\nname = \"app\"\nparty = {}\nsend_to = [{}]\npurposes = [{}]\nread_purposes = [{}]\n",
        q(s.app),
        list(s.role.0),
        list(s.role.1),
        list(s.role.2)
    );
    Ok(t)
}

fn index(dir: &str) -> Result<usize> {
    SITES
        .iter()
        .position(|s| s.dir == dir)
        .ok_or_else(|| CliError::Usage(format!("no demo site {dir}")))
}

fn readme(root: &Path, ports: &[Ports], sent: &[(&str, String)]) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        "A demo exchange network written by `exchange demo --dir {root}`.\n\
         Everything here is synthetic test data.\n\n\
         ca/                 the network CA: ca.pem (trust anchor), ca.key.pem (private key), crl.pem\n",
        root = root.display()
    );
    for (s, p) in SITES.iter().zip(ports) {
        let _ = write!(
            t,
            "{dir}/{pad}{name} ({uri})\n\
             {blank}  identity.pem, identity.key.pem, encryption.pem, encryption.key.pem: its credentials\n\
             {blank}  exchanged.toml: its daemon's configuration (peer 127.0.0.1:{pp}, client 127.0.0.1:{cp})\n\
             {blank}  data/: its daemon's store (store.sqlite3 and blobs/)\n\
             {blank}  server.pem, server.key.pem: its client listener's certificate (localhost, 127.0.0.1)\n\
             {blank}  app/: its local application {app}: client.pem, client.key.pem, client.toml,\n\
             {blank}        README.txt (how a stock gRPC client connects: names, certificates, socket)\n",
            dir = s.dir,
            pad = " ".repeat(20usize.saturating_sub(s.dir.len() + 1)),
            blank = " ".repeat(18),
            name = s.name,
            uri = s.uri,
            pp = p.peer,
            cp = p.client,
            app = s.app,
        );
    }
    t.push_str(
        "receipts/           the signed receipts the clinic received (verify offline:\n\
         \x20                   exchange receipt verify --trust ca/ca.pem receipts/referral-1-DELIVERED.exrcpt)\n\
         clinic/app/referral.json, clinic/app/claim.uke: what the clinic sent;\n\
         hospital/app/inbox/, payer/app/inbox/: what the recipients fetched.\n\n\
         Run the network again from this directory, one daemon per terminal (the ports were\n\
         free when the demo ran; build the binaries with\n\
         `cargo build --release -p exchange-daemon -p exchange-cli`, they are in target/release/):\n\n\
         \x20   exchanged --config clinic/exchanged.toml\n\
         \x20   exchanged --config hospital/exchanged.toml\n\
         \x20   exchanged --config agent/exchanged.toml\n\
         \x20   exchanged --config payer/exchanged.toml\n\n\
         and talk to them as each facility's application:\n\n\
         \x20   exchange status MESSAGE_ID --client-config clinic/app/client.toml\n\
         \x20   exchange inbox --all --client-config hospital/app/client.toml\n\
         \x20   exchange send --client-config clinic/app/client.toml --to urn:jp:mhlw:facility:1310000021 \\\n\
         \x20       --content-type application/fhir+json --purpose treatment --subject P-000123 \\\n\
         \x20       --in clinic/app/referral.json --wait\n\
         \x20   exchange fetch MESSAGE_ID --out referral.json --client-config hospital/app/client.toml\n\
         \x20   exchange ack MESSAGE_ID --receipt processed.exrcpt --client-config hospital/app/client.toml\n\n\
         (or export EXCHANGE_CLIENT_CONFIG=clinic/app/client.toml instead of --client-config).\n\n\
         Accountability (offline, also while the daemons run):\n\n\
         \x20   exchange audit export --data clinic/data --out clinic-audit.jsonl\n\
         \x20   exchange audit verify --cert clinic/identity.pem clinic-audit.jsonl\n\
         \x20   exchange provisions --data clinic/data --subject P-000123 --receipts evidence\n\
         \x20   for r in evidence/*.exrcpt; do exchange receipt verify --trust ca/ca.pem \"$r\"; done\n\
         \x20   exchange provisions --data payer/data --subject P-000123 --format json\n\
         \x20   exchange admin verify-store --config clinic/exchanged.toml\n\
         \x20   exchange admin backup --data clinic/data --out clinic-backup.tar\n",
    );
    if !sent.is_empty() {
        t.push_str("\nMessages the demo sent (MESSAGE_ID above):\n\n");
        for (label, id) in sent {
            let _ = writeln!(t, "    {label:<9} {id}");
        }
    }
    t
}

/// `SITE/app/README.txt`: how a local application written with a stock
/// gRPC library reaches its daemon (names, certificates, the socket).
fn app_readme(root: &Path, s: &Site, p: &Ports) -> String {
    // Absolute, so that the file says where to look from anywhere.
    let abs = std::path::absolute(root).unwrap_or_else(|_| root.to_owned());
    let mut t = String::new();
    let _ = write!(
        t,
        "The local application of {name} ({uri}), written by `exchange demo`.\n\
         It is named {app} in its client certificate and in the daemon's\n\
         [[client]] entry (../exchanged.toml), which says what it may do.\n\n\
         Files here:\n\
         \x20 client.pem, client.key.pem  its TLS client certificate and key (PEM, PKCS#8 P-256)\n\
         \x20 client.toml                 settings for the `exchange` command (--client-config client.toml)\n\n\
         Connecting with a stock gRPC library (Python grpcio, grpc-java, grpc-dotnet, grpcurl):\n\n\
         \x20 address       localhost:{cp}\n\
         \x20               The daemon's client listener presents ../server.pem, valid for the\n\
         \x20               DNS name localhost and the address 127.0.0.1: dial one of these two,\n\
         \x20               with the library's normal host-name check (no override needed).\n\
         \x20 root CA       ../../ca/ca.pem (the daemon's certificate chains to it)\n\
         \x20 client cert   client.pem with key client.key.pem (mutual TLS is required)\n",
        name = s.name,
        uri = s.uri,
        app = s.app,
        cp = p.client,
    );
    match socket_path(root, s).map(|_| abs.join(s.dir).join("client.sock")) {
        Some(sock) => {
            let _ = write!(
                t,
                "\x20 Unix socket   unix:{sock}\n\
                 \x20               Mode 0600: only this user may connect. The same TLS runs over it:\n\
                 \x20               check the certificate for the name localhost (grpcio: channel option\n\
                 \x20               grpc.default_authority = \"localhost\") and present client.pem.\n",
                sock = sock.display()
            );
        }
        None => t.push_str(
            "  Unix socket   none (this directory's path is too long for a socket path)\n",
        ),
    }
    let _ = write!(
        t,
        "\nServices: exchange.v1.Client (proto/exchange/v1/daemon.proto in the source tree),\n\
         grpc.health.v1.Health and server reflection.\n\n\
         A tested Python client written only from the protos is examples/python/ in the\n\
         source tree; docs/client-guide.md covers Python, Java and C#. From the source tree\n\
         (after `pip install -r examples/python/requirements.txt`, while the daemons run):\n\n\
         \x20   python examples/python/exchange_client.py \\\n\
         \x20       --sender {root}/clinic/app/client.toml \\\n\
         \x20       --recipient {root}/hospital/app/client.toml --to {hospital}\n",
        root = abs.display(),
        hospital = HOSPITAL,
    );
    t
}

/// Starts every daemon; on a failure stops those already started.
async fn start_all(root: &Path) -> Result<Vec<(&'static str, Daemon)>> {
    let mut running = Vec::new();
    for s in &SITES {
        let path = root.join(s.dir).join("exchanged.toml");
        let started = match Config::load(&path) {
            Ok(config) => Daemon::start(config).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(d) => {
                println!(
                    "  {:<9} {:<38} peer {}  client {}  {}/exchanged.toml, {}/data/",
                    s.dir,
                    s.uri,
                    d.peer_addr(),
                    d.client_addr(),
                    s.dir,
                    s.dir
                );
                running.push((s.dir, d));
            }
            Err(source) => {
                stop_all(running).await;
                return Err(CliError::Daemon {
                    what: format!("starting the {} daemon ({})", s.dir, path.display()),
                    source,
                });
            }
        }
    }
    Ok(running)
}

async fn stop_all(daemons: Vec<(&'static str, Daemon)>) {
    for (_, d) in daemons {
        d.shutdown().await;
    }
}

/// Runs the demo in `dir` (kept), or in a temporary directory removed afterwards.
pub(crate) async fn run(dir: Option<&Path>, burst: usize) -> Result<()> {
    let tmp;
    let root: PathBuf = match dir {
        Some(d) => {
            let not_empty = std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some());
            if not_empty {
                return Err(CliError::Usage(format!(
                    "{} is not empty: the demo writes a new network, give it a new directory",
                    d.display()
                )));
            }
            files::create_dir(d)?;
            d.to_owned()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|source| CliError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
            tmp.path().to_owned()
        }
    };
    let now = SystemTime::now();
    println!(
        "exchange demo: a live network on loopback in {}",
        root.display()
    );

    step(
        1,
        "A regional care network creates its CA (trust anchor, key, empty CRL).",
    );
    ca::init(
        &root.join("ca"),
        "Regional Care Network CA (demo)",
        3650,
        None,
        now,
    )?;

    step(
        2,
        "The CA issues credentials to four parties, and a client certificate to each one's local application.",
    );
    for s in &SITES {
        let dir = root.join(s.dir);
        ca::issue_files(&root.join("ca"), s.uri, s.name, &dir, 730, now)?;
        ca::issue_client_files(
            &root.join("ca"),
            s.app,
            s.app_name,
            &dir.join("app"),
            365,
            now,
        )?;
        ca::issue_server_files(
            &root.join("ca"),
            Some(s.uri),
            &["localhost".to_owned()],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            &format!("{} client listener", s.name),
            &dir,
            365,
            now,
        )?;
        println!("  {:<38} {} ({})", s.uri, s.name, s.kind);
        println!("  {:<38}   local application: {}", "", s.app);
    }

    step(
        3,
        "Each party starts its daemon (exchanged) from its own configuration, with its own SQLite store.",
    );
    let ports: Vec<Ports> = free_ports(2 * SITES.len())?
        .chunks(2)
        .map(|p| Ports {
            peer: p[0],
            client: p[1],
        })
        .collect();
    for (s, p) in SITES.iter().zip(&ports) {
        let dir = root.join(s.dir);
        files::write_new(
            &dir.join("exchanged.toml"),
            daemon_config(&root, s, &ports)?.as_bytes(),
            false,
        )?;
        let app = dir.join("app");
        files::write_new(
            &app.join("client.toml"),
            client_cmd::client_config_toml(
                &format!("localhost:{}", p.client),
                s.uri,
                Path::new("../../ca/ca.pem"),
                Some(Path::new("../../ca/crl.pem")),
                Path::new("client.pem"),
                Path::new("client.key.pem"),
            )
            .as_bytes(),
            false,
        )?;
        files::write_new(
            &app.join("README.txt"),
            app_readme(&root, s, p).as_bytes(),
            false,
        )?;
    }
    files::write_new(
        &root.join("README.txt"),
        readme(dir.unwrap_or(&root), &ports, &[]).as_bytes(),
        false,
    )?;
    let daemons = start_all(&root).await?;
    let result = scenario(&root, burst).await;

    step(if burst > 0 { 11 } else { 10 }, "The daemons stop.");
    stop_all(daemons).await;
    let sent = result?;
    files::write_atomic(
        &root.join("README.txt"),
        readme(dir.unwrap_or(&root), &ports, &sent).as_bytes(),
    )?;
    let referral = &sent[0].1;
    match dir {
        Some(d) => {
            println!(
                "\nDone. The network stays in {}: see {}/README.txt. For example:",
                d.display(),
                d.display()
            );
            println!("  exchanged --config {}/clinic/exchanged.toml", d.display());
            println!(
                "  exchange status {referral} --client-config {}/clinic/app/client.toml",
                d.display()
            );
            println!(
                "  exchange audit export --data {}/clinic/data --out clinic-audit.jsonl",
                d.display()
            );
            println!(
                "  exchange audit verify --cert {}/clinic/identity.pem clinic-audit.jsonl",
                d.display()
            );
            println!(
                "  exchange provisions --data {}/clinic/data --subject P-000123",
                d.display()
            );
        }
        None => println!(
            "\nDone. (The network was in a temporary directory, now removed; `exchange demo --dir DIR` keeps it.)"
        ),
    }
    Ok(())
}

/// Connects as the application of site `dir`, through its client config file.
fn app(root: &Path, dir: &str) -> Result<Client> {
    ConnArgs {
        client_config: Some(root.join(dir).join("app").join("client.toml")),
        ..ConnArgs::default()
    }
    .connect()
}

fn id_string(bytes: &[u8]) -> String {
    MessageId::from_slice(bytes).map_or_else(|_| hex::encode(bytes), |id| id.to_string())
}

/// Waits (bounded) until `id` reaches `state`; a timeout names where it stuck.
async fn wait_for(
    client: &Client,
    id: &[u8],
    label: &str,
    state: &'static str,
) -> Result<MessageStatus> {
    let until: &[&str] = if state == "DELIVERED" {
        &["DELIVERED", "PROCESSED"]
    } else {
        &["PROCESSED"]
    };
    let waited = tokio::time::timeout(WAIT, client_cmd::watch_until(client, id, until, |_| ()));
    let status = match waited.await {
        Ok(s) => s?,
        Err(_) => {
            let last = client_cmd::status_of(client, id).await?;
            let hops: Vec<String> = last
                .hops
                .iter()
                .map(|h| {
                    format!(
                        "hop {} {} after {} attempt(s){}",
                        h.party,
                        client_cmd::hop_state_name(h),
                        h.attempts,
                        if h.last_error.is_empty() {
                            String::new()
                        } else {
                            format!(", last error: {}", h.last_error)
                        }
                    )
                })
                .collect();
            return Err(CliError::Timeout {
                what: format!(
                    "the {label} to be {state} (it is {}; {})",
                    client_cmd::state_name(&last),
                    hops.join("; ")
                ),
                secs: WAIT.as_secs(),
            });
        }
    };
    if client_cmd::state_name(&status) == "FAILED" {
        return Err(CliError::Failed {
            id: id_string(id),
            reason: format!("the {label} did not reach {state}"),
        });
    }
    Ok(status)
}

fn referral_start(title: &str, subject: &str) -> SendStart {
    SendStart {
        recipients: vec![HOSPITAL.into()],
        content_type: "application/fhir+json".into(),
        purpose: "treatment".into(),
        subject_ids: vec![SubjectIdentifier {
            system: SUBJECT_SYSTEM.into(),
            value: subject.into(),
        }],
        title: title.into(),
        document_type: "57133-1 Referral note".into(),
        file_name: "referral.json".into(),
        ..SendStart::default()
    }
}

/// Receives, checks and acknowledges one item as the application `who`.
async fn receive(
    client: &Client,
    root: &Path,
    dir: &str,
    id: &[u8],
    file: &str,
    sent: &[u8],
) -> Result<()> {
    let items = client_cmd::list_inbox(client, false).await?;
    println!("  inbox: {} new item(s)", items.len());
    for i in &items {
        println!(
            "    {}  from {}  {}  purpose {}",
            id_string(&i.message_id),
            i.sender,
            i.content_type,
            i.purpose
        );
    }
    let mid = MessageId::from_slice(id)?;
    let out = root.join(dir).join("app").join("inbox").join(file);
    files::create_dir(&files::dir_of(&out))?;
    let header = client_cmd::fetch_to(client, &mid, None, &out).await?;
    let shown = out.strip_prefix(root).unwrap_or(&out);
    client_cmd::print_fetched(&header, shown, false, "  ");
    let same = files::read(&out)? == sent;
    println!("  identical to what the clinic sent: {same}");
    if !same {
        return Err(CliError::Usage(format!(
            "demo check failed: {} differs from what was sent",
            out.display()
        )));
    }
    let r = client_cmd::ack_item(client, &mid, None).await?;
    println!(
        "  acknowledged: {} receipt signed by {} at {}, on its way back to the clinic",
        r.disposition(),
        r.issuer(),
        files::fmt_time(r.issued())
    );
    Ok(())
}

/// Prints every receipt of a message, verified offline; saves them (.exrcpt).
fn show_receipts(client: &Client, root: &Path, label: &str, s: &MessageStatus) -> Result<()> {
    println!("  {label} {}  {}", id_string(&s.message_id), s.state);
    let dir = root.join("receipts");
    files::create_dir(&dir)?;
    for (i, r) in s.receipts.iter().enumerate() {
        let verified = SignedReceipt::from_bytes(&r.signed)
            .and_then(|x| x.verify(client.trust()))
            .map_err(CliError::about(format!("{label} receipt {}", i + 1)))?;
        if verified.message_id().as_bytes().as_slice() != s.message_id.as_slice() {
            return Err(CliError::Usage(format!(
                "{label} receipt {} is for another message",
                i + 1
            )));
        }
        files::write_new(
            &dir.join(format!(
                "{label}-{}-{}.exrcpt",
                i + 1,
                client_cmd::disposition_name(r)
            )),
            &verified.signed().to_file(),
            false,
        )?;
        println!("    {}. {}", i + 1, client_cmd::receipt_line(r));
    }
    for p in &s.provisions {
        let line = match (client_cmd::provision_name(p), p.receipt) {
            ("PASSED", Some(n)) if p.boundary == p.recipient => format!(
                "responsibility for the {label} passed to {} with receipt {} (第三者提供)",
                p.recipient,
                n + 1
            ),
            ("PASSED", Some(n)) => format!(
                "responsibility for the copy to {} passed to {} with receipt {} (第三者提供)",
                p.recipient,
                p.boundary,
                n + 1
            ),
            ("NOT_A_PROVISION", _) => format!(
                "no third-party provision to {} (entrusted only, 委託)",
                p.recipient
            ),
            (other, _) => format!("{} for {} ({})", other, p.recipient, p.boundary),
        };
        println!("    boundary: {line}");
    }
    for r in s
        .receipts
        .iter()
        .filter(|r| client_cmd::role_name(r) == "ENTRUSTED")
    {
        println!(
            "    {} acted for the clinic (委託): its {} receipt is custody, not a provision; the clinic stayed responsible",
            r.issuer,
            client_cmd::disposition_name(r)
        );
    }
    Ok(())
}

/// The scenario, with the daemons running. Returns the referral's and the claim's ids.
async fn scenario(root: &Path, burst: usize) -> Result<Vec<(&'static str, String)>> {
    let emr = app(root, "clinic")?;
    let his = app(root, "hospital")?;
    let ops = app(root, "agent")?;
    let intake = app(root, "payer")?;

    step(
        4,
        "The clinic's EMR sends a referral (診療情報提供書, synthetic FHIR JSON) to the hospital, a third party (第三者提供).",
    );
    let referral_path = root.join("clinic/app/referral.json");
    files::write_new(&referral_path, REFERRAL.as_bytes(), false)?;
    let t0 = Instant::now();
    let referral = client_cmd::send_file(
        &emr,
        referral_start("診療情報提供書", "P-000123"),
        &referral_path,
    )
    .await?;
    println!(
        "  message {}: sealed and signed by the clinic's daemon, encrypted to the hospital's key, stored for delivery",
        id_string(&referral.message_id)
    );

    step(
        5,
        "It sends the monthly claim (レセプト, synthetic UKE text) to the payer through the claims agent, an entrusted relay (委託).",
    );
    let claim_path = root.join("clinic/app/claim.uke");
    files::write_new(&claim_path, CLAIM.as_bytes(), false)?;
    let claim = client_cmd::send_file(
        &emr,
        SendStart {
            recipients: vec![PAYER.into()],
            relays: vec![format!("{AGENT}=entrusted")],
            content_type: "text/plain".into(),
            purpose: "claims".into(),
            subject_ids: vec![SubjectIdentifier {
                system: SUBJECT_SYSTEM.into(),
                value: "P-000123".into(),
            }],
            title: "診療報酬明細書 2026-11 (synthetic)".into(),
            document_type: "UKE".into(),
            file_name: "claim.uke".into(),
            ..SendStart::default()
        },
        &claim_path,
    )
    .await?;
    println!(
        "  message {}: route clinic -> {AGENT} (ENTRUSTED) -> {PAYER} (THIRD_PARTY); only the payer's key can open it",
        id_string(&claim.message_id)
    );

    step(
        6,
        "The daemons deliver over mutual TLS; the clinic waits for DELIVERED receipts.",
    );
    for (label, id) in [("referral", &referral), ("claim", &claim)] {
        let s = wait_for(&emr, &id.message_id, label, "DELIVERED").await?;
        println!(
            "  {label:<8} {} ({} receipt(s), {:.2} s after the first send)",
            s.state,
            s.receipts.len(),
            t0.elapsed().as_secs_f64()
        );
    }

    step(
        7,
        "The hospital's HIS lists its inbox, fetches the referral (its daemon verifies and decrypts) and acknowledges it.",
    );
    receive(
        &his,
        root,
        "hospital",
        &referral.message_id,
        "referral.json",
        REFERRAL.as_bytes(),
    )
    .await?;

    step(
        8,
        "The payer's intake does the same with the claim; the agent relayed it without being able to read it.",
    );
    receive(
        &intake,
        root,
        "payer",
        &claim.message_id,
        "claim.uke",
        CLAIM.as_bytes(),
    )
    .await?;
    let agent_items = client_cmd::list_inbox(&ops, true).await?;
    println!(
        "  the agent's own inbox (including acknowledged items): {} item(s)",
        agent_items.len()
    );

    step(
        9,
        "Back at the clinic: every receipt, its signature verified here against ca/ca.pem, and the provision boundary (責任分界点).",
    );
    for (label, id) in [("referral", &referral), ("claim", &claim)] {
        let s = wait_for(&emr, &id.message_id, label, "PROCESSED").await?;
        show_receipts(&emr, root, label, &s)?;
    }

    if burst > 0 {
        step(
            10,
            &format!(
                "Throughput: {burst} small referrals sent concurrently by the clinic's EMR to the hospital."
            ),
        );
        measure_burst(&emr, burst).await?;
    }
    Ok(vec![
        ("referral", id_string(&referral.message_id)),
        ("claim", id_string(&claim.message_id)),
    ])
}

/// Sends `n` small referrals at once and waits until every one is DELIVERED;
/// prints the measured rate.
async fn measure_burst(emr: &Client, n: usize) -> Result<()> {
    let payload: Arc<[u8]> = Arc::from(REFERRAL.as_bytes());
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = emr.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            let start = referral_start(
                &format!("burst referral {i} (synthetic)"),
                &format!("P-9{i:05}"),
            );
            (i, client_cmd::send_bytes(&client, start, &payload).await)
        });
    }
    let mut ids = vec![Vec::new(); n];
    while let Some(joined) = tasks.join_next().await {
        let (i, sent) =
            joined.map_err(|e| CliError::Usage(format!("a burst send task failed: {e}")))?;
        ids[i] = sent?.message_id;
    }
    let accepted = t0.elapsed();
    // Oldest first: deliveries finish roughly in order, so one status call
    // per message (plus one per wait) finds the last DELIVERED.
    let mut next = 0;
    while next < n {
        let s = client_cmd::status_of(emr, &ids[next]).await?;
        match client_cmd::state_name(&s) {
            "DELIVERED" | "PROCESSED" => next += 1,
            "FAILED" => {
                return Err(CliError::Failed {
                    id: id_string(&ids[next]),
                    reason: "a burst message failed".into(),
                });
            }
            _ if t0.elapsed() > BURST_WAIT => {
                return Err(CliError::Timeout {
                    what: format!("the burst: {next} of {n} DELIVERED"),
                    secs: BURST_WAIT.as_secs(),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "  {n} messages in {total:.2} s = {:.0} msg/s (measured: first send to the last DELIVERED status at the clinic)",
        n as f64 / total
    );
    println!(
        "  all {n} accepted by the clinic's daemon after {:.2} s; each was sealed, signed and stored by the clinic, \
         delivered over mutual TLS, verified and stored by the hospital, and answered with a signed DELIVERED receipt",
        accepted.as_secs_f64()
    );
    println!(
        "  (one process: four daemons, their SQLite stores and the client share this machine's {cpus} CPU(s); {} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("  the burst's referrals stay unacknowledged in the hospital's inbox");
    Ok(())
}
