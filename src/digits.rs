//! Integers written as ASCII digits straight into an output buffer, without
//! going through `fmt`: the lengths and numbers of the wire formats (HTTP
//! status, `Content-Length` and chunk sizes, RESP lengths, event ids).

use bytes::{BufMut, BytesMut};

/// Decimal digits of `v`.
pub fn put_u64(out: &mut BytesMut, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

/// Lower-case hexadecimal digits of `v` (a chunk size).
pub fn put_hex(out: &mut BytesMut, mut v: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[v % 16];
        v /= 16;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_have_no_leading_zeros() {
        let mut big = BytesMut::new();
        put_hex(&mut big, 0x10_0000);
        put_hex(&mut big, 0);
        assert_eq!(&big[..], b"1000000");
    }
}
