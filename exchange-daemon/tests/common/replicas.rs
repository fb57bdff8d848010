//! Replicas of one facility on one PostgreSQL database, behind one
//! address (the replica test and the load bench).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::pg::TestDb;
use super::{Net, Party, free_port};

/// A TCP front on `port` for `backends` (ports on loopback): each
/// connection goes to the next backend that accepts it, round robin, as a
/// TCP load balancer in front of replicas would. Returns its port.
pub async fn front(port: u16, backends: Vec<u16>) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let next = AtomicUsize::new(0);
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let first = next.fetch_add(1, Ordering::Relaxed);
            let backends = backends.clone();
            tokio::spawn(async move {
                for k in 0..backends.len() {
                    let port = backends[(first + k) % backends.len()];
                    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
                    if let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(Duration::from_millis(500), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `n` replicas of `base`: its credentials, the facility's one pseudonym
/// key, ports and a data directory of their own.
pub fn replicas_of(net: &Net, base: &Party, n: usize) -> Vec<Party> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).unwrap();
    (0..n)
        .map(|r| {
            let name = format!("{}-r{r}", base.name);
            let dir = net.path(&name);
            std::fs::create_dir_all(dir.join("data")).unwrap();
            for f in [
                "identity.pem",
                "identity.key.pem",
                "encryption.pem",
                "encryption.key.pem",
            ] {
                std::fs::copy(base.file(f), dir.join(f)).unwrap();
            }
            std::fs::write(dir.join("data").join("pseudonym.key"), key).unwrap();
            Party {
                name,
                uri: base.uri.clone(),
                dir,
                peer_port: free_port(),
                client_port: free_port(),
            }
        })
        .collect()
}

/// Replica settings (appended to the `[delivery]` table): its own name,
/// `extra` (more `[delivery]` keys, then tables), the side's database.
pub fn replica_settings(node: &str, db: &TestDb, extra: &str) -> String {
    format!(
        "node_name = \"{node}\"\n{extra}\n[store]\nurl = \"{}\"\n",
        db.url()
    )
}
