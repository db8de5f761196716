//! [`Taint`]: what was removed from an element because it is in error, so the
//! element's other fields can still be compiled and checked, and so checks that
//! compare two fields can tell a value the author wrote from a default standing
//! in for a bad one.
//!
//! It never reports anything: `intake` reports the errors, `elements` and
//! `downstream` consult the taint.

use serde_json::Value;

/// The values removed from one element because they are in error (or hold a
/// missing `${VAR}`, which `validate` only warns about), as JSON pointers
/// relative to the element (`/downstream/timeout`). A check that compares a
/// field with another skips the comparison when either was removed: the
/// default standing in for a bad value would make a misleading follow-up.
#[derive(Debug, Default, Clone)]
pub(super) struct Taint {
    removed: Vec<String>,
    /// A removal was for an error (not only for a missing variable).
    pub(super) errors: bool,
}

impl Taint {
    /// No value was removed for an error: the element may be kept.
    pub(super) fn is_clean(&self) -> bool {
        !self.errors
    }

    /// Whether the value at `rel` (relative to the element), a value inside it
    /// or a value holding it was removed.
    pub(super) fn touches(&self, rel: &str) -> bool {
        self.removed
            .iter()
            .any(|r| within(r, rel) || within(rel, r))
    }

    /// Both taints: a route's own, and that of the `defaults:` block it inherits
    /// from (whose keys are named like the route's).
    pub(super) fn union(&self, other: &Taint) -> Taint {
        let mut removed = self.removed.clone();
        removed.extend(other.removed.iter().cloned());
        Taint {
            removed,
            errors: self.errors || other.errors,
        }
    }

    /// The taint as an item of a list inside the element sees it (a route's
    /// `also` target at `/also/0`): removals inside the item, relative to it,
    /// and the element's own removals outside any `/also` item (`/deadline`).
    pub(super) fn for_item(&self, item: &str) -> Taint {
        let removed = self
            .removed
            .iter()
            .filter_map(|r| match r.strip_prefix(item) {
                Some(rest) if rest.starts_with('/') => Some(rest.to_owned()),
                _ if within(r, "/also") => None,
                _ => Some(r.clone()),
            })
            .collect();
        Taint {
            removed,
            errors: self.errors,
        }
    }

    /// Whether a deserialize error at `rel` is the doing of a removal inside it.
    pub(super) fn explains(&self, rel: &str) -> bool {
        self.removed.iter().any(|r| within(r, rel))
    }

    /// Removes the value at `rel` from `v`; a list item takes its whole list
    /// with it (the rest of a list may mean something else without it).
    /// `false` when there is nothing left to remove (`rel` is the element).
    pub(super) fn remove(&mut self, v: &mut Value, rel: &str) -> bool {
        let segs: Vec<&str> = rel.split('/').skip(1).collect();
        for k in (0..segs.len()).rev() {
            let parent: String = segs[..k].iter().map(|s| format!("/{s}")).collect();
            if let Some(Value::Object(map)) = v.pointer_mut(&parent) {
                let key = segs[k].replace("~1", "/").replace("~0", "~");
                if map.remove(&key).is_none() {
                    return false;
                }
                self.removed.push(format!("{parent}/{}", segs[k]));
                return true;
            }
        }
        false
    }
}

/// `inner` is `outer` or inside it (JSON pointers).
fn within(inner: &str, outer: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removes_keys_and_whole_lists() {
        let mut v = json!({"downstream": {"url": "u", "timeout": "5 parsecs"},
            "retry": {"schedule": ["1s", "9d"]}, "examples": [{"name": "a", "payload": 1}]});
        let mut t = Taint::default();
        assert!(t.remove(&mut v, "/downstream/timeout"));
        assert!(t.remove(&mut v, "/retry/schedule/1"));
        assert!(t.remove(&mut v, "/examples/0/payload"));
        assert_eq!(
            v,
            json!({"downstream": {"url": "u"}, "retry": {}, "examples": [{"name": "a"}]})
        );
        assert!(t.touches("/downstream/timeout"));
        assert!(t.touches("/downstream"));
        assert!(t.touches("/retry/schedule/0"));
        assert!(!t.touches("/downstream/url"));
        assert!(!t.touches("/retry/backoff"));
        // the example lost a required key: that error is ours, and the list goes
        assert!(t.explains("/examples/0"));
        assert!(!t.explains("/downstream/url"));
        assert!(t.remove(&mut v, "/examples/0"));
        assert!(v.get("examples").is_none());
        // the element itself, or a key already gone: nothing to remove
        assert!(!t.remove(&mut v, ""));
        assert!(!t.remove(&mut v, "/downstream/timeout"));
        // only a removal for an error makes the element unfit to keep
        assert!(t.is_clean());
        t.errors = true;
        assert!(!Taint::default().union(&t).is_clean());
    }

    #[test]
    fn within_respects_segment_boundaries() {
        assert!(within("/a/b", "/a"));
        assert!(within("/a", "/a"));
        assert!(within("/a", ""));
        assert!(!within("/ab", "/a"));
        assert!(!within("/a", "/a/b"));
    }
}
