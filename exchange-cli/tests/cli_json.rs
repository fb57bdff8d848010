//! The `exchange` command as a Unix tool: the JSON of every command has the
//! fields docs/cli-json.md documents, with their types, and every command
//! ends quietly when the reader of its standard output has gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/live_net.rs"]
mod live_net;
use live_net::LiveNet;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

fn exchange(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `exchange` with its standard output a pipe whose reading end is
/// already closed, as `exchange … | head -c 0` leaves it; returns the exit
/// status and standard error.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON types of docs/cli-json.md.
#[derive(Clone, Copy, Debug)]
enum Ty {
    Str,
    Int,
    Bool,
    /// A message id: 32 hex digits in UUID groups.
    Id,
    /// RFC 3339, UTC, milliseconds.
    Time,
    Array,
    Object,
    /// A string or null.
    StrOrNull,
    /// A boolean or null.
    BoolOrNull,
    /// An integer or null.
    IntOrNull,
}

fn check(v: &Value, fields: &[(&str, Ty)], what: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    for (name, ty) in fields {
        let f = obj
            .get(*name)
            .unwrap_or_else(|| panic!("{what}: field {name} missing in {v:#}"));
        let good = match ty {
            Ty::Str => f.is_string(),
            Ty::Int => f.is_u64(),
            Ty::Bool => f.is_boolean(),
            Ty::Id => f.as_str().is_some_and(|s| {
                s.len() == 36
                    && s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
                    && s.chars()
                        .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
            }),
            Ty::Time => f
                .as_str()
                .is_some_and(|s| s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T'),
            Ty::Array => f.is_array(),
            Ty::Object => f.is_object(),
            Ty::StrOrNull => f.is_string() || f.is_null(),
            Ty::BoolOrNull => f.is_boolean() || f.is_null(),
            Ty::IntOrNull => f.is_u64() || f.is_null(),
        };
        assert!(good, "{what}: field {name} is not {ty:?}: {f}");
    }
}

fn one_of(v: &Value, field: &str, names: &[&str]) {
    let s = v[field].as_str().unwrap_or_default();
    assert!(names.contains(&s), "{field} = {s:?}, not one of {names:?}");
}

#[test]
fn every_json_output_has_its_documented_fields_and_a_closed_pipe_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    ok(exchange(
        d.path(),
        &["demo", "--dir", "net", "--burst", "0"],
    ));
    let net = d.path().join("net");
    let live = LiveNet::start(&net);
    let clinic = ["--client-config", "clinic/app/client.toml"];
    let hospital = ["--client-config", "hospital/app/client.toml"];
    std::fs::write(net.join("note.txt"), b"a short note (synthetic)").unwrap();

    // send --json, without and with --wait.
    let send = |extra: &[&str]| {
        let args = [
            &[
                "send",
                "--to",
                HOSPITAL,
                "--content-type",
                "text/plain",
                "--purpose",
                "treatment",
                "--subject",
                "P-000123",
                "--in",
                "note.txt",
                "--json",
            ][..],
            extra,
            &clinic[..],
        ]
        .concat();
        serde_json::from_str::<Value>(&ok(exchange(&net, &args))).unwrap()
    };
    let sent = send(&[]);
    check(
        &sent,
        &[("message_id", Ty::Id), ("ciphertext_length", Ty::Int)],
        "send --json",
    );
    let waited = send(&["--wait"]);

    // status --json (and send --wait --json, which prints the same object).
    let id = waited["message_id"].as_str().unwrap().to_owned();
    let status: Value = serde_json::from_str(&ok(exchange(
        &net,
        &[&["status", &id, "--json"], &clinic[..]].concat(),
    )))
    .unwrap();
    for (v, what) in [(&waited, "send --wait --json"), (&status, "status --json")] {
        check(
            v,
            &[
                ("message_id", Ty::Id),
                ("state", Ty::Str),
                ("created", Ty::Time),
                ("expires", Ty::Time),
                ("hops", Ty::Array),
                ("receipts", Ty::Array),
                ("provisions", Ty::Array),
            ],
            what,
        );
        one_of(v, "state", &["DELIVERED", "PROCESSED"]);
        let hop = &v["hops"][0];
        check(
            hop,
            &[
                ("party", Ty::Str),
                ("state", Ty::Str),
                ("attempts", Ty::Int),
                ("last_error", Ty::Str),
            ],
            "status hop",
        );
        one_of(hop, "state", &["DELIVERED"]);
        let r = &v["receipts"][0];
        check(
            r,
            &[
                ("issuer", Ty::Str),
                ("issuer_name", Ty::Str),
                ("role", Ty::Str),
                ("disposition", Ty::Str),
                ("reason", Ty::Str),
                ("time", Ty::Time),
                ("provision_boundary", Ty::Bool),
                ("issuer_revoked_since", Ty::Bool),
            ],
            "status receipt",
        );
        one_of(r, "role", &["THIRD_PARTY"]);
        one_of(r, "disposition", &["DELIVERED"]);
        let p = &v["provisions"][0];
        check(
            p,
            &[
                ("recipient", Ty::Str),
                ("provision", Ty::Str),
                ("boundary", Ty::Str),
                ("receipt", Ty::IntOrNull),
            ],
            "status provision",
        );
        one_of(p, "provision", &["PASSED"]);
    }

    // inbox --json.
    let inbox: Value = serde_json::from_str(&ok(exchange(
        &net,
        &[&["inbox", "--json"], &hospital[..]].concat(),
    )))
    .unwrap();
    let items = inbox.as_array().unwrap();
    assert!(items.len() >= 2, "{inbox:#}");
    for item in items {
        check(
            item,
            &[
                ("message_id", Ty::Id),
                ("sender", Ty::Str),
                ("content_type", Ty::Str),
                ("purpose", Ty::Str),
                ("received", Ty::Time),
                ("sealed_size", Ty::Int),
                ("acked", Ty::Bool),
            ],
            "inbox --json",
        );
    }

    // inspect --json, unverified and verified, of an envelope sealed offline.
    ok(exchange(
        &net,
        &[
            "seal",
            "--from",
            "clinic",
            "--to",
            "hospital/encryption.pem",
            "--trust",
            "ca/ca.pem",
            "--content-type",
            "text/plain",
            "--in",
            "note.txt",
            "--out",
            "note.exenv",
        ],
    ));
    for trust in [&[][..], &["--trust", "ca/ca.pem"][..]] {
        let v: Value = serde_json::from_str(&ok(exchange(
            &net,
            &[&["inspect", "--json"], trust, &["note.exenv"]].concat(),
        )))
        .unwrap();
        check(
            &v,
            &[
                ("file", Ty::Str),
                ("message_id", Ty::Id),
                ("sender", Ty::Str),
                ("sender_name", Ty::Str),
                ("sender_fingerprint", Ty::Str),
                ("recipients", Ty::Array),
                ("route", Ty::Array),
                ("created", Ty::Time),
                ("expires", Ty::Time),
                ("content_type", Ty::Str),
                ("purpose", Ty::Str),
                ("payload_length", Ty::Int),
                ("chunk_size", Ty::Int),
                ("ciphertext_length", Ty::Int),
                ("ciphertext_length_in_file", Ty::Int),
                ("ciphertext_sha256", Ty::Str),
                ("header_sha256", Ty::Str),
                ("verified", Ty::BoolOrNull),
                ("error", Ty::StrOrNull),
                ("reason", Ty::StrOrNull),
            ],
            "inspect --json",
        );
        check(
            &v["recipients"][0],
            &[
                ("party", Ty::Str),
                ("role", Ty::Str),
                ("key_fingerprint", Ty::Str),
            ],
            "inspect recipient",
        );
        assert_eq!(v["verified"].as_bool(), trust.first().map(|_| true));
    }

    // provisions --format json.
    let report: Value = serde_json::from_str(&ok(exchange(
        &net,
        &[
            "provisions",
            "--data",
            "clinic/data",
            "--subject",
            "P-000123",
            "--format",
            "json",
        ],
    )))
    .unwrap();
    check(
        &report,
        &[("subject", Ty::Object), ("records", Ty::Array)],
        "provisions",
    );
    check(
        &report["subject"],
        &[("system", Ty::Str), ("value", Ty::Str)],
        "provisions subject",
    );
    let record = &report["records"][0];
    check(
        record,
        &[
            ("direction", Ty::Str),
            ("time", Ty::Time),
            ("time_ms", Ty::Int),
            ("counterparty", Ty::Str),
            ("counterparty_name", Ty::Str),
            ("recipient", Ty::Str),
            ("role", Ty::Str),
            ("document_type", Ty::Str),
            ("title", Ty::Str),
            ("purpose", Ty::Str),
            ("content_type", Ty::Str),
            ("message_id", Ty::Id),
            ("receipt", Ty::Str),
        ],
        "provisions record",
    );
    one_of(record, "direction", &["provided", "received"]);

    // A closed pipe: every kind of command ends quietly, status 141, as cat does.
    let commands: Vec<Vec<&str>> = vec![
        [&["inbox", "--json"][..], &hospital[..]].concat(),
        [&["inbox"][..], &hospital[..]].concat(),
        [&["status", &id, "--json"][..], &clinic[..]].concat(),
        [&["status", &id][..], &clinic[..]].concat(),
        vec!["inspect", "--json", "note.exenv"],
        vec!["inspect", "--trust", "ca/ca.pem", "note.exenv"],
        vec![
            "provisions",
            "--data",
            "clinic/data",
            "--subject",
            "P-000123",
        ],
        vec!["audit", "export", "--data", "clinic/data"],
        vec![
            "cert",
            "verify",
            "--trust",
            "ca/ca.pem",
            "hospital/identity.pem",
        ],
    ];
    for args in &commands {
        let (code, stderr) = with_closed_stdout(&net, args);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "exchange {args:?} on a closed pipe: {stderr}"
        );
        assert!(
            stderr.lines().all(|l| l.starts_with("exported entries")),
            "exchange {args:?} wrote to stderr: {stderr}"
        );
        assert_eq!(code, Some(141), "exchange {args:?}: {stderr}");
    }
    // And the real thing: `exchange inbox --json | head -c 100`.
    let piped = Command::new("sh")
        .current_dir(&net)
        .arg("-c")
        .arg(format!(
            "'{}' inbox --json --client-config hospital/app/client.toml | head -c 100 >/dev/null",
            env!("CARGO_BIN_EXE_exchange")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    live.stop();
}
