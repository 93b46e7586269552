//! Splitting frames off the front of a read buffer.
//!
//! `frame_max` is checked on the 7-byte header, before the payload is waited for, so a peer that
//! announces a 4 GiB frame is refused at once instead of making us buffer it. "Need more bytes"
//! (`Ok(None)`) and "bad bytes" (`Err`) are different outcomes.

use super::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_OVERHEAD};

/// One complete frame, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// One of the `FRAME_*` octets.
    pub frame_type: u8,
    /// The channel number.
    pub channel: u16,
    /// The payload, without header and frame-end octet.
    pub payload: &'a [u8],
}

/// Why the bytes at the front of the buffer are not a frame. All of these are connection errors
/// with reply code 501 (frame error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame announces more than the negotiated `frame_max`.
    #[error("frame of {frame_size} bytes exceeds frame_max {frame_max}")]
    TooLarge {
        /// The whole frame's size, framing included.
        frame_size: u64,
        /// The negotiated maximum.
        frame_max: u32,
    },
    /// The octet after the payload is not 0xCE.
    #[error("frame end octet is {found:#04x}, expected 0xce")]
    BadFrameEnd {
        /// What was found instead.
        found: u8,
    },
    /// An unknown frame type octet.
    #[error("unknown frame type {frame_type}")]
    UnknownType {
        /// The octet.
        frame_type: u8,
    },
}

/// Looks at the front of `buf`. Returns `Ok(None)` when more bytes are needed, or the frame and
/// the number of bytes it takes (to be consumed by the caller once the frame is handled).
///
/// `frame_max` 0 means "no limit" as in the spec's tune negotiation; callers always pass the
/// negotiated (or pre-tune default) value.
pub fn split_frame(buf: &[u8], frame_max: u32) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(header) = buf.get(..7) else {
        return Ok(None);
    };
    let frame_type = header[0];
    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownType { frame_type });
    }
    let channel = u16::from_be_bytes([header[1], header[2]]);
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
    let frame_size = u64::from(size) + FRAME_OVERHEAD as u64;
    if frame_max != 0 && frame_size > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            frame_size,
            frame_max,
        });
    }
    // frame_size fits in usize: it is at most frame_max (u32) or, with no limit, u32::MAX + 8,
    // and we only run on 64-bit targets where that fits.
    let total = frame_size as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(FrameError::BadFrameEnd { found: end });
    }
    Ok(Some((
        Frame {
            frame_type,
            channel,
            payload: &buf[7..total - 1],
        },
        total,
    )))
}

/// Appends a frame header for a payload of `size` bytes; the caller writes the payload and then
/// `FRAME_END`.
#[inline]
pub fn write_frame_header(out: &mut Vec<u8>, frame_type: u8, channel: u16, size: u32) {
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
}

/// Appends a whole heartbeat frame.
pub fn write_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_header_and_payload_need_more_bytes() {
        let frame = [FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END];
        for cut in 0..frame.len() {
            assert_eq!(split_frame(&frame[..cut], 4096), Ok(None), "cut at {cut}");
        }
        let (f, n) = split_frame(&frame, 4096).unwrap().unwrap();
        assert_eq!(
            (f.frame_type, f.channel, f.payload, n),
            (FRAME_HEARTBEAT, 0, &[][..], 8)
        );
    }

    #[test]
    fn oversize_is_refused_on_the_header_alone() {
        let header = [FRAME_BODY, 0, 1, 0xFF, 0xFF, 0xFF, 0xF0];
        assert_eq!(
            split_frame(&header, 131_072),
            Err(FrameError::TooLarge {
                frame_size: 0xFFFF_FFF0 + 8,
                frame_max: 131_072
            })
        );
        // Exactly frame_max is allowed.
        let mut frame = vec![FRAME_BODY, 0, 1, 0, 0, 0x0F, 0xF8];
        frame.resize(7 + 4088, 0);
        frame.push(FRAME_END);
        assert_eq!(frame.len(), 4096);
        assert!(split_frame(&frame, 4096).unwrap().is_some());
        assert!(matches!(
            split_frame(&frame, 4095),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_end_and_type_are_errors() {
        let frame = [FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0x00];
        assert_eq!(
            split_frame(&frame, 4096),
            Err(FrameError::BadFrameEnd { found: 0 })
        );
        assert_eq!(
            split_frame(b"GET / HTTP/1.1", 4096),
            Err(FrameError::UnknownType { frame_type: b'G' })
        );
    }
}
