//! Daemons run in a test process from the configs `exchange demo --dir`
//! (or a test) wrote: `DIR/SITE/exchanged.toml` for each site.

use std::path::Path;

/// Running daemons and the runtime that drives them.
pub(crate) struct LiveNet {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) daemons: Vec<exchange_daemon::Daemon>,
}

impl LiveNet {
    /// The demo network's four daemons.
    #[allow(dead_code)]
    pub(crate) fn start(net: &Path) -> Self {
        Self::start_sites(net, &["clinic", "hospital", "agent", "payer"])
    }

    /// The daemons of `sites`, in that order.
    pub(crate) fn start_sites(dir: &Path, sites: &[&str]) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let daemons = runtime.block_on(async {
            let mut v = Vec::new();
            for site in sites {
                let config =
                    exchange_daemon::Config::load(&dir.join(site).join("exchanged.toml")).unwrap();
                v.push(exchange_daemon::Daemon::start(config).await.unwrap());
            }
            v
        });
        Self { runtime, daemons }
    }

    /// Stops every daemon gracefully.
    pub(crate) fn stop(self) {
        self.runtime.block_on(async {
            for d in self.daemons {
                d.shutdown().await;
            }
        });
    }
}
