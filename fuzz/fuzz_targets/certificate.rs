//! Certificate parsing (DER and PEM) and the exchange profile checks.
#![no_main]

use exchange_core::identity::Certificate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Certificate::from_der(data.to_vec()) {
        let _ = (c.party(), c.public_key(), c.key_role(), c.fingerprint());
    }
    let _ = Certificate::from_pem(data);
});
