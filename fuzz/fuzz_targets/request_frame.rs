//! Arbitrary bytes as a stream's frame of `Request`: the broker decodes every client request. Decoding must
//! return an error or a value that encodes back to a frame that decodes to
//! the same value, and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use msmq_protocol::{decode_frame, encode_frame, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = decode_frame::<Request>(data) {
        let again = encode_frame(&value).expect("a decoded value encodes");
        assert_eq!(decode_frame::<Request>(&again).ok(), Some(value));
    }
});
