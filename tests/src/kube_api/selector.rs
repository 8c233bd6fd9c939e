//! Label and field selectors as the API server parses and matches them (`labelSelector`,
//! `fieldSelector` query parameters): the grammar of `k8s.io/apimachinery/pkg/labels` (`=`, `==`,
//! `!=`, `in`, `notin`, exists, `!key`, `>`/`<`) and of `pkg/fields` (`=`, `==`, `!=`, backslash
//! escapes), and which fields each kind can be selected by.

use std::collections::BTreeMap;

use serde_json::Value;

use super::store::Kind;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`: every requirement must hold. Empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<LabelRequirement>);

impl LabelSelector {
    /// Parse as `labels.Parse` does; the error is the message the server answers with (400).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lexer = Lexer {
            chars: text.chars().collect(),
            pos: 0,
        };
        let mut requirements = Vec::new();
        loop {
            lexer.skip_spaces();
            if lexer.at_end() {
                if requirements.is_empty() {
                    return Ok(Self(requirements));
                }
                return Err(
                    "unable to parse requirement: found '', expected: identifier after ','"
                        .to_owned(),
                );
            }
            requirements.push(lexer.requirement()?);
            lexer.skip_spaces();
            match lexer.next() {
                None => return Ok(Self(requirements)),
                Some(',') => continue,
                Some(c) => {
                    return Err(format!(
                        "unable to parse requirement: found '{c}', expected: ',' or 'end of string'"
                    ));
                }
            }
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            LabelRequirement::GreaterThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelRequirement::LessThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// A key or value: letters, digits and `-_./` (what label keys and values may hold).
    fn identifier(&mut self) -> String {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    fn word_is(&self, word: &str) -> bool {
        let end = self.pos + word.len();
        end <= self.chars.len()
            && self.chars[self.pos..end].iter().copied().eq(word.chars())
            && !self
                .chars
                .get(end)
                .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    }

    fn requirement(&mut self) -> Result<LabelRequirement, String> {
        if self.peek() == Some('!') {
            self.pos += 1;
            self.skip_spaces();
            let key = self.key()?;
            return Ok(LabelRequirement::NotExists(key));
        }
        let key = self.key()?;
        self.skip_spaces();
        match self.peek() {
            None | Some(',') => Ok(LabelRequirement::Exists(key)),
            Some('=') => {
                self.pos += 1;
                if self.peek() == Some('=') {
                    self.pos += 1;
                }
                Ok(LabelRequirement::Equals(key, self.value()?))
            }
            Some('!') => {
                self.pos += 1;
                if self.next() != Some('=') {
                    return Err(format!(
                        "unable to parse requirement: expected '=' after '!' for key {key}"
                    ));
                }
                Ok(LabelRequirement::NotEquals(key, self.value()?))
            }
            Some('>') | Some('<') => {
                let gt = self.next() == Some('>');
                let value = self.value()?;
                let n = value.parse::<i64>().map_err(|_| {
                    format!("unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer: {value}")
                })?;
                Ok(if gt {
                    LabelRequirement::GreaterThan(key, n)
                } else {
                    LabelRequirement::LessThan(key, n)
                })
            }
            Some(_) if self.word_is("in") => {
                self.pos += 2;
                Ok(LabelRequirement::In(key, self.set()?))
            }
            Some(_) if self.word_is("notin") => {
                self.pos += 5;
                Ok(LabelRequirement::NotIn(key, self.set()?))
            }
            Some(c) => Err(format!(
                "unable to parse requirement: found '{c}', expected: in, notin, =, ==, !=, gt, lt"
            )),
        }
    }

    fn key(&mut self) -> Result<String, String> {
        let key = self.identifier();
        if key.is_empty() {
            let found = self.peek().map(String::from).unwrap_or_default();
            return Err(format!(
                "unable to parse requirement: found '{found}', expected: identifier"
            ));
        }
        validate_key(&key)?;
        Ok(key)
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        let value = self.identifier();
        validate_value(&value)?;
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, String> {
        self.skip_spaces();
        if self.next() != Some('(') {
            return Err("unable to parse requirement: expected: '('".to_owned());
        }
        let mut values = Vec::new();
        loop {
            let value = self.value()?;
            self.skip_spaces();
            match self.next() {
                Some(',') => values.push(value),
                Some(')') => {
                    values.push(value);
                    return Ok(values);
                }
                _ => {
                    return Err(
                        "unable to parse requirement: found end of input, expected: ')'".to_owned(),
                    );
                }
            }
        }
    }
}

fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

fn validate_value(value: &str) -> Result<(), String> {
    let ok = value.is_empty()
        || (value.len() <= 63
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

/// One term of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldTerm {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed `fieldSelector`: every term must hold. Empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    /// Parse as `fields.ParseSelector` does, then check every field is one `kind` can be selected
    /// by (the server answers 400 `field label not supported: X` otherwise).
    pub fn parse(text: &str, kind: Kind) -> Result<Self, String> {
        let mut terms = Vec::new();
        for raw in split_unescaped(text, ',') {
            if raw.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some(i) = find_unescaped(&raw, "!=") {
                (&raw[..i], &raw[i + 2..], false)
            } else if let Some(i) = find_unescaped(&raw, "==") {
                (&raw[..i], &raw[i + 2..], true)
            } else if let Some(i) = find_unescaped(&raw, "=") {
                (&raw[..i], &raw[i + 1..], true)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{raw}'"
                ));
            };
            let field = field.trim().to_owned();
            if !kind.selectable_fields().contains(&field.as_str()) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(FieldTerm {
                field,
                value: unescape(value)?,
                equal,
            });
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|t| {
            let actual = field_value(obj, &t.field);
            (actual == t.value) == t.equal
        })
    }

    /// The name a `metadata.name=X` term pins the request to (RBAC's resourceNames see it).
    pub fn exact_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|t| t.equal && t.field == "metadata.name")
            .map(|t| t.value.as_str())
    }
}

/// A field's value as the server's field set gives it: strings as they are, booleans as
/// `true`/`false`, absent fields as the empty string.
pub fn field_value(obj: &Value, field: &str) -> String {
    let v = field.split('.').try_fold(obj, |v, part| v.get(part));
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Null) | None if field == "spec.hostNetwork" => "false".to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn split_unescaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            parts.last_mut().expect("non-empty").push(c);
            escaped = false;
        } else if c == '\\' {
            parts.last_mut().expect("non-empty").push(c);
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

fn find_unescaped(text: &str, op: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if text[i..].starts_with(op) {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=' | '!')) => out.push(e),
                Some(e) => return Err(format!("invalid field selector: invalid escape \\{e}")),
                None => return Err("invalid field selector: trailing backslash".to_owned()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_grammar() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web", true),
            ("app==web", true),
            ("app = web", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app in (web, api)", true),
            ("app in (api)", false),
            ("missing in (a)", false),
            ("app notin (api)", true),
            ("missing notin (a)", true),
            ("app,tier=front", true),
            ("app,tier=back", false),
            ("n>4", true),
            ("n<5", false),
            ("missing=", false),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), *want, "{sel}");
        }
        for bad in ["app in web", "=x", "app!x", "app,", "-bad=x", "app=a b"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn field_selector_grammar() {
        let pod = serde_json::json!({
            "metadata": {"name": "a,b", "namespace": "prod"},
            "spec": {"nodeName": "node-a"},
        });
        let s = FieldSelector::parse("spec.nodeName=node-a,metadata.name=a\\,b", Kind::Pod)
            .expect("parses");
        assert!(s.matches(&pod));
        assert_eq!(s.exact_name(), Some("a,b"));
        let s = FieldSelector::parse("spec.nodeName!=node-a", Kind::Pod).expect("parses");
        assert!(!s.matches(&pod));
        let s = FieldSelector::parse("spec.hostNetwork=false", Kind::Pod).expect("parses");
        assert!(s.matches(&pod));
        assert!(FieldSelector::parse("spec.nodeName=x", Kind::Namespace).is_err());
        assert!(FieldSelector::parse("nodeName", Kind::Pod).is_err());
    }
}
