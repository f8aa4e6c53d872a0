//! Arbitrary text as a tag expression and as a SQL92 filter: compiling must
//! give a filter or an error, never panic, and a compiled filter must
//! evaluate any message without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use msmq_protocol::filter::Filter;
use msmq_protocol::{Header, Message, MessageId};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The first line is the tag expression, the rest the SQL.
    let (tags, sql) = text.split_once('\n').unwrap_or((&text, ""));
    let tags = (!tags.is_empty()).then_some(tags);
    let sql = (!sql.is_empty()).then_some(sql);
    if let Ok(filter) = Filter::compile(tags, sql) {
        let message = Message {
            offset: 7,
            id: MessageId::new(1, 2),
            timestamp_ms: 1_700_000_000_000,
            payload: b"payload".to_vec(),
            key: None,
            tag: Some("TagA".into()),
            headers: vec![
                Header {
                    name: "amount".into(),
                    value: "100.5".into(),
                },
                Header {
                    name: "region".into(),
                    value: "eu".into(),
                },
            ],
        };
        let _ = filter.matches(&message);
        let _ = filter.matches_all();
    }
});
