//! Non-TTY exec framing: each binary WebSocket message is one stream byte and a payload.

use bytes::{BufMut, Bytes, BytesMut};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const STDIN_EOF: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Stdin(Bytes),
    Stdout(Bytes),
    Stderr(Bytes),
    /// The command ended; the code travels in one byte.
    Exit(u8),
    StdinEof,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty binary message")]
    Empty,
    #[error("unknown stream byte {0}")]
    UnknownStream(u8),
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        let (stream, payload): (u8, &[u8]) = match self {
            Frame::Stdin(b) => (STDIN, b),
            Frame::Stdout(b) => (STDOUT, b),
            Frame::Stderr(b) => (STDERR, b),
            Frame::Exit(code) => (EXIT, std::slice::from_ref(code)),
            Frame::StdinEof => (STDIN_EOF, &[]),
        };
        let mut out = BytesMut::with_capacity(1 + payload.len());
        out.put_u8(stream);
        out.put_slice(payload);
        out.freeze()
    }

    pub fn decode(message: &[u8]) -> Result<Frame, FrameError> {
        let (&stream, payload) = message.split_first().ok_or(FrameError::Empty)?;
        let payload = Bytes::copy_from_slice(payload);
        match stream {
            STDIN => Ok(Frame::Stdin(payload)),
            STDOUT => Ok(Frame::Stdout(payload)),
            STDERR => Ok(Frame::Stderr(payload)),
            // Both SDKs read an empty exit payload as 0.
            EXIT => Ok(Frame::Exit(payload.first().copied().unwrap_or(0))),
            STDIN_EOF => Ok(Frame::StdinEof),
            other => Err(FrameError::UnknownStream(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_layout() {
        assert_eq!(&Frame::Stdin(Bytes::from_static(b"hi")).encode()[..], b"\x00hi");
        assert_eq!(
            &Frame::Stdout(Bytes::from_static(b"out")).encode()[..],
            b"\x01out"
        );
        assert_eq!(
            &Frame::Stderr(Bytes::from_static(b"\xff")).encode()[..],
            b"\x02\xff"
        );
        assert_eq!(&Frame::Exit(7).encode()[..], b"\x03\x07");
        assert_eq!(&Frame::StdinEof.encode()[..], b"\x04");
    }

    #[test]
    fn decodes_and_round_trips() {
        for f in [
            Frame::Stdin(Bytes::from_static(b"\x00\x01")),
            Frame::Stdout(Bytes::new()),
            Frame::Stderr(Bytes::from_static(b"e")),
            Frame::Exit(255),
            Frame::StdinEof,
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        assert_eq!(Frame::decode(b"\x03"), Ok(Frame::Exit(0)));
        assert_eq!(Frame::decode(b""), Err(FrameError::Empty));
        assert_eq!(Frame::decode(b"\x09x"), Err(FrameError::UnknownStream(9)));
    }
}
