//! RESP2 framing for the connection this crate reads itself (feed.rs): is there a complete
//! reply at the start of a buffer, and how long is it? Parsing a complete one is left to
//! `redis::parse_redis_value`; this only has to find where each ends, without recursion and
//! without trusting a length it reads (a peer that isn't Redis, or a corrupted stream, is an
//! error, never an allocation or a wait for gigabytes).

/// A length or count beyond this is not something Redis sends a subscriber: the stream is bad
/// (Redis' own `proto-max-bulk-len` default is 512 MB; a push names keys).
const MAX_BULK: usize = 512 * 1024 * 1024;
const MAX_ITEMS: usize = 1 << 24;
/// A status, error or integer line, or a header, longer than this is garbage.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed reply from Redis: {}", self.0)
    }
}

/// The length of the complete RESP2 value at the start of `buf`; `Ok(None)` if `buf` holds
/// only the beginning of one (or nothing).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    let mut pos = 0;
    // Values still to read: this frame, plus the elements of the arrays opened so far.
    let mut pending: usize = 1;
    while pending > 0 {
        let Some(&kind) = buf.get(pos) else { return Ok(None) };
        let Some(line_end) = line_end(&buf[pos + 1..])? else { return Ok(None) };
        let line = &buf[pos + 1..pos + 1 + line_end];
        pos += 1 + line_end + 2;
        pending -= 1;
        match kind {
            b'+' | b'-' => {}
            b':' => {
                integer(line)?;
            }
            b'$' => {
                if let Some(len) = length(line, MAX_BULK)? {
                    let end = pos + len + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Err(Malformed("a bulk string without its CRLF"));
                    }
                    pos = end;
                }
            }
            b'*' => {
                if let Some(count) = length(line, MAX_ITEMS)? {
                    pending = pending.checked_add(count).ok_or(Malformed("too many elements"))?;
                }
            }
            _ => return Err(Malformed("an unknown type byte")),
        }
    }
    Ok(Some(pos))
}

/// Where the CRLF that ends the line starting at `buf[0]` is, if it has arrived.
fn line_end(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    match window.iter().position(|&b| b == b'\r') {
        Some(at) if at + 1 < buf.len() => {
            if buf[at + 1] == b'\n' {
                Ok(Some(at))
            } else {
                Err(Malformed("a CR without LF"))
            }
        }
        None if buf.len() > MAX_LINE => Err(Malformed("a line too long")),
        // The LF, or the whole end of the line, hasn't arrived.
        Some(_) | None => Ok(None),
    }
}

fn integer(line: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(line).ok().and_then(|s| s.parse::<i64>().ok()).ok_or(Malformed("not an integer"))
}

/// A bulk length or an array count: None for the null (-1).
fn length(line: &[u8], max: usize) -> Result<Option<usize>, Malformed> {
    match integer(line)? {
        -1 => Ok(None),
        n if n >= 0 && (n as u64) <= max as u64 => Ok(Some(n as usize)),
        _ => Err(Malformed("a length out of range")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$5\r\nk:a:b\r\n$3\r\nk:c\r\n";

    #[test]
    fn simple_values() {
        assert_eq!(frame_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"-ERR no\r\n+OK\r\n"), Ok(Some(9)));
        assert_eq!(frame_len(b":42\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b":-7\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"$3\r\nabc\r\n"), Ok(Some(9)));
        assert_eq!(frame_len(b"$0\r\n\r\n"), Ok(Some(6)));
        // A bulk string may hold CR, LF and anything else.
        assert_eq!(frame_len(b"$4\r\n\r\n\r\n\r\n"), Ok(Some(10)));
    }

    #[test]
    fn nulls() {
        assert_eq!(frame_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"*-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"*0\r\n"), Ok(Some(4)));
        // FLUSHALL's invalidation: a message whose payload is a null.
        let flush = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n";
        assert_eq!(frame_len(flush), Ok(Some(flush.len())));
    }

    #[test]
    fn nested_arrays_and_what_follows() {
        assert_eq!(frame_len(MESSAGE), Ok(Some(MESSAGE.len())));
        let nested = b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n*0\r\n";
        assert_eq!(frame_len(nested), Ok(Some(nested.len())));
        let mut two = MESSAGE.to_vec();
        two.extend_from_slice(b"+OK\r\n");
        assert_eq!(frame_len(&two), Ok(Some(MESSAGE.len())));
        assert_eq!(frame_len(&two[MESSAGE.len()..]), Ok(Some(5)));
    }

    #[test]
    fn every_strict_prefix_is_partial() {
        for frame in [MESSAGE, &b"$3\r\nabc\r\n"[..], b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n*0\r\n", b"+OK\r\n"] {
            for cut in 0..frame.len() {
                assert_eq!(frame_len(&frame[..cut]), Ok(None), "{:?}", String::from_utf8_lossy(&frame[..cut]));
            }
        }
    }

    #[test]
    fn garbage() {
        assert!(frame_len(b"HTTP/1.1 400\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(b"$-2\r\n").is_err());
        assert!(frame_len(b"*-5\r\n").is_err());
        assert!(frame_len(b":1.5\r\n").is_err());
        assert!(frame_len(b"+OK\rX").is_err());
        assert!(frame_len(b"$3\r\nabcde\r\n").is_err()); // longer than it said
        assert!(frame_len(b"$99999999999999999999\r\n").is_err());
        assert!(frame_len(b"*9223372036854775807\r\n").is_err());
        // A line that never ends is refused once it is too long to be Redis'.
        let mut long = vec![b'a'; MAX_LINE + 10];
        long[0] = b'+';
        assert!(frame_len(&long).is_err());
        assert_eq!(frame_len(&long[..100]), Ok(None));
    }
}
