//! The RPC tier: length-prefixed protobuf frames over TCP ([`frame`]), the
//! multiplexed client pool the gateway uses ([`client`]), and the server that
//! validates and stores ([`server`]).

pub(crate) mod admission;
pub mod balanced;
pub mod client;
pub mod frame;
pub mod handshake;
pub mod lane;
pub mod local;
pub mod server;

/// Method numbers carried in request frames.
pub mod method {
    pub const SEND: u8 = 1;
    pub const PULL: u8 = 2;
    pub const PING: u8 = 3;
    /// The handshake's answer to a challenge (see [`super::handshake`]).
    pub const HELLO: u8 = 4;
    /// Not a call (no reply, empty body): the caller stopped waiting for its
    /// call `id`. A pull of that id still waiting for messages is ended
    /// there and then; any other call is unaffected (it is short).
    pub const CANCEL: u8 = 5;
    /// `EditRequest` -> `EditResponse`.
    pub const EDIT: u8 = 6;
    /// `DeleteRequest` -> `DeleteResponse`.
    pub const DELETE: u8 = 7;
    /// `ChangesRequest` -> `ChangesResponse`.
    pub const CHANGES: u8 = 8;
}

/// Status bytes carried in reply frames.
pub mod status {
    /// The body is the method's response message.
    pub const OK: u8 = 0;
    /// The frame could not be served (unknown method, undecodable body); the
    /// body is a UTF-8 explanation.
    pub const BAD_FRAME: u8 = 1;
    /// Never on the wire: the gateway's own mark for a reply it dropped on
    /// arrival because the memory budget had no room for it
    /// ([`crate::budget`]); the request is answered 503 `overloaded`.
    pub const OVER_BUDGET: u8 = 0xfd;
    /// Not a reply (id 0): the server is shutting down. It takes no new
    /// calls after the connection has been quiet for a moment, finishes
    /// those in flight and closes; the client must send new calls elsewhere.
    pub const GOAWAY: u8 = 0xff;
    /// Not a reply (id 0): the first frame of a server with a shared secret;
    /// the body is a `Challenge` (see [`super::handshake`]).
    pub const CHALLENGE: u8 = 0xfe;
}
