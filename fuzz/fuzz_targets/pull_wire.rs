//! `gateway::pull_wire::pull_json`: arbitrary bytes as a PullResponse from
//! the RPC server. Must never panic; whatever it accepts must be valid JSON
//! of the documented shape, and must agree with prost's decoding of the same
//! bytes (prost accepting them too). A failed response's messages are not
//! read at all, so there only the code and message are compared, when prost
//! can decode the whole.
#![no_main]

use im_server::gateway::pull_wire::pull_json;
use im_server::proto::PullResponse;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// `data` without its `changes` fields (`PullResponse.changes`, whatever
/// their wire type), which `pull_json` skips unread: an HTTP pull never asks
/// for them (`PullRequest.with_changes`). `None` if `data` does not split
/// into fields.
fn without_changes(mut data: &[u8]) -> Option<Vec<u8>> {
    use prost::encoding::{DecodeContext, decode_key, skip_field};
    let mut kept = Vec::with_capacity(data.len());
    while !data.is_empty() {
        let start = data;
        let (tag, wire_type) = decode_key(&mut data).ok()?;
        skip_field(wire_type, tag, &mut data, DecodeContext::default()).ok()?;
        if tag != im_server::proto::fields::pull_response::CHANGES {
            kept.extend_from_slice(&start[..start.len() - data.len()]);
        }
    }
    Some(kept)
}

fuzz_target!(|data: &[u8]| {
    let Ok(result) = pull_json(data) else { return };
    let data = &without_changes(data).expect("pull_json accepted what does not split into fields")[..];
    let decoded = PullResponse::decode(data);
    match result {
        Err(failed) => {
            if let Ok(decoded) = decoded {
                assert_eq!((failed.code, failed.msg), (decoded.code, decoded.msg));
            }
        }
        Ok(body) => {
            let decoded = decoded.expect("pull_json accepted what prost rejects");
            assert_eq!(decoded.code, 0);
            let json: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            let messages = json["messages"].as_array().expect("messages array");
            assert_eq!(messages.len(), decoded.messages.len());
            for (m, d) in messages.iter().zip(&decoded.messages) {
                assert_eq!(m["chat"], d.chat.as_str());
                assert_eq!(m["text"], d.text.as_str());
                assert_eq!(m["sender"], d.sender.as_str());
                assert_eq!(m["send_time"], d.send_time);
            }
            assert_eq!(json["has_more"], decoded.has_more);
            assert_eq!(json["next_cursor"], decoded.next_cursor);
        }
    }
});
