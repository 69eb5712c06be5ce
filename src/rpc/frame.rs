//! RPC framing, with no I/O.
//!
//! ```text
//! +------------+------------+---------------------+------------------+
//! | length u32 | id u64     | method_or_status u8 | protobuf body    |
//! +------------+------------+---------------------+------------------+
//!   big-endian; length counts everything after itself (9 + body)
//! ```
//!
//! `method_or_status` is the method in a request ([`super::method`]) and the
//! status in a reply ([`super::status`]); the reply carries the request's
//! `id`, so replies may come back in any order.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of `id` + `method_or_status`.
const HEADER_AFTER_LENGTH: usize = 9;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    /// [`super::method`] in a request, [`super::status`] in a reply.
    pub method_or_status: u8,
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the limit: the peer is broken or hostile,
    /// and the connection must be closed without buffering it.
    TooLarge(usize),
    /// The announced length cannot even hold the header.
    TooShort(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes is over the limit"),
            FrameError::TooShort(n) => write!(f, "frame of {n} bytes is shorter than its header"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<FrameError> for std::io::Error {
    fn from(err: FrameError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }
}

/// Appends a frame whose body is `message`, encoded in place (no copy).
pub fn encode(out: &mut BytesMut, id: u64, method_or_status: u8, message: &impl prost::Message) {
    let body_len = message.encoded_len();
    out.reserve(4 + HEADER_AFTER_LENGTH + body_len);
    out.put_u32((HEADER_AFTER_LENGTH + body_len) as u32);
    out.put_u64(id);
    out.put_u8(method_or_status);
    // Cannot fail: the space was reserved above.
    let _ = message.encode(out);
}

/// Appends a frame with a raw body.
pub fn encode_raw(out: &mut BytesMut, id: u64, method_or_status: u8, body: &[u8]) {
    out.reserve(4 + HEADER_AFTER_LENGTH + body.len());
    out.put_u32((HEADER_AFTER_LENGTH + body.len()) as u32);
    out.put_u64(id);
    out.put_u8(method_or_status);
    out.put_slice(body);
}

/// Takes one frame off the front of `input`; `Ok(None)` until it is complete.
/// The length is checked before anything is buffered for it, and no room is
/// reserved for the announced length: the buffer grows only as bytes arrive
/// (the read loop's `reserve`, which doubles). Reserving from the header alone
/// let 300 connections that sent 13 bytes each claim 16 MiB apiece, and under
/// an address-space limit the failed allocation aborted the whole process.
pub fn decode(input: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, FrameError> {
    if input.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
    if len > max_frame {
        return Err(FrameError::TooLarge(len));
    }
    if len < HEADER_AFTER_LENGTH {
        return Err(FrameError::TooShort(len));
    }
    if input.len() < 4 + len {
        return Ok(None);
    }
    input.advance(4);
    let mut frame = input.split_to(len);
    let id = frame.get_u64();
    let method_or_status = frame.get_u8();
    Ok(Some(Frame {
        id,
        method_or_status,
        body: frame.freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--max-frame`'s default.
    fn max_frame() -> usize {
        crate::config::Config::defaults().max_frame
    }
    use crate::proto::{Message, SendRequest};

    fn sample() -> SendRequest {
        SendRequest {
            message: Some(Message {
                chat: "a:b".into(),
                text: "hello 🌍".into(),
                sender: "a".into(),
                send_time: 0,
                edited_at: 0,
            }),
            idempotency_key: "key-1".into(),
        }
    }

    #[test]
    fn round_trip_split_at_every_byte() {
        let mut wire = BytesMut::new();
        encode(&mut wire, 7, 1, &sample());
        encode_raw(&mut wire, u64::MAX, 2, b"");
        let wire = wire.freeze();
        for split in 0..=wire.len() {
            let mut input = BytesMut::from(&wire[..split]);
            let mut frames = Vec::new();
            while let Some(f) = decode(&mut input, max_frame()).expect("valid") {
                frames.push(f);
            }
            input.extend_from_slice(&wire[split..]);
            while let Some(f) = decode(&mut input, max_frame()).expect("valid") {
                frames.push(f);
            }
            assert_eq!(frames.len(), 2, "split at {split}");
            assert_eq!((frames[0].id, frames[0].method_or_status), (7, 1));
            assert_eq!(
                <SendRequest as prost::Message>::decode(frames[0].body.clone()),
                Ok(sample())
            );
            assert_eq!(
                (
                    frames[1].id,
                    frames[1].method_or_status,
                    frames[1].body.len()
                ),
                (u64::MAX, 2, 0)
            );
            assert!(input.is_empty());
        }
    }

    #[test]
    fn oversized_and_undersized_lengths_rejected_before_buffering() {
        let mut input = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode(&mut input, 1024),
            Err(FrameError::TooLarge(0xffff_ffff))
        );
        assert!(
            input.capacity() < 1024,
            "must not reserve for a rejected frame"
        );
        let mut input = BytesMut::from(&[0, 0, 0, 3, 1, 2, 3][..]);
        assert_eq!(decode(&mut input, 1024), Err(FrameError::TooShort(3)));
    }

    #[test]
    fn announced_length_is_not_reserved_before_the_body_arrives() {
        // A header announcing a frame just under the limit, and one body byte.
        let mut input = BytesMut::new();
        input.extend_from_slice(&((max_frame() - 4) as u32).to_be_bytes());
        input.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 1, 0]);
        assert_eq!(decode(&mut input, max_frame()), Ok(None));
        assert!(
            input.capacity() < 64 * 1024,
            "reserved {} bytes for a frame of which 14 bytes arrived",
            input.capacity()
        );
        assert_eq!(input.len(), 14, "an incomplete frame stays in the buffer");
    }
}
