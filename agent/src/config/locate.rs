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
