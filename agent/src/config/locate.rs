//! Finds the line and column of a field path (`workloads[2].ips[0]`) in a YAML document, for
//! errors found after parsing and for field checks made during deserialization (for which the
//! YAML deserializer only knows the start of the enclosing mapping). It walks the document's
//! parse events, which carry exact positions, in block and flow style alike.

use yaml_rust2::parser::{Event, Parser};

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        for index in rest.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                segments.push(Segment::Index(i));
            }
        }
    }
    segments
}

/// (line, column), 1-based, of the value at `path` (for a mapping key, of the key).
pub(crate) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let target = parse_path(path);
    if target.is_empty() {
        return None;
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut current: Vec<Segment> = Vec::new();
    loop {
        let (event, mark) = parser.next_token().ok()?;
        let at = (mark.line(), mark.col() + 1);
        match event {
            Event::StreamEnd => return None,
            Event::MappingEnd | Event::SequenceEnd
                if stack.pop().is_some_and(|frame| frame.has_segment) =>
            {
                current.pop();
            }
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::MappingStart(..)
            | Event::SequenceStart(..) => {
                let segment = match stack.last_mut().map(|f| &mut f.kind) {
                    None => None,
                    Some(Kind::Map { key: None }) => {
                        // A key. Only plain scalar keys are followed.
                        if let Event::Scalar(k, ..) = &event {
                            current.push(Segment::Key(k.clone()));
                            if current == target {
                                return Some(at);
                            }
                            current.pop();
                            if let Some(Frame {
                                kind: Kind::Map { key },
                                ..
                            }) = stack.last_mut()
                            {
                                *key = Some(k.clone());
                            }
                        }
                        continue;
                    }
                    Some(Kind::Map { key }) => key.take().map(Segment::Key),
                    Some(Kind::Seq { next }) => {
                        *next += 1;
                        Some(Segment::Index(*next - 1))
                    }
                };
                if let Some(seg) = &segment {
                    current.push(seg.clone());
                    if current == target {
                        return Some(at);
                    }
                }
                let kind = match event {
                    Event::MappingStart(..) => Some(Kind::Map { key: None }),
                    Event::SequenceStart(..) => Some(Kind::Seq { next: 0 }),
                    _ => None,
                };
                match kind {
                    Some(kind) => stack.push(Frame {
                        kind,
                        has_segment: segment.is_some(),
                    }),
                    None => {
                        if segment.is_some() {
                            current.pop();
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

struct Frame {
    kind: Kind,
    /// Whether entering this container added a segment to the current path.
    has_segment: bool,
}

enum Kind {
    /// `key` is the key whose value comes next, `None` while a key is expected.
    Map {
        key: Option<String>,
    },
    Seq {
        next: usize,
    },
}

/// The position of the field at `path`, or of the nearest enclosing field that can be found.
pub(crate) fn locate_nearest(text: &str, path: &str) -> Option<(usize, usize)> {
    let mut at = path;
    loop {
        if let Some(found) = locate(text, at) {
            return Some(found);
        }
        let cut = at.rfind(['.', '['])?;
        at = &at[..cut];
    }
}

/// A YAML syntax error in `text`: its message (`YAML syntax: ...`) and the parser's position
/// (deserialization errors would only name the enclosing field).
pub(crate) fn syntax_error(text: &str) -> Option<(String, (usize, usize))> {
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => return None,
            Ok(_) => {}
            Err(e) => {
                let at = (e.marker().line(), e.marker().col() + 1);
                return Some((format!("YAML syntax: {}", e.info()), at));
            }
        }
    }
}

/// Where deserializing a document failed: the field path (empty for the document), a message
/// without serde's own location, and the position of the field if it can be found.
pub(crate) struct DeserializeError {
    pub path: String,
    pub message: String,
    pub at: Option<(usize, usize)>,
}

/// `text` deserialized as `T`; a type or field error names the field and its position.
pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, DeserializeError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let inner = e.into_inner();
        let at = locate(text, &path).or_else(|| inner.location().map(|l| (l.line(), l.column())));
        DeserializeError {
            message: super::clean_yaml_message(&inner.to_string(), &path),
            path,
            at,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "a: 1\nlist:\n  - { x: 1, y: [5, 6] }\n  - name: b\n    ips:\n      - 10.0.0.1\n      - 10.0.0.2\n";

    #[test]
    fn finds_block_and_flow_paths() {
        assert_eq!(locate(DOC, "a").map(|p| p.0), Some(1));
        assert_eq!(locate(DOC, "list[0].y[1]").map(|p| p.0), Some(3));
        assert_eq!(locate(DOC, "list[1].name").map(|p| p.0), Some(4));
        assert_eq!(locate(DOC, "list[1].ips[1]"), Some((7, 9)));
        assert_eq!(locate(DOC, "list[0].y"), Some((3, 13)));
        assert_eq!(locate(DOC, "missing"), None);
    }

    #[test]
    fn parses_paths() {
        assert_eq!(
            parse_path("workloads[2].ips[0]"),
            vec![
                Segment::Key("workloads".into()),
                Segment::Index(2),
                Segment::Key("ips".into()),
                Segment::Index(0)
            ]
        );
    }
}
