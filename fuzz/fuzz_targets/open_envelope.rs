//! Opening arbitrary bytes as the test hospital must fail cleanly unless they
//! are a genuine envelope (seed the corpus with testdata/vectors/v1/cases/*.exenv).
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use exchange_core::envelope::open_slice;
use exchange_core::identity::DecryptionKey;
use exchange_core::trust::TrustStore;
use libfuzzer_sys::fuzz_target;

const PKI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/pki");

static KEYS: LazyLock<(TrustStore, DecryptionKey)> = LazyLock::new(|| {
    let read = |f: &str| std::fs::read(format!("{PKI}/{f}")).expect("testdata present");
    let trust = TrustStore::builder()
        .anchors_pem(&read("ca.pem"))
        .and_then(|b| b.crls_pem(&read("crl.pem")))
        .and_then(|b| b.build())
        .expect("test trust store");
    let key = DecryptionKey::from_pem(&read("hospital/encryption.pem"), &read("hospital/encryption.key.pem"))
        .expect("test key");
    (trust, key)
});

fuzz_target!(|data: &[u8]| {
    let (trust, key) = &*KEYS;
    let now = UNIX_EPOCH + Duration::from_secs(1_780_275_600);
    let _ = open_slice(data, trust, std::slice::from_ref(key), now);
});
