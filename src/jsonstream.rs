//! Splits a JSON array arriving in pieces into its elements, compacted, with
//! memory bounded by the largest element — never by the whole array.
//!
//! Used for `.json` input files and for dataset downloads, which can be
//! hundreds of megabytes. It checks only the structure (brackets, strings,
//! commas); each element is parsed properly by whoever consumes it.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("expected a JSON array, found '{0}' at byte {1}")]
    NotAnArray(char, u64),
    #[error("malformed JSON array at byte {0}: {1}")]
    Malformed(u64, &'static str),
    #[error("the JSON array ends early (truncated after {0} bytes)")]
    Truncated(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before `[` (whitespace and a UTF-8 BOM allowed).
    Start,
    /// After `[` or `,`: an element or (only after `[`) `]`.
    ElementStart { after_comma: bool },
    /// Inside an element.
    Element,
    /// After an element: `,` or `]`.
    AfterElement,
    /// After the closing `]`: only whitespace.
    Done,
}

/// Incremental splitter. Feed it bytes with [`feed`](Self::feed), then call
/// [`finish`](Self::finish) to learn whether the array was complete.
pub struct ArraySplitter {
    at: At,
    depth: u32,
    in_string: bool,
    escaped: bool,
    element: Vec<u8>,
    offset: u64,
    bom_seen: usize,
}

impl Default for ArraySplitter {
    fn default() -> Self {
        Self::new()
    }
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl ArraySplitter {
    pub fn new() -> Self {
        ArraySplitter {
            at: At::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            element: Vec::with_capacity(4096),
            offset: 0,
            bom_seen: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the element being gathered (held until it completes).
    pub fn pending_len(&self) -> usize {
        self.element.len()
    }

    /// Whether the closing `]` has been seen.
    pub fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// Consumes `bytes`, calling `on_element` with each complete element
    /// (compact: whitespace outside strings removed). An error from
    /// `on_element` stops the feed and is returned as `Err(Ok(e))`.
    pub fn feed<E>(
        &mut self,
        bytes: &[u8],
        mut on_element: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), Result<E, SplitError>> {
        let mut i = 0;
        while i < bytes.len() {
            if self.at == At::Element && self.in_string && !self.escaped {
                // Most of a dataset's bytes are string contents: copy up to
                // the next quote or backslash at once instead of byte by byte.
                let rest = &bytes[i..];
                let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                self.element.extend_from_slice(&rest[..run]);
                self.offset += run as u64;
                i += run;
                if i == bytes.len() {
                    break;
                }
            }
            let b = bytes[i];
            i += 1;
            let pos = self.offset;
            self.offset += 1;
            match self.at {
                At::Start => {
                    if pos < 3 && self.bom_seen == pos as usize && b == BOM[pos as usize] {
                        self.bom_seen += 1;
                        continue;
                    }
                    if is_ws(b) {
                        continue;
                    }
                    if b != b'[' {
                        return Err(Err(SplitError::NotAnArray(b as char, pos)));
                    }
                    self.at = At::ElementStart { after_comma: false };
                }
                At::ElementStart { after_comma } => {
                    if is_ws(b) {
                        continue;
                    }
                    match b {
                        b']' if !after_comma => self.at = At::Done,
                        b']' | b',' => {
                            return Err(Err(SplitError::Malformed(pos, "missing element")))
                        }
                        _ => {
                            self.at = At::Element;
                            self.element.clear();
                            self.scan(b, pos).map_err(Err)?;
                            if self.at == At::AfterElement {
                                on_element(&self.element).map_err(Ok)?;
                            }
                        }
                    }
                }
                At::Element => {
                    if !self.in_string && self.depth == 0 && (b == b',' || b == b']' || is_ws(b)) {
                        // End of a scalar element.
                        on_element(&self.element).map_err(Ok)?;
                        self.at = At::AfterElement;
                        self.after_element(b, pos).map_err(Err)?;
                        continue;
                    }
                    self.scan(b, pos).map_err(Err)?;
                    if self.at == At::AfterElement {
                        on_element(&self.element).map_err(Ok)?;
                    }
                }
                At::AfterElement => self.after_element(b, pos).map_err(Err)?,
                At::Done => {
                    if !is_ws(b) {
                        return Err(Err(SplitError::Malformed(pos, "data after the array")));
                    }
                }
            }
        }
        Ok(())
    }

    fn after_element(&mut self, b: u8, pos: u64) -> Result<(), SplitError> {
        match b {
            b',' => self.at = At::ElementStart { after_comma: true },
            b']' => self.at = At::Done,
            b if is_ws(b) => {}
            _ => return Err(SplitError::Malformed(pos, "expected ',' or ']'")),
        }
        Ok(())
    }

    /// One byte inside an element.
    fn scan(&mut self, b: u8, pos: u64) -> Result<(), SplitError> {
        if self.in_string {
            self.element.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    // A string element: ends at the next ',' or ']'.
                }
            }
            return Ok(());
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.element.push(b);
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.element.push(b);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    return Err(SplitError::Malformed(pos, "unbalanced bracket"));
                }
                self.depth -= 1;
                self.element.push(b);
                if self.depth == 0 {
                    self.at = At::AfterElement;
                }
            }
            b if is_ws(b) => {}
            _ => self.element.push(b),
        }
        Ok(())
    }

    /// Whether the array was complete: `Ok` only after its closing `]`.
    pub fn finish(&self) -> Result<(), SplitError> {
        match self.at {
            At::Done => Ok(()),
            _ => Err(SplitError::Truncated(self.offset)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_in_pieces(input: &[u8], piece: usize) -> Result<Vec<String>, SplitError> {
        let mut s = ArraySplitter::new();
        let mut out = Vec::new();
        for part in input.chunks(piece.max(1)) {
            s.feed(part, |e| {
                out.push(String::from_utf8(e.to_vec()).expect("utf8"));
                Ok::<(), ()>(())
            })
            .map_err(|e| e.expect_err("callback never fails"))?;
        }
        s.finish()?;
        Ok(out)
    }

    #[test]
    fn splits_objects_whatever_the_piece_size() {
        let input = br#" [ {"a": 1, "b": "x, ] }"}, {"c": [1, 2, {"d": null}]} ,{"e":"\"q\\"}] "#;
        for piece in [1, 2, 3, 7, 1000] {
            let got = split_in_pieces(input, piece).expect("valid");
            assert_eq!(
                got,
                vec![
                    r#"{"a":1,"b":"x, ] }"}"#,
                    r#"{"c":[1,2,{"d":null}]}"#,
                    r#"{"e":"\"q\\"}"#
                ],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn empty_array_and_scalars() {
        assert_eq!(split_in_pieces(b"[]", 1).unwrap(), Vec::<String>::new());
        assert_eq!(
            split_in_pieces(b"\xEF\xBB\xBF[ ]\n", 1).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            split_in_pieces(b"[1, \"s\", true]", 2).unwrap(),
            vec!["1", "\"s\"", "true"]
        );
    }

    #[test]
    fn truncated_and_malformed() {
        assert!(matches!(
            split_in_pieces(br#"[{"a":1},{"b":"#, 4),
            Err(SplitError::Truncated(_))
        ));
        assert!(matches!(
            split_in_pieces(b"", 4),
            Err(SplitError::Truncated(0))
        ));
        assert!(matches!(
            split_in_pieces(b"{\"a\":1}", 4),
            Err(SplitError::NotAnArray('{', 0))
        ));
        assert!(matches!(
            split_in_pieces(b"[1,,2]", 4),
            Err(SplitError::Malformed(..))
        ));
        assert!(matches!(
            split_in_pieces(b"[1,]", 4),
            Err(SplitError::Malformed(..))
        ));
        assert!(matches!(
            split_in_pieces(b"[1] x", 4),
            Err(SplitError::Malformed(..))
        ));
        assert!(matches!(
            split_in_pieces(b"[{}}]", 4),
            Err(SplitError::Malformed(..))
        ));
    }
}
