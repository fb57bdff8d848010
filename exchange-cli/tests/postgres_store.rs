//! The offline commands on a PostgreSQL store (`--store URL`): a demo
//! facility moved onto a database of its own on the local server
//! (127.0.0.1:5432, user postgres, trust; `EXCHANGE_TEST_PG` overrides the
//! maintenance database), then `audit export`, `provisions` and
//! `admin verify-store` read it there. No server is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use exchange_daemon::{Config, Daemon};

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
        assert!(
            !self.out.status.success(),
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

fn admin_url() -> String {
    std::env::var("EXCHANGE_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// Runs `sql` on the maintenance database.
fn admin(rt: &tokio::runtime::Runtime, sql: &str) {
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (is it running?)");
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = task.await;
    });
}

/// A database of its own, dropped with this.
struct Db<'a> {
    rt: &'a tokio::runtime::Runtime,
    name: String,
}

impl<'a> Db<'a> {
    fn new(rt: &'a tokio::runtime::Runtime) -> Self {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).unwrap();
        let name = format!(
            "exchange_cli_test_{}_{}",
            std::process::id(),
            hex::encode(r)
        );
        admin(rt, &format!("CREATE DATABASE {name}"));
        Self { rt, name }
    }

    fn url(&self) -> String {
        let kept: Vec<String> = admin_url()
            .split_whitespace()
            .filter(|kv| !kv.starts_with("dbname="))
            .map(ToOwned::to_owned)
            .collect();
        format!("{} dbname={}", kept.join(" "), self.name)
    }
}

impl Drop for Db<'_> {
    fn drop(&mut self) {
        admin(
            self.rt,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

#[test]
fn export_provisions_and_verify_store_read_a_postgres_store() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = Db::new(&rt);
    let url = db.url();
    let d = tempfile::tempdir().unwrap();
    exchange(d.path(), &["demo", "--dir", "net", "--burst", "0"]).ok();
    let net = d.path().join("net");

    // The clinic moves onto PostgreSQL (a new, empty store: the checkpoint
    // its SQLite store signed is not this one's).
    let toml = net.join("clinic/exchanged.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!("\n[store]\nurl = \"{url}\"\n"));
    std::fs::write(&toml, text).unwrap();
    std::fs::remove_file(net.join("clinic/data/checkpoint.latest")).unwrap();
    let daemon = rt
        .block_on(Daemon::start(Config::load(&toml).unwrap()))
        .unwrap();
    rt.block_on(daemon.shutdown());

    let export = exchange(
        &net,
        &[
            "audit",
            "export",
            "--store",
            &url,
            "--out",
            "pg-audit.jsonl",
        ],
    )
    .ok();
    assert!(
        export.stderr().contains("exported entries 0.."),
        "{}",
        export.stderr()
    );
    let verified = exchange(
        &net,
        &[
            "audit",
            "verify",
            "--cert",
            "clinic/identity.pem",
            "pg-audit.jsonl",
        ],
    )
    .ok();
    assert!(
        !verified.stdout().contains("PROBLEM"),
        "{}",
        verified.stdout()
    );

    let report = exchange(
        &net,
        &[
            "provisions",
            "--data",
            "clinic/data",
            "--store",
            &url,
            "--subject",
            "P-000123",
        ],
    )
    .ok()
    .stdout();
    assert!(report.contains("records: 0"), "{report}");
    assert!(report.contains(&format!("store: {url}")), "{report}");

    // From the configuration ([store] url), and from --data with --store.
    let out = exchange(
        &net,
        &["admin", "verify-store", "--config", "clinic/exchanged.toml"],
    )
    .ok()
    .stdout();
    assert!(out.contains("all verified"), "{out}");
    assert!(out.contains(&url), "{out}");
    let out = exchange(
        &net,
        &[
            "admin",
            "verify-store",
            "--data",
            "clinic/data",
            "--store",
            &url,
            "--ca",
            "ca/ca.pem",
        ],
    )
    .ok()
    .stdout();
    assert!(out.contains("all verified"), "{out}");

    // Backup and restore are SQLite's: a PostgreSQL store is pg_dump's.
    for args in [
        &["admin", "backup", "--store", &url, "--out", "b.tar"][..],
        &["admin", "restore", "--from", "b.tar", "--store", &url][..],
    ] {
        let run = exchange(&net, args).fails();
        assert!(run.stderr().contains("pg_dump"), "{}", run.stderr());
    }
    assert!(!net.join("b.tar").exists());
}

#[test]
fn a_database_without_a_store_and_a_password_are_reported_without_the_password() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = Db::new(&rt);
    let d = tempfile::tempdir().unwrap();
    let run = exchange(d.path(), &["audit", "export", "--store", &db.url()]).fails();
    assert!(run.stderr().contains("no store schema"), "{}", run.stderr());

    let secret = "postgres://someone:s3cret-pw@127.0.0.1:1/nowhere";
    let run = exchange(d.path(), &["audit", "export", "--store", secret]).fails();
    assert!(!run.stderr().contains("s3cret-pw"), "{}", run.stderr());
    assert!(
        run.stderr().contains("someone:***@127.0.0.1:1"),
        "{}",
        run.stderr()
    );
}
