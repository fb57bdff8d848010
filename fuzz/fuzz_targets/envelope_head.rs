//! The file-form prefix and head parsers, and the unverified header decoder.
#![no_main]

use exchange_core::envelope::EnvelopeHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = EnvelopeHead::read_from(&mut &data[..]) {
        let _ = head.header_unverified();
        let _ = head.sender_chain_unverified();
        // Re-encoding the prefix must reproduce the bytes that were read.
        let prefix = head.file_prefix();
        assert_eq!(&data[..prefix.len()], prefix.as_slice());
    }
    let _ = EnvelopeHead::decode(data);
});
