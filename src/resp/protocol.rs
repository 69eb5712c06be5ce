//! The Redis side of a [`mux`](crate::mux) connection: replies come back in
//! the order commands were written, so a command's tag is its position in
//! the pipeline.
//!
//! A request may be several commands written together that must not be
//! separated (`ASKING` + the command it applies to; a write + the `WAIT` for
//! its replication): it says how many replies it produces, its tag is the
//! position of the last, and the caller gets all of them as one array.

use std::collections::VecDeque;
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
    /// Reply counts of the written multi-reply requests, in order, with the
    /// tag of each one's last reply.
    groups: VecDeque<(u64, usize)>,
    /// Replies of the multi-reply request being answered.
    partial: Vec<Reply>,
}

/// One or more commands, written together, and how many replies they produce.
#[derive(Debug, Clone)]
pub struct RespRequest {
    pub wire: Bytes,
    pub replies: usize,
}

impl From<Bytes> for RespRequest {
    fn from(wire: Bytes) -> Self {
        RespRequest { wire, replies: 1 }
    }
}

impl RespRequest {
    /// `ASKING` right before `self` (an ASK redirection): the node accepts the
    /// next command for a slot it is importing.
    pub fn asking(self) -> RespRequest {
        self.surround(&[super::command::encode(&[b"ASKING"])], &[])
    }

    /// `self`, then `WAIT replicas timeout_ms`: the WAIT's reply (how many
    /// replicas acknowledged every write before it) comes in the same round trip.
    pub fn then_wait(self, replicas: u32, timeout_ms: u64) -> RespRequest {
        let wait = super::command::encode(&[
            b"WAIT",
            replicas.to_string().as_bytes(),
            timeout_ms.to_string().as_bytes(),
        ]);
        self.surround(&[], &[wait])
    }

    fn surround(self, before: &[Bytes], after: &[Bytes]) -> RespRequest {
        let len = before.iter().chain(after).map(Bytes::len).sum::<usize>() + self.wire.len();
        let mut wire = BytesMut::with_capacity(len);
        for command in before {
            wire.extend_from_slice(command);
        }
        wire.extend_from_slice(&self.wire);
        for command in after {
            wire.extend_from_slice(command);
        }
        RespRequest {
            wire: wire.freeze(),
            replies: self.replies + before.len() + after.len(),
        }
    }
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
            groups: VecDeque::new(),
            partial: Vec::new(),
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
    type Request = RespRequest;
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
        self.groups.clear();
        self.partial.clear();
        Ok(stream)
    }

    fn encode(&mut self, request: RespRequest, out: &mut BytesMut) -> u64 {
        out.extend_from_slice(&request.wire);
        let replies = request.replies.max(1);
        self.written += replies as u64;
        if replies > 1 {
            self.groups.push_back((self.written, replies));
        }
        self.written
    }

    fn decode(&mut self, input: &mut BytesMut) -> io::Result<Option<(u64, Reply)>> {
        loop {
            let Some(reply) = decode_reply(input)? else {
                return Ok(None);
            };
            self.answered += 1;
            // Replies before a group's first belong to single-reply requests.
            let Some(&(last, count)) = self
                .groups
                .front()
                .filter(|(last, count)| self.answered + *count as u64 > *last)
            else {
                return Ok(Some((self.answered, reply)));
            };
            self.partial.push(reply);
            if self.answered == last {
                self.groups.pop_front();
                debug_assert_eq!(self.partial.len(), count);
                let replies = std::mem::take(&mut self.partial);
                return Ok(Some((last, Reply::Array(replies))));
            }
        }
    }

    fn queued_bytes(request: &RespRequest) -> usize {
        request.wire.len()
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
    fn multi_reply_requests_get_all_their_replies_under_the_last_tag() {
        let target = crate::resp::url::parse("redis://h:1").expect("valid");
        let mut protocol = RespProtocol::new(target, &[]);
        let mut out = BytesMut::new();
        let get = Bytes::from_static(b"*1\r\n$3\r\nGET\r\n");
        assert_eq!(protocol.encode(get.clone().into(), &mut out), 1);
        let asked = RespRequest::from(get.clone()).asking().then_wait(1, 100);
        assert_eq!(asked.replies, 3);
        assert_eq!(protocol.encode(asked, &mut out), 4);
        assert_eq!(protocol.encode(get.into(), &mut out), 5);
        assert!(out.starts_with(b"*1\r\n$3\r\nGET\r\n*1\r\n$6\r\nASKING\r\n"));
        let wire: &[u8] = b":1\r\n+OK\r\n:2\r\n:1\r\n:3\r\n";
        for split in 0..=wire.len() {
            let mut input = BytesMut::from(&wire[..split]);
            let mut replies = Vec::new();
            while let Some(r) = protocol.decode(&mut input).expect("valid") {
                replies.push(r);
            }
            input.extend_from_slice(&wire[split..]);
            while let Some(r) = protocol.decode(&mut input).expect("valid") {
                replies.push(r);
            }
            let ok = Reply::SimpleString(Bytes::from_static(b"OK"));
            assert_eq!(
                replies,
                vec![
                    (1, Reply::Integer(1)),
                    (
                        4,
                        Reply::Array(vec![ok, Reply::Integer(2), Reply::Integer(1)])
                    ),
                    (5, Reply::Integer(3)),
                ],
                "split at {split}"
            );
            // The next round trip starts from the same tags.
            protocol.answered = 0;
            protocol.groups.push_back((4, 3));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut input = BytesMut::from(&b"?what\r\n"[..]);
        assert!(decode_reply(&mut input).is_err());
    }
}
