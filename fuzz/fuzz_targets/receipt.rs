//! Receipt file and network-form parsers, and verification of what parses.
#![no_main]

use std::sync::LazyLock;

use exchange_core::receipt::SignedReceipt;
use exchange_core::trust::TrustStore;
use libfuzzer_sys::fuzz_target;

static TRUST: LazyLock<TrustStore> = LazyLock::new(|| {
    let ca = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/pki/ca.pem")).expect("testdata present");
    TrustStore::builder().anchors_pem(&ca).and_then(|b| b.build()).expect("test trust store")
});

fuzz_target!(|data: &[u8]| {
    for parsed in [SignedReceipt::from_file(data), SignedReceipt::from_bytes(data)] {
        if let Ok(r) = parsed {
            let _ = r.verify(&TRUST);
            assert_eq!(SignedReceipt::from_bytes(&r.to_bytes()).ok(), Some(r));
        }
    }
});
