//! Arbitrary bytes as a stream's frame of `BrokerRequest`: the client decodes the broker's own requests (transaction check-backs). Decoding must
//! return an error or a value that encodes back to a frame that decodes to
//! the same value, and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use msmq_protocol::{decode_frame, encode_frame, BrokerRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = decode_frame::<BrokerRequest>(data) {
        let again = encode_frame(&value).expect("a decoded value encodes");
        assert_eq!(decode_frame::<BrokerRequest>(&again).ok(), Some(value));
    }
});
