//! Reading and writing protobuf fields by hand, on borrowed bytes, where
//! building prost structs would only allocate strings to copy them again:
//! the pull path (Redis member -> RPC reply -> JSON).

use bytes::{Buf, BufMut};
use prost::encoding::{
    WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed protobuf: {}", self.0)
    }
}

/// One field's value, borrowed from the input.
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    /// A 32-bit field, skipped.
    Other,
}

/// Reads the next field (number, value) off the front of `buf`.
pub fn next_field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Value<'a>), Malformed> {
    let bad_varint = |_| Malformed("bad key or varint");
    let (tag, wire_type) = decode_key(buf).map_err(bad_varint)?;
    let value = match wire_type {
        WireType::Varint => Value::Varint(decode_varint(buf).map_err(bad_varint)?),
        WireType::LengthDelimited => {
            let len = decode_varint(buf).map_err(bad_varint)?;
            let len = usize::try_from(len).map_err(|_| Malformed("length past the end"))?;
            if len > buf.len() {
                return Err(Malformed("length past the end"));
            }
            let (value, rest) = buf.split_at(len);
            *buf = rest;
            Value::Bytes(value)
        }
        WireType::SixtyFourBit => {
            if buf.len() < 8 {
                return Err(Malformed("fixed field past the end"));
            }
            Value::Fixed64(buf.get_u64_le())
        }
        WireType::ThirtyTwoBit => {
            if buf.len() < 4 {
                return Err(Malformed("fixed field past the end"));
            }
            buf.advance(4);
            Value::Other
        }
        WireType::StartGroup | WireType::EndGroup => return Err(Malformed("groups")),
    };
    Ok((tag, value))
}

/// A string field's bytes as `&str`.
pub fn text(bytes: &[u8]) -> Result<&str, Malformed> {
    std::str::from_utf8(bytes).map_err(|_| Malformed("string is not UTF-8"))
}

/// Encoded size of a length-delimited field (key + length + bytes).
pub fn bytes_field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Encoded size of a varint field, 0 when proto3 omits it.
pub fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        prost::encoding::key_len(tag) + encoded_len_varint(value)
    }
}

/// Appends a length-delimited field; proto3 omits empty ones.
pub fn put_bytes_field(out: &mut impl BufMut, tag: u32, value: &[u8]) {
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

/// Appends a varint field; proto3 omits zero.
pub fn put_varint_field(out: &mut impl BufMut, tag: u32, value: u64) {
    if value == 0 {
        return;
    }
    encode_key(tag, WireType::Varint, out);
    encode_varint(value, out);
}
