//! Databases of their own on the PostgreSQL server at 127.0.0.1:5432 (user
//! postgres, trust authentication), created for a test and dropped after
//! it. `EXCHANGE_TEST_PG` overrides the server (a connection string to its
//! maintenance database). No server is a test failure, not a skip.

use std::sync::atomic::{AtomicU32, Ordering};

static ADMIN_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Creates the test databases from the database at `url` (the load
/// bench's `--store`); call before the first [`TestDb`].
pub fn set_admin_url(url: &str) {
    let _ = ADMIN_URL.set(url.to_owned());
}

/// The maintenance database the test databases are created from.
pub fn admin_url() -> String {
    if let Some(url) = ADMIN_URL.get() {
        return url.clone();
    }
    std::env::var("EXCHANGE_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// Whether the daemons of the integration suites run on PostgreSQL
/// (`EXCHANGE_TEST_STORE=postgres`) rather than on SQLite.
pub fn suites_on_postgres() -> bool {
    std::env::var("EXCHANGE_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Runs `sql` on the maintenance database, on a thread of its own (callers
/// may be inside a runtime, or in `Drop`).
fn admin(sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
                .await
                .map_err(|e| {
                    format!(
                        "cannot reach PostgreSQL at {:?} (is it running? .ci/run starts it): {e}",
                        admin_url()
                    )
                })?;
            let task = tokio::spawn(conn);
            let r = client.batch_execute(&sql).await.map_err(|e| {
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            });
            drop(client);
            let _ = task.await;
            r
        })
    })
    .join()
    .unwrap_or_else(|_| Err("admin thread panicked".into()))
}

/// A database of its own, dropped (with its connections) when this is.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Creates `exchange_test_<pid>_<n>_<random>`.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).unwrap();
        let name = format!(
            "exchange_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            hex::encode(r)
        );
        admin(format!("CREATE DATABASE {name}")).unwrap();
        Self { name }
    }

    /// Its connection string.
    pub fn url(&self) -> String {
        let base = admin_url();
        match base
            .strip_prefix("postgres://")
            .or(base.strip_prefix("postgresql://"))
        {
            Some(rest) => {
                let host = rest.split('/').next().unwrap_or(rest);
                format!("postgres://{host}/{}", self.name)
            }
            None => {
                let kept: Vec<&str> = base
                    .split_whitespace()
                    .filter(|kv| !kv.starts_with("dbname="))
                    .collect();
                format!("{} dbname={}", kept.join(" "), self.name)
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `sql` (one statement returning one bigint) on the database at `url`.
pub fn count(url: &str, sql: &str) -> u64 {
    let n: i64 = query(url, sql, |r| r.get(0)).remove(0);
    u64::try_from(n).unwrap()
}

/// Runs `sql` on the database at `url` and maps its rows.
pub fn query<T: Send + 'static>(
    url: &str,
    sql: &str,
    map: fn(&tokio_postgres::Row) -> T,
) -> Vec<T> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let task = tokio::spawn(conn);
            let rows = client.query(&sql, &[]).await.unwrap();
            drop(client);
            let _ = task.await;
            rows.iter().map(map).collect()
        })
    })
    .join()
    .unwrap()
}

/// Runs `sql` (statements without results) on the database at `url`.
pub fn execute(url: &str, sql: &str) {
    try_execute(url, sql).unwrap();
}

/// Every value of every row of every table of the database at `url`
/// (`bytea` as stored, the rest as text), concatenated.
pub fn all_values(url: &str) -> Vec<u8> {
    let columns = query(
        url,
        "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        |r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
            )
        },
    );
    let mut out = Vec::new();
    for (table, column, ty) in columns {
        let values: Vec<Vec<u8>> = if ty == "bytea" {
            query(
                url,
                &format!("SELECT \"{column}\" FROM \"{table}\" WHERE \"{column}\" IS NOT NULL"),
                |r| r.get(0),
            )
        } else {
            query(
                url,
                &format!(
                    "SELECT \"{column}\"::text FROM \"{table}\" WHERE \"{column}\" IS NOT NULL"
                ),
                |r| r.get::<_, String>(0).into_bytes(),
            )
        };
        out.extend(values.concat());
    }
    out
}

/// Runs `sql` (statements without results) on the database at `url`; the
/// server's message if it fails.
pub fn try_execute(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let task = tokio::spawn(conn);
            let r = client.batch_execute(&sql).await.map_err(|e| {
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            });
            drop(client);
            let _ = task.await;
            r
        })
    })
    .join()
    .unwrap()
}
