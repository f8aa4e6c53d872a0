//! Arbitrary bytes as a stream's frame of `BrokerRequestReply`: the broker decodes the client's answers to them. Decoding must
//! return an error or a value that encodes back to a frame that decodes to
//! the same value, and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use msmq_protocol::{decode_frame, encode_frame, BrokerRequestReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = decode_frame::<BrokerRequestReply>(data) {
        let again = encode_frame(&value).expect("a decoded value encodes");
        assert_eq!(decode_frame::<BrokerRequestReply>(&again).ok(), Some(value));
    }
});
