//! Accountability as a new user runs it: `exchange demo --dir D`, then
//! `exchange audit export` / `audit verify` and `exchange provisions`, and
//! every kind of tampering with an export detected with a precise report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

struct Run {
    out: Output,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn ok(self) -> Self {
        assert!(
            self.out.status.success(),
            "failed: {}\n{}",
            self.stderr(),
            self.stdout()
        );
        self
    }
    fn fails(self) -> Self {
        assert_eq!(
            self.out.status.code(),
            Some(1),
            "expected failure; stdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

fn exchange(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .output()
        .unwrap();
    Run { out }
}

/// One demo network for every test of this file (it takes a few seconds),
/// with the clinic's full export written once.
fn demo() -> &'static Path {
    static DEMO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_tmp, d) = DEMO.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("net");
        exchange(
            tmp.path(),
            &["demo", "--dir", d.to_str().unwrap(), "--burst", "0"],
        )
        .ok();
        exchange(
            &d,
            &[
                "audit",
                "export",
                "--data",
                "clinic/data",
                "--out",
                "clinic-audit.jsonl",
            ],
        )
        .ok();
        (tmp, d)
    });
    d
}

fn export_lines() -> Vec<String> {
    std::fs::read_to_string(demo().join("clinic-audit.jsonl"))
        .unwrap()
        .lines()
        .map(ToOwned::to_owned)
        .collect()
}

/// Writes `lines` to a new file and runs `audit verify` on it with the
/// clinic's certificate.
fn verify_lines(name: &str, lines: &[String]) -> Run {
    let d = demo();
    let f = d.join(name);
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    exchange(
        d,
        &[
            "audit",
            "verify",
            "--cert",
            "clinic/identity.pem",
            f.to_str().unwrap(),
        ],
    )
}

fn problems(run: &Run) -> Vec<String> {
    run.stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("PROBLEM: ").map(ToOwned::to_owned))
        .collect()
}

/// The index of the entry line with `seq` (line 0 is the header).
fn line_of(lines: &[String], seq: u64) -> usize {
    lines
        .iter()
        .position(|l| {
            l.starts_with("{\"type\":\"entry\"") && l.contains(&format!("{{\"seq\":{seq},"))
        })
        .unwrap()
}

fn entry_count(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter(|l| l.starts_with("{\"type\":\"entry\""))
        .count() as u64
}

#[test]
fn demo_then_export_and_verify_as_a_new_user() {
    let d = demo();
    let lines = export_lines();
    let n = entry_count(&lines);
    assert!(n > 10, "the demo's accesses and transfers: {n} entries");
    let run = exchange(
        d,
        &[
            "audit",
            "verify",
            "--cert",
            "clinic/identity.pem",
            "clinic-audit.jsonl",
        ],
    )
    .ok();
    let out = run.stdout();
    assert!(out.contains("OK: complete and unaltered"), "{out}");
    assert!(
        out.contains(&format!("{n} entries proven included")),
        "{out}"
    );
    assert!(
        out.contains("signed by urn:jp:mhlw:facility:1310000013"),
        "{out}"
    );
    // What the clinic did is there: the send by its application, the
    // deliveries and receipts; the patient only as a pseudonym.
    let text = lines.join("\n");
    assert!(text.contains("\"actor\":\"client:urn:local:clinic:emr\",\"action\":\"send\""));
    assert!(text.contains("\"action\":\"forward\""));
    assert!(text.contains("\"action\":\"receipt\""));
    assert!(!text.contains("P-000123"));

    // Another facility's certificate does not verify the clinic's log.
    exchange(
        d,
        &[
            "audit",
            "verify",
            "--cert",
            "hospital/identity.pem",
            "clinic-audit.jsonl",
        ],
    )
    .fails();

    // An export refuses to overwrite.
    let r = exchange(
        d,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--out",
            "clinic-audit.jsonl",
        ],
    )
    .fails();
    assert!(r.stderr().contains("already exists"), "{}", r.stderr());
}

#[test]
fn a_time_range_export_verifies_with_its_witnesses() {
    let d = demo();
    let lines = export_lines();
    // The time of the 5th entry: a range starting there has a `before`
    // witness and ends at the end of the log.
    let v: serde_json::Value = serde_json::from_str(&lines[line_of(&lines, 5)]).unwrap();
    let t5 = v["entry"]["time_ms"].as_u64().unwrap();
    let from = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t5) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    exchange(
        d,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--from",
            &from,
            "--out",
            "range.jsonl",
        ],
    )
    .ok();
    let range: Vec<String> = std::fs::read_to_string(d.join("range.jsonl"))
        .unwrap()
        .lines()
        .map(ToOwned::to_owned)
        .collect();
    assert!(range.iter().any(|l| l.starts_with("{\"type\":\"before\"")));
    assert!(entry_count(&range) < entry_count(&lines));
    let run = verify_lines("range-ok.jsonl", &range).ok();
    assert!(run.stdout().contains("OK: complete and unaltered"));
    // Dropping the witness that proves nothing before the range was left
    // out is reported.
    let cut: Vec<String> = range
        .iter()
        .filter(|l| !l.starts_with("{\"type\":\"before\""))
        .cloned()
        .collect();
    let run = verify_lines("range-no-witness.jsonl", &cut).fails();
    assert!(
        problems(&run).iter().any(|p| p.contains("witness")),
        "{:?}",
        problems(&run)
    );
}

#[test]
fn a_modified_entry_is_reported_by_seq() {
    let mut lines = export_lines();
    let i = line_of(&lines, 3);
    assert!(lines[i].contains("\"outcome\":\"ok\""));
    lines[i] = lines[i].replacen("\"outcome\":\"ok\"", "\"outcome\":\"failed\"", 1);
    let run = verify_lines("modified.jsonl", &lines).fails();
    assert_eq!(
        problems(&run),
        vec![format!(
            "line {}: entry seq 3 was modified (its inclusion proof does not verify)",
            i + 1
        )]
    );
    assert!(run.stderr().contains("1 problem(s)"), "{}", run.stderr());
}

#[test]
fn a_deleted_entry_is_reported_by_seq() {
    let mut lines = export_lines();
    lines.remove(line_of(&lines, 7));
    let run = verify_lines("deleted.jsonl", &lines).fails();
    assert_eq!(
        problems(&run),
        vec!["entry seq 7 is missing (deleted)".to_owned()]
    );
}

#[test]
fn an_inserted_entry_is_reported() {
    let mut lines = export_lines();
    // A forged copy of entry 4 claiming the same place, with another actor.
    let i = line_of(&lines, 4);
    let forged = lines[i].replacen("\"actor\":\"", "\"actor\":\"x", 1);
    lines.insert(i + 1, forged);
    let run = verify_lines("inserted.jsonl", &lines).fails();
    assert_eq!(
        problems(&run),
        vec![format!(
            "line {}: entry claiming seq 4 is not part of the exported log (inserted or duplicated)",
            i + 2
        )]
    );
}

#[test]
fn reordered_entries_are_reported() {
    let mut lines = export_lines();
    let i = line_of(&lines, 10);
    lines.swap(i, i + 1);
    let run = verify_lines("reordered.jsonl", &lines).fails();
    let p = problems(&run);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("is out of order") && (p[0].contains("seq 10") || p[0].contains("seq 11")),
        "{p:?}"
    );
}

#[test]
fn a_log_truncated_after_the_checkpoint_is_reported() {
    let mut lines = export_lines();
    let n = entry_count(&lines);
    // Remove the last five entries (the checkpoint line stays).
    for seq in (n - 5..n).rev() {
        lines.remove(line_of(&lines, seq));
    }
    let run = verify_lines("truncated.jsonl", &lines).fails();
    assert_eq!(
        problems(&run),
        vec![format!(
            "export truncated: entries seq {} to {} are missing after seq {}",
            n - 5,
            n - 1,
            n - 6
        )]
    );
}

#[test]
fn an_edited_checkpoint_is_refused() {
    let mut lines = export_lines();
    let last = lines.len() - 1;
    assert!(lines[last].starts_with("{\"type\":\"latest\""));
    // Flip one character of the base64 checkpoint.
    let pos = lines[last].len() - 10;
    let c = lines[last].as_bytes()[pos];
    let flipped = if c == b'A' { 'B' } else { 'A' };
    lines[last].replace_range(pos..=pos, &flipped.to_string());
    let run = verify_lines("bad-checkpoint.jsonl", &lines).fails();
    assert!(
        run.stderr().starts_with("error: "),
        "one error line: {}",
        run.stderr()
    );
}

#[test]
fn provisions_report_with_receipts_that_verify_offline() {
    let d = demo();
    // The clinic provided the referral to the hospital and the claim to
    // the payer (through the entrusted agent): two records of provision.
    let run = exchange(
        d,
        &[
            "provisions",
            "--data",
            "clinic/data",
            "--subject",
            "P-000123",
            "--format",
            "json",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{v:#}");
    assert!(records.iter().all(|r| r["direction"] == "provided"));
    let to: Vec<&str> = records
        .iter()
        .map(|r| r["counterparty"].as_str().unwrap())
        .collect();
    assert_eq!(
        to,
        vec![
            "urn:jp:mhlw:facility:1310000021",
            "urn:jp:example:payer:shiharai-kikin-13"
        ]
    );
    assert_eq!(records[0]["counterparty_name"], "Minato General Hospital");
    assert_eq!(records[0]["purpose"], "treatment");
    assert_eq!(records[1]["purpose"], "claims");

    // The receipts in the report are the evidence `receipt verify` accepts.
    let evidence = d.join("evidence-json");
    std::fs::create_dir(&evidence).unwrap();
    for (i, r) in records.iter().enumerate() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["receipt"].as_str().unwrap())
            .unwrap();
        let f = evidence.join(format!("{i}.exrcpt"));
        std::fs::write(&f, bytes).unwrap();
        let out = exchange(
            d,
            &[
                "receipt",
                "verify",
                "--trust",
                "ca/ca.pem",
                f.to_str().unwrap(),
            ],
        )
        .ok()
        .stdout();
        assert!(
            out.contains("signature and issuer certificate verified"),
            "{out}"
        );
        assert!(out.contains("DELIVERED"), "{out}");
        assert!(out.contains(to[i]), "{out}");
    }

    // Text, with the receipts written as files.
    let out = exchange(
        d,
        &[
            "provisions",
            "--data",
            "clinic/data",
            "--subject",
            "P-000123",
            "--receipts",
            "evidence",
        ],
    )
    .ok()
    .stdout();
    assert!(out.contains("records: 2"), "{out}");
    assert!(out.contains("PROVIDED to Minato General Hospital"), "{out}");
    assert_eq!(std::fs::read_dir(d.join("evidence")).unwrap().count(), 2);

    // CSV from the payer: the record of receipt, from the clinic.
    let out = exchange(
        d,
        &[
            "provisions",
            "--data",
            "payer/data",
            "--subject",
            "P-000123",
            "--format",
            "csv",
        ],
    )
    .ok()
    .stdout();
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("direction,time,counterparty,"));
    assert!(rows[1].starts_with("received,"), "{out}");
    assert!(rows[1].contains("urn:jp:mhlw:facility:1310000013"));

    // Another patient has no record; a bad subject is a usage error.
    let out = exchange(
        d,
        &["provisions", "--data", "clinic/data", "--subject", "P-999"],
    )
    .ok()
    .stdout();
    assert!(out.contains("records: 0"), "{out}");
    let r = exchange(
        d,
        &["provisions", "--data", "clinic/data", "--subject", "sys|"],
    )
    .fails();
    assert!(r.stderr().contains("invalid subject"), "{}", r.stderr());
    // A directory without a store.
    let r = exchange(d, &["provisions", "--data", "ca", "--subject", "P-000123"]).fails();
    assert!(r.stderr().starts_with("error: "), "{}", r.stderr());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name();
        if name == "store.lock" {
            continue;
        }
        if p.is_dir() {
            copy_dir(&p, &to.join(&name));
        } else {
            std::fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}

/// The demo network's CA and sites (not the files other tests of this
/// binary write beside them while this one runs).
fn copy_network(from: &Path, to: &Path) {
    for site in ["ca", "clinic", "hospital", "agent", "payer"] {
        copy_dir(&from.join(site), &to.join(site));
    }
}

/// Runs the clinic's daemon of the network in `net` once (on ports the
/// system picks): its start and stop are appended and a new checkpoint is
/// signed, so the log grows.
fn run_clinic_once(net: &Path) {
    let path = net.join("clinic/exchanged.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("peer = \"127.0.0.1:") {
                "peer = \"127.0.0.1:0\"".to_owned()
            } else if l.starts_with("client = \"127.0.0.1:") {
                "client = \"127.0.0.1:0\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = exchange_daemon::Config::parse(&text, &net.join("clinic")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        exchange_daemon::Daemon::start(config)
            .await
            .unwrap()
            .shutdown()
            .await;
    });
}

#[test]
fn a_witnessed_checkpoint_shows_the_log_only_grew_or_was_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let net = tmp.path().join("net");
    copy_network(demo(), &net);
    let verify = |file: &str, witness: &str| {
        exchange(
            &net,
            &[
                "audit",
                "verify",
                "--cert",
                "clinic/identity.pem",
                "--witness",
                witness,
                file,
            ],
        )
    };
    // The first export is kept elsewhere (the witness); the log grows.
    exchange(
        &net,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--out",
            "old.jsonl",
        ],
    )
    .ok();
    run_clinic_once(&net);
    exchange(
        &net,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--witness",
            "old.jsonl",
            "--out",
            "new.jsonl",
        ],
    )
    .ok();
    let out = verify("new.jsonl", "old.jsonl").ok().stdout();
    assert!(
        out.contains("is consistent with this export: the log only grew since"),
        "{out}"
    );
    assert!(out.contains("OK: complete and unaltered"), "{out}");
    assert_eq!(
        entry_count(
            &std::fs::read_to_string(net.join("new.jsonl"))
                .unwrap()
                .lines()
                .map(ToOwned::to_owned)
                .collect::<Vec<_>>()
        ),
        entry_count(&export_lines()) + 2,
        "start and stop were appended"
    );

    // An insider holding the identity key rewrites entry 1 and re-signs a
    // checkpoint over the rewritten log: an export of it verifies on its
    // own, but not against the witness, and exporting with the witness fails.
    {
        use exchange_core::audit::{AuditEntry, Checkpoint, Frontier, SignedCheckpoint};
        let db = net.join("clinic/data/store.sqlite3");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("DROP TRIGGER audit_log_no_update; DELETE FROM audit_checkpoints;")
            .unwrap();
        let bytes: Vec<u8> = conn
            .query_row("SELECT entry FROM audit_log WHERE seq = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        let mut e = AuditEntry::from_json(&bytes).unwrap();
        e.detail = Some("nothing happened here".into());
        conn.execute(
            "UPDATE audit_log SET entry = ?1, leaf_hash = ?2 WHERE seq = 1",
            rusqlite::params![e.to_canonical_json(), e.leaf_hash().to_vec()],
        )
        .unwrap();
        let mut frontier = Frontier::new();
        let mut stmt = conn
            .prepare("SELECT leaf_hash FROM audit_log ORDER BY seq")
            .unwrap();
        for h in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
            frontier.push(h.unwrap().try_into().unwrap());
        }
        drop(stmt);
        let identity = exchange_core::identity::Identity::from_pem(
            &std::fs::read(net.join("clinic/identity.pem")).unwrap(),
            &std::fs::read(net.join("clinic/identity.key.pem")).unwrap(),
        )
        .unwrap();
        let cp = Checkpoint {
            party: identity.party().clone(),
            tree_size: frontier.size(),
            root: frontier.root(),
            time_ms: exchange_daemon::unix_ms(std::time::SystemTime::now()),
        };
        let signed = SignedCheckpoint::sign(&identity, &cp).unwrap();
        conn.execute(
            "INSERT INTO audit_checkpoints (tree_size, time_ms, root, frontier, signed) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                cp.tree_size as i64,
                cp.time_ms as i64,
                cp.root.to_vec(),
                frontier.to_bytes(),
                signed.to_bytes()
            ],
        )
        .unwrap();
    }
    exchange(
        &net,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--out",
            "forged.jsonl",
        ],
    )
    .ok();
    let alone = exchange(
        &net,
        &[
            "audit",
            "verify",
            "--cert",
            "clinic/identity.pem",
            "forged.jsonl",
        ],
    )
    .ok()
    .stdout();
    assert!(
        alone.contains("OK: complete and unaltered"),
        "re-signed with the key: {alone}"
    );
    let run = verify("forged.jsonl", "old.jsonl").fails();
    let p = problems(&run);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("is not proven consistent with this export"),
        "{p:?}"
    );
    let r = exchange(
        &net,
        &[
            "audit",
            "export",
            "--data",
            "clinic/data",
            "--witness",
            "old.jsonl",
            "--out",
            "forged-witnessed.jsonl",
        ],
    )
    .fails();
    assert!(r.stderr().contains("was rewritten"), "{}", r.stderr());
    assert!(
        !net.join("forged-witnessed.jsonl").exists(),
        "nothing written"
    );
}
