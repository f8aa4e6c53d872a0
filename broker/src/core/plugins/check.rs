//! What the broker accepts as a plugin component, decided from the binary's
//! outer sections alone: no compilation, so a deploy of a component the
//! broker would refuse is answered in milliseconds, and `msmq plugin check`
//! answers offline.
//!
//! Owns: the import rules (which interfaces are linked and how) and the
//! export rule (`init` and the batch export of the `consumer` or the
//! `packed-consumer` world).
//!
//! Invariants:
//! - An import is accepted only if [`import_rule`] links it; the engine's
//!   linker links exactly these, so a component that passes here fails later
//!   only on a type mismatch with the WIT (reported after compilation).
//! - Only the component's own imports and exports count, not those of the
//!   modules and components nested inside it.

use super::engine::RefusedComponent;

/// How the broker meets one import of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportRule {
    /// `msmq:plugin/host` or `types` of a 1.x version.
    Host,
    /// A WASI 0.2 interface, linked to the empty WASI: no files, no network,
    /// no environment; stdout and stderr go to the broker log.
    EmptyWasi,
    /// A `wasi:http` 0.2 interface: linked, and every call traps.
    Traps,
    /// Not linked: deploying is refused, for this reason.
    Refused(&'static str),
}

impl ImportRule {
    /// A phrase for `msmq plugin check`.
    pub fn describe(self) -> &'static str {
        match self {
            ImportRule::Host => "linked: the broker's host interface",
            ImportRule::EmptyWasi => {
                "linked to the empty WASI (nothing behind it but stdout/stderr to the log)"
            }
            ImportRule::Traps => "linked, but every call traps: plugins get no network",
            ImportRule::Refused(why) => why,
        }
    }
}

/// The rule for an import named `name` (`namespace:package/interface@version`).
pub fn import_rule(name: &str) -> ImportRule {
    let (interface, version) = match name.split_once('@') {
        Some((interface, version)) => (interface, Some(version)),
        None => (name, None),
    };
    let package = interface.split('/').next().unwrap_or(interface);
    match package {
        "msmq:plugin" => match version {
            Some(v) if v.starts_with("1.") => match interface {
                "msmq:plugin/host" | "msmq:plugin/types" => ImportRule::Host,
                _ => ImportRule::Refused("msmq:plugin offers only the host and types interfaces"),
            },
            _ => ImportRule::Refused("this broker speaks msmq:plugin@1.x"),
        },
        "wasi:cli" | "wasi:io" | "wasi:clocks" | "wasi:random" | "wasi:filesystem"
        | "wasi:sockets" => {
            if version.is_some_and(|v| v.starts_with("0.2.")) {
                ImportRule::EmptyWasi
            } else {
                ImportRule::Refused("only WASI 0.2 (wasip2) is linked")
            }
        }
        "wasi:http" => {
            if version.is_some_and(|v| v.starts_with("0.2.")) {
                ImportRule::Traps
            } else {
                ImportRule::Refused("only WASI 0.2 (wasip2) is linked")
            }
        }
        _ => ImportRule::Refused(
            "plugins are offered only msmq:plugin/host@1.x and WASI 0.2 interfaces",
        ),
    }
}

/// The function every consumer plugin exports.
pub const INIT_EXPORT: &str = "init";
/// The batch export of the `consumer` world (batches as records).
pub const RECORDS_EXPORT: &str = "handle-batch";
/// The batch export of the `packed-consumer` world (batches field by field).
pub const PACKED_EXPORT: &str = "handle-packed";

/// How a component takes its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchShape {
    /// `handle-batch`, a `batch` of `message` records.
    Records,
    /// `handle-packed`, a `packed-batch`.
    Packed,
}

/// What the outer sections of a component say.
#[derive(Debug, Default)]
pub struct ComponentOutline {
    pub imports: Vec<String>,
    pub exported_functions: Vec<String>,
}

impl ComponentOutline {
    fn exports(&self, name: &str) -> bool {
        self.exported_functions.iter().any(|e| e == name)
    }

    /// The batch export the broker will call: `handle-packed` when the
    /// component has it (a component may carry both), else `handle-batch`.
    pub fn batch_shape(&self) -> Option<BatchShape> {
        if self.exports(PACKED_EXPORT) {
            Some(BatchShape::Packed)
        } else if self.exports(RECORDS_EXPORT) {
            Some(BatchShape::Records)
        } else {
            None
        }
    }

    /// Imports with their rules, in the component's order.
    pub fn rules(&self) -> impl Iterator<Item = (&str, ImportRule)> {
        self.imports.iter().map(|i| (i.as_str(), import_rule(i)))
    }
}

/// Read a component's own imports and exports. Cheap: section headers are
/// read, function bodies are skipped.
pub fn outline(bytes: &[u8], size_max: usize) -> Result<ComponentOutline, RefusedComponent> {
    if bytes.len() > size_max {
        return Err(RefusedComponent::TooLarge {
            size: bytes.len(),
            max: size_max,
        });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(RefusedComponent::NotWasm);
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(RefusedComponent::CoreModule);
    }
    let mut outline = ComponentOutline::default();
    // Nested modules and components are walked too; only depth 1 is ours.
    let mut depth = 0u32;
    let invalid = |e: wasmparser::BinaryReaderError| RefusedComponent::Invalid(e.to_string());
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(invalid)?;
                    // A world's `use` of a type is an import of that type,
                    // bound to the interface it came from: nothing to link.
                    if !matches!(import.ty, wasmparser::ComponentTypeRef::Type(_)) {
                        outline.imports.push(import.name.name.to_string());
                    }
                }
            }
            wasmparser::Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    if export.kind == wasmparser::ComponentExternalKind::Func {
                        outline
                            .exported_functions
                            .push(export.name.name.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(outline)
}

/// Refuse a component whose imports the broker does not link or that lacks
/// the consumer world's exports, before anything is compiled.
pub fn check(bytes: &[u8], size_max: usize) -> Result<ComponentOutline, RefusedComponent> {
    let outline = outline(bytes, size_max)?;
    if let Some((name, rule)) = outline
        .rules()
        .find(|(_, rule)| matches!(rule, ImportRule::Refused(_)))
    {
        let ImportRule::Refused(why) = rule else {
            unreachable!("found by the match above")
        };
        if name.starts_with("msmq:plugin/") {
            return Err(RefusedComponent::WrongWorld(format!(
                "it imports {name}; {why}"
            )));
        }
        return Err(RefusedComponent::ForbiddenImport(name.to_string(), why));
    }
    let mut missing = Vec::new();
    if !outline.exports(INIT_EXPORT) {
        missing.push(INIT_EXPORT.to_string());
    }
    if outline.batch_shape().is_none() {
        missing.push(format!("{RECORDS_EXPORT} (or {PACKED_EXPORT})"));
    }
    if !missing.is_empty() {
        return Err(RefusedComponent::WrongWorld(format!(
            "it does not export {} (it exports: {})",
            missing.join(" or "),
            if outline.exported_functions.is_empty() {
                "no functions".to_string()
            } else {
                outline.exported_functions.join(", ")
            }
        )));
    }
    Ok(outline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_follow_the_rules() {
        assert_eq!(import_rule("msmq:plugin/host@1.0.0"), ImportRule::Host);
        assert_eq!(import_rule("msmq:plugin/types@1.1.0"), ImportRule::Host);
        assert!(matches!(
            import_rule("msmq:plugin/host@2.0.0"),
            ImportRule::Refused(_)
        ));
        assert!(matches!(
            import_rule("msmq:plugin/host"),
            ImportRule::Refused(_)
        ));
        assert!(matches!(
            import_rule("msmq:plugin/admin@1.0.0"),
            ImportRule::Refused(_)
        ));
        for wasi in [
            "wasi:cli/stdout@0.2.0",
            "wasi:io/streams@0.2.9",
            "wasi:filesystem/preopens@0.2.9",
            "wasi:sockets/tcp@0.2.3",
            "wasi:random/insecure-seed@0.2.0",
            "wasi:clocks/wall-clock@0.2.0",
        ] {
            assert_eq!(import_rule(wasi), ImportRule::EmptyWasi, "{wasi}");
        }
        assert_eq!(import_rule("wasi:http/types@0.2.9"), ImportRule::Traps);
        assert!(matches!(
            import_rule("wasi:cli/stdout@0.3.0"),
            ImportRule::Refused(_)
        ));
        assert!(matches!(
            import_rule("wasi:keyvalue/store@0.2.0"),
            ImportRule::Refused(_)
        ));
        assert!(matches!(
            import_rule("test:other/vault"),
            ImportRule::Refused(_)
        ));
    }

    #[test]
    fn non_components_are_refused_by_their_header() {
        assert!(matches!(
            outline(b"hello", 100),
            Err(RefusedComponent::NotWasm)
        ));
        assert!(matches!(
            outline(b"\0asm\x01\0\0\0", 100),
            Err(RefusedComponent::CoreModule)
        ));
        assert!(matches!(
            outline(b"\0asm\x0d\0\x01\0", 7),
            Err(RefusedComponent::TooLarge { size: 8, max: 7 })
        ));
        // The size limit itself is allowed.
        assert!(outline(b"\0asm\x0d\0\x01\0", 8).is_ok());
    }
}
