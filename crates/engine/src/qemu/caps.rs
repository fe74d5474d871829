//! What a QEMU can do, read from `query-qmp-schema` rather than assumed from its
//! version (docs/continuous.md): every command tern sends, and the members it needs
//! of their arguments. QEMU 7.2 has all of it; an older or trimmed QEMU gets an error
//! that names what is missing when the VM is added, not a failure in some later cycle.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::qmp::{Qmp, QmpError};

/// Commands every cut uses.
const COMMANDS: &[&str] = &[
    "transaction",
    "blockdev-add",
    "blockdev-del",
    "blockdev-backup",
    "block-job-cancel",
    "query-block-jobs",
    "query-named-block-nodes",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-enable",
];

/// Commands pull mode adds.
const PULL_COMMANDS: &[&str] = &["block-export-add", "block-export-del", "query-block-exports"];

/// The schema, indexed.
pub struct Schema {
    commands: HashMap<String, String>,
    entities: HashMap<String, Value>,
}

impl Schema {
    /// Read QEMU's schema.
    pub fn query(qmp: &mut Qmp) -> Result<Schema, QmpError> {
        let all = qmp.execute("query-qmp-schema", None)?;
        let mut commands = HashMap::new();
        let mut entities = HashMap::new();
        for e in all.as_array().into_iter().flatten() {
            let Some(name) = e["name"].as_str() else { continue };
            if e["meta-type"] == "command" {
                commands.insert(name.to_string(), e["arg-type"].as_str().unwrap_or_default().to_string());
            }
            entities.insert(name.to_string(), e.clone());
        }
        Ok(Schema { commands, entities })
    }

    /// Whether QEMU has command `name`.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Whether the arguments of command `command` have, at any depth (through
    /// unions' variants, bases, arrays and alternates), a member named `member`.
    pub fn has_argument(&self, command: &str, member: &str) -> bool {
        let Some(arg) = self.commands.get(command) else { return false };
        let mut seen = HashSet::new();
        let mut todo = vec![arg.clone()];
        while let Some(t) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            let Some(e) = self.entities.get(&t) else { continue };
            for m in e["members"].as_array().into_iter().flatten() {
                if m["name"] == member {
                    return true;
                }
                if let Some(ty) = m["type"].as_str() {
                    todo.push(ty.to_string());
                }
            }
            for v in e["variants"].as_array().into_iter().flatten() {
                if let Some(ty) = v["type"].as_str() {
                    todo.push(ty.to_string());
                }
            }
            if let Some(ty) = e["element-type"].as_str() {
                todo.push(ty.to_string());
            }
        }
        false
    }
}

/// What of what tern needs QEMU lacks, for pull mode or push mode (empty: nothing).
pub fn missing(schema: &Schema, push: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut commands = COMMANDS.to_vec();
    if !push {
        commands.extend_from_slice(PULL_COMMANDS);
    }
    for c in commands {
        if !schema.has_command(c) {
            out.push(format!("command {c}"));
        }
    }
    // Pull mode exports the frozen bitmap with the view.
    if !push && schema.has_command("block-export-add") && !schema.has_argument("block-export-add", "bitmaps")
    {
        out.push("block-export-add with bitmaps (QEMU 5.0 and later)".into());
    }
    // Persistent bitmaps, and merging a bitmap of another node (push mode).
    if schema.has_command("block-dirty-bitmap-add")
        && !schema.has_argument("block-dirty-bitmap-add", "persistent")
    {
        out.push("block-dirty-bitmap-add with persistent".into());
    }
    if push
        && schema.has_command("block-dirty-bitmap-merge")
        && !schema.has_argument("block-dirty-bitmap-merge", "node")
    {
        out.push("block-dirty-bitmap-merge of another node's bitmap".into());
    }
    out
}
