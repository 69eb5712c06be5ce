//! The Redis side of a [`mux`](crate::mux) connection: replies come back in
//! the order commands were written, so a command's tag is its position in
//! the pipeline.

use std::io;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::decode::decode_bytes_mut;
use tokio::net::{TcpStream, UnixStream};

use super::Reply;
use super::url::{Address, RedisTarget};
use crate::mux::{Protocol, Stream};

pub struct RespProtocol {
    target: RedisTarget,
    /// Commands run on every new connection before any request (AUTH,
    /// SELECT, loading functions): a restarted Redis gets them again.
    setup: Vec<Bytes>,
    written: u64,
    answered: u64,
}

impl RespProtocol {
    pub fn new(target: RedisTarget, extra_setup: &[Bytes]) -> Self {
        let mut setup = Vec::new();
        if let Some(password) = &target.password {
            match &target.username {
                Some(user) => setup.push(super::command::encode(&[
                    b"AUTH",
                    user.as_bytes(),
                    password.as_bytes(),
                ])),
                None => setup.push(super::command::encode(&[b"AUTH", password.as_bytes()])),
            }
        }
        if target.db != 0 {
            setup.push(super::command::encode(&[
                b"SELECT",
                target.db.to_string().as_bytes(),
            ]));
        }
        setup.extend_from_slice(extra_setup);
        RespProtocol {
            target,
            setup,
            written: 0,
            answered: 0,
        }
    }
}

/// Largest reply we buffer: a full page is under 7 MiB. A peer announcing
/// more is broken or hostile, and the connection is dropped instead of
/// buffering without end.
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// Takes one reply off the front of `input`.
pub fn decode_reply(input: &mut BytesMut) -> io::Result<Option<Reply>> {
    match decode_bytes_mut(input) {
        Ok(Some((reply, _, _))) => Ok(Some(reply)),
        Ok(None) if input.len() > MAX_REPLY_BYTES => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "RESP reply over the size limit",
        )),
        Ok(None) => Ok(None),
        Err(err) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad RESP reply: {err:?}"),
        )),
    }
}

impl Protocol for RespProtocol {
    type Request = Bytes;
    type Reply = Reply;

    async fn connect(&mut self) -> io::Result<Stream> {
        let stream = match &self.target.address {
            Address::Tcp(addr) => {
                let socket = TcpStream::connect(addr).await?;
                socket.set_nodelay(true)?;
                Stream::Tcp(socket)
            }
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
        };
        let mut input = BytesMut::new();
        for command in &self.setup {
            stream.write_all(command).await?;
            let reply = loop {
                if let Some(reply) = decode_reply(&mut input)? {
                    break reply;
                }
                stream.read_some(&mut input).await?;
            };
            if let Reply::Error(err) = reply {
                return Err(io::Error::other(format!("set-up command refused: {err}")));
            }
        }
        self.written = 0;
        self.answered = 0;
        Ok(stream)
    }

    fn encode(&mut self, request: Bytes, out: &mut BytesMut) -> u64 {
        out.extend_from_slice(&request);
        self.written += 1;
        self.written
    }

    fn decode(&mut self, input: &mut BytesMut) -> io::Result<Option<(u64, Reply)>> {
        Ok(decode_reply(input)?.map(|reply| {
            self.answered += 1;
            (self.answered, reply)
        }))
    }

    fn queued_bytes(request: &Bytes) -> usize {
        request.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_across_any_split() {
        let wire: &[u8] = b"+OK\r\n:1732723200000001\r\n*2\r\n$3\r\nabc\r\n$-1\r\n-ERR boom\r\n";
        for split in 0..=wire.len() {
            let mut input = BytesMut::from(&wire[..split]);
            let mut replies = Vec::new();
            while let Some(r) = decode_reply(&mut input).expect("valid") {
                replies.push(r);
            }
            input.extend_from_slice(&wire[split..]);
            while let Some(r) = decode_reply(&mut input).expect("valid") {
                replies.push(r);
            }
            assert_eq!(replies.len(), 4, "split at {split}");
            assert_eq!(replies[1], Reply::Integer(1_732_723_200_000_001));
            assert!(matches!(&replies[3], Reply::Error(e) if &**e == "ERR boom"));
        }
    }

    #[test]
    fn huge_announced_lengths_allocate_nothing_up_front() {
        for input in [
            &b"*2147483647\r\n"[..],
            b"$9999999999999\r\n",
            b"*9223372036854775807\r\n:1\r\n",
        ] {
            let mut buf = BytesMut::from(input);
            assert!(
                decode_reply(&mut buf)
                    .expect("incomplete, not invalid")
                    .is_none()
            );
            assert!(buf.capacity() < 64, "reserved {} bytes", buf.capacity());
        }
        for input in [&b"$-5\r\n"[..], b"*-7\r\n"] {
            assert!(decode_reply(&mut BytesMut::from(input)).is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut input = BytesMut::from(&b"?what\r\n"[..]);
        assert!(decode_reply(&mut input).is_err());
    }
}
