//! Splits a JSON array arriving in pieces into its elements, compacted, with
//! memory bounded by the largest element — never by the whole array.
//!
//! Used for `.json` input files and for dataset downloads, which can be
//! hundreds of megabytes. It checks only the structure (brackets, strings,
//! commas); each element is parsed properly by whoever consumes it. With
//! [`ArraySplitter::with_max_element`] an element longer than the cap is
//! kept only up to it ([`Element::Cut`]), so one endless row cannot take
//! the memory either.

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

/// One element of the array, as [`ArraySplitter::feed_elements`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element<'a> {
    /// The whole element, compact.
    Whole(&'a [u8]),
    /// An element longer than the cap: its first `cap` bytes and its full
    /// (compact) length.
    Cut { head: &'a [u8], len: u64 },
}

/// Incremental splitter. Feed it bytes with [`feed`](Self::feed), then call
/// [`finish`](Self::finish) to learn whether the array was complete.
pub struct ArraySplitter {
    at: At,
    depth: u32,
    in_string: bool,
    escaped: bool,
    element: Vec<u8>,
    /// The current element's compact length, kept or not.
    element_len: u64,
    /// Where the current element starts in the input.
    element_start: u64,
    /// Bytes of an element kept at most.
    max_element: usize,
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
            element_len: 0,
            element_start: 0,
            max_element: usize::MAX,
            offset: 0,
            bom_seen: 0,
        }
    }

    /// A splitter that keeps at most `max` bytes of any element.
    pub fn with_max_element(max: usize) -> Self {
        ArraySplitter {
            max_element: max,
            ..Self::new()
        }
    }

    /// Appends to the current element, up to the cap; counts it all.
    fn keep(&mut self, bytes: &[u8]) {
        self.element_len = self.element_len.saturating_add(bytes.len() as u64);
        let room = self.max_element.saturating_sub(self.element.len());
        self.element
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The finished element, whole or cut, for the callback.
    fn finished(&self) -> Element<'_> {
        if self.element_len > self.element.len() as u64 {
            Element::Cut {
                head: &self.element,
                len: self.element_len,
            }
        } else {
            Element::Whole(&self.element)
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
    /// `on_element` stops the feed and is returned as `Err(Ok(e))`. An
    /// element over the cap (see [`with_max_element`](Self::with_max_element))
    /// is given cut.
    pub fn feed<E>(
        &mut self,
        bytes: &[u8],
        mut on_element: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), Result<E, SplitError>> {
        self.feed_elements(bytes, |element, _| match element {
            Element::Whole(raw) | Element::Cut { head: raw, .. } => on_element(raw),
        })
    }

    /// [`feed`](Self::feed), giving each element whole or cut, with the
    /// offset in the input where it starts.
    pub fn feed_elements<E>(
        &mut self,
        bytes: &[u8],
        mut on_element: impl FnMut(Element<'_>, u64) -> Result<(), E>,
    ) -> Result<(), Result<E, SplitError>> {
        let mut i = 0;
        while i < bytes.len() {
            if self.at == At::Element && self.in_string && !self.escaped {
                // Most of a dataset's bytes are string contents: copy up to
                // the next quote or backslash at once instead of byte by byte.
                let rest = &bytes[i..];
                let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                self.keep(&rest[..run]);
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
                            self.element_len = 0;
                            self.element_start = pos;
                            self.scan(b, pos).map_err(Err)?;
                            if self.at == At::AfterElement {
                                on_element(self.finished(), self.element_start).map_err(Ok)?;
                            }
                        }
                    }
                }
                At::Element => {
                    if !self.in_string && self.depth == 0 && (b == b',' || b == b']' || is_ws(b)) {
                        // End of a scalar element.
                        on_element(self.finished(), self.element_start).map_err(Ok)?;
                        self.at = At::AfterElement;
                        self.after_element(b, pos).map_err(Err)?;
                        continue;
                    }
                    self.scan(b, pos).map_err(Err)?;
                    if self.at == At::AfterElement {
                        on_element(self.finished(), self.element_start).map_err(Ok)?;
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
            self.keep(&[b]);
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
                self.keep(&[b]);
            }
            b'{' | b'[' => {
                self.depth = self.depth.saturating_add(1);
                self.keep(&[b]);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    return Err(SplitError::Malformed(pos, "unbalanced bracket"));
                }
                self.depth -= 1;
                self.keep(&[b]);
                if self.depth == 0 {
                    self.at = At::AfterElement;
                }
            }
            b if is_ws(b) => {}
            _ => self.keep(&[b]),
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

    /// An element over the cap is given cut, with its full length and its
    /// offset, whatever the piece size; the ones around it are whole.
    #[test]
    fn elements_over_the_cap_are_cut_with_their_length_and_offset() {
        let big = format!("{{\"body\":\"{}\"}}", "x".repeat(100));
        let input = format!(
            "[{{\"a\":1}}, {big},\n {{\"b\":[2]}}, \"{}\"]",
            "y".repeat(40)
        );
        for piece in [1, 3, 16, 1000] {
            let mut s = ArraySplitter::with_max_element(20);
            let mut got = Vec::new();
            for part in input.as_bytes().chunks(piece) {
                s.feed_elements(part, |e, at| {
                    got.push(match e {
                        Element::Whole(raw) => {
                            (String::from_utf8_lossy(raw).into_owned(), None, at)
                        }
                        Element::Cut { head, len } => {
                            (String::from_utf8_lossy(head).into_owned(), Some(len), at)
                        }
                    });
                    Ok::<(), ()>(())
                })
                .unwrap();
            }
            s.finish().unwrap();
            assert_eq!(got.len(), 4, "piece {piece}");
            assert_eq!(got[0], ("{\"a\":1}".to_string(), None, 1));
            assert_eq!(got[1].0, big[..20], "piece {piece}");
            assert_eq!(got[1].1, Some(big.len() as u64));
            assert_eq!(got[1].2, input.find("{\"body").unwrap() as u64);
            assert_eq!(got[2].0, "{\"b\":[2]}");
            assert_eq!(got[3].1, Some(42), "a long scalar is cut too");
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
