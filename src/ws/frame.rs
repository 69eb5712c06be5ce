//! RFC 6455 frames, with no I/O: a decoder that reassembles fragmented
//! messages and checks every rule a receiver must (masking, reserved bits,
//! opcodes, control frames, close codes, UTF-8 of text, size), and the
//! encoders for both directions (the server's frames are unmasked; the
//! masked client encoder serves the tests and the benchmark client).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The opcodes of RFC 6455 §5.2; the others are reserved (close 1002).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Close codes used here (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Largest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A whole message or control frame from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message, its UTF-8 checked.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: its code and reason, if it had a body.
    Close(Option<(u16, String)>),
}

/// Why the peer broke the protocol; each maps to the close code sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// 1002: a framing rule was broken.
    Protocol(&'static str),
    /// 1007: a text message (or a close reason) is not UTF-8.
    InvalidUtf8,
    /// 1009: a message over the size limit.
    TooBig,
}

impl FrameError {
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => close_code::PROTOCOL_ERROR,
            FrameError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            FrameError::TooBig => close_code::TOO_BIG,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Protocol(why) => why,
            FrameError::InvalidUtf8 => "a text message is not valid UTF-8",
            FrameError::TooBig => "message too big",
        }
    }
}

/// Which side decodes: a server requires masked frames, a client unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// A frame's head, parsed.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

/// Decodes frames from the bytes read, reassembling fragmented messages.
/// A message's size is checked from its frames' heads, before their
/// payloads are waited for, so a peer announcing a huge frame is refused
/// without any of it being buffered.
#[derive(Debug)]
pub struct Decoder {
    side: Side,
    max_message: usize,
    /// A fragmented message being reassembled: its opcode and data so far.
    partial: Option<(u8, BytesMut)>,
}

impl Decoder {
    pub fn new(side: Side, max_message: usize) -> Decoder {
        Decoder {
            side,
            max_message,
            partial: None,
        }
    }

    /// The next whole message or control frame in `input` (consumed), or
    /// `None` until more bytes arrive. After an error the decoder is not to
    /// be used again: the connection closes.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(head) = self.head(input)? else {
                return Ok(None);
            };
            if input.len() < head.header_len + head.payload_len {
                input.reserve(head.header_len + head.payload_len - input.len());
                return Ok(None);
            }
            input.advance(head.header_len);
            let mut payload = input.split_to(head.payload_len);
            if let Some(mask) = head.mask {
                apply_mask(&mut payload, mask);
            }
            if let Some(message) = self.assemble(head, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Parses and checks the head at the start of `input`, if it is whole.
    fn head(&self, input: &[u8]) -> Result<Option<Head>, FrameError> {
        let Some(head) = parse_head(input)? else {
            return Ok(None);
        };
        match (self.side, head.mask.is_some()) {
            (Side::Server, false) => {
                return Err(FrameError::Protocol("client frames must be masked"));
            }
            (Side::Client, true) => {
                return Err(FrameError::Protocol("server frames must not be masked"));
            }
            _ => {}
        }
        let control = head.opcode & 0x8 != 0;
        if control {
            if !head.fin {
                return Err(FrameError::Protocol(
                    "a control frame must not be fragmented",
                ));
            }
            if head.payload_len > MAX_CONTROL_PAYLOAD {
                return Err(FrameError::Protocol(
                    "a control frame's payload is over 125 bytes",
                ));
            }
            return Ok(Some(head));
        }
        let so_far = match (&self.partial, head.opcode) {
            (None, opcode::CONTINUATION) => {
                return Err(FrameError::Protocol(
                    "a continuation frame without a message to continue",
                ));
            }
            (Some(_), opcode::TEXT | opcode::BINARY) => {
                return Err(FrameError::Protocol(
                    "a new message before the fragmented one ended",
                ));
            }
            (Some((_, data)), _) => data.len(),
            (None, _) => 0,
        };
        if so_far.saturating_add(head.payload_len) > self.max_message {
            return Err(FrameError::TooBig);
        }
        Ok(Some(head))
    }

    /// Takes one frame's payload: a control frame or a message's last
    /// fragment gives a message.
    fn assemble(&mut self, head: Head, payload: BytesMut) -> Result<Option<Incoming>, FrameError> {
        match head.opcode {
            opcode::PING => return Ok(Some(Incoming::Ping(payload.freeze()))),
            opcode::PONG => return Ok(Some(Incoming::Pong(payload.freeze()))),
            opcode::CLOSE => {
                return close_frame(&payload).map(|close| Some(Incoming::Close(close)));
            }
            _ => {}
        }
        let (kind, data) = match (self.partial.take(), head.fin) {
            (None, true) => (head.opcode, payload),
            (None, false) => {
                self.partial = Some((head.opcode, payload));
                return Ok(None);
            }
            (Some((kind, mut data)), fin) => {
                data.unsplit(payload);
                if !fin {
                    self.partial = Some((kind, data));
                    return Ok(None);
                }
                (kind, data)
            }
        };
        let data = data.freeze();
        if kind == opcode::BINARY {
            return Ok(Some(Incoming::Binary(data)));
        }
        std::str::from_utf8(&data).map_err(|_| FrameError::InvalidUtf8)?;
        Ok(Some(Incoming::Text(data)))
    }
}

/// The head at the start of `input`: `None` until it is whole. Checks what
/// does not depend on the side or on earlier frames (reserved bits and
/// opcodes, the 64-bit length's top bit).
fn parse_head(input: &[u8]) -> Result<Option<Head>, FrameError> {
    let [b0, b1, ..] = *input else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set without an extension",
        ));
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(FrameError::Protocol("unknown opcode"));
    }
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut at) = match b1 & 0x7F {
        126 => match input.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(b) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(b);
                (u64::from_be_bytes(len), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if payload_len >> 63 != 0 {
        return Err(FrameError::Protocol(
            "a payload length with its top bit set",
        ));
    }
    let mask = if masked {
        let Some(key) = input.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    Ok(Some(Head {
        fin: b0 & 0x80 != 0,
        opcode,
        mask,
        header_len: at,
        // Larger than memory: the size check refuses it.
        payload_len: usize::try_from(payload_len).unwrap_or(usize::MAX),
    }))
}

/// A close frame's body: none, or a valid code and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Option<(u16, String)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("a close frame with a one-byte body")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !valid_close_code(code) {
                return Err(FrameError::Protocol("an invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

/// Codes a peer may send (§7.4): the defined ones not reserved for local
/// use (1004, 1005, 1006, 1015), and the registered and private ranges.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the masking key (§5.3), eight bytes at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so at key offset 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends a frame's head: `fin`, `opcode`, the payload length and, for a
/// client, the masking key.
fn put_head(out: &mut BytesMut, fin: bool, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.put_u8(if fin { 0x80 } else { 0 } | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match len {
        0..=125 => out.put_u8(mask_bit | len as u8),
        126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(len as u64);
        }
    }
    if let Some(key) = mask {
        out.put_slice(&key);
    }
}

/// Appends one unmasked frame (what a server sends).
pub fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    put_head(out, true, opcode, payload.len(), None);
    out.put_slice(payload);
}

/// The whole length (head and payload) of the first of `frames`, frames
/// this side wrote with [`put_frame`]; `None` if it is not all there. So a
/// run of frames rendered once can be handed out frame by frame.
pub fn sent_frame_len(frames: &[u8]) -> Option<usize> {
    let head = parse_head(frames).ok()??;
    let len = head.header_len.checked_add(head.payload_len)?;
    (frames.len() >= len).then_some(len)
}

/// Appends a close frame with `code` and `reason` (cut to fit 125 bytes).
pub fn put_close(out: &mut BytesMut, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = Vec::with_capacity(2 + end);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..end]);
    put_frame(out, opcode::CLOSE, &body);
}

/// Appends one masked frame, as a client sends it (any `fin` and opcode,
/// so tests can also send what a server must refuse).
pub fn put_client_frame(out: &mut BytesMut, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.reserve(payload.len() + 14);
    put_head(out, fin, opcode, payload.len(), Some(mask));
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask);
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
