//! The one wasmtime [`Engine`] of the broker: compiling, caching and checking
//! plugin components, and linking what a plugin may import.
//!
//! Owns: the engine, its epoch ticker thread, the on-disk cache of compiled
//! components (`<data dir>/plugin-cache/<sha256>-<engine hash>.cwasm`).
//!
//! Invariants:
//! - A component is compiled at most once per engine build: later deploys and
//!   broker restarts load the cached machine code.
//! - A component is checked before it is compiled ([`super::check`]): it
//!   must export the `consumer` or `packed-consumer` world's functions and
//!   import nothing but
//!   `msmq:plugin` 1.x and WASI 0.2. WASI is linked empty
//!   ([`super::wasi`]); `wasi:http` is linked as functions that trap.

use super::check::BatchShape;
use super::host::{packed::PackedConsumerPre, ConsumerPre, HostState};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

/// Interval of the epoch ticker: the granularity of batch time limits.
pub const EPOCH_TICK_MS: u64 = 10;

/// Why a component was refused.
#[derive(Debug, Error)]
pub enum RefusedComponent {
    #[error("the file is not WebAssembly (no \\0asm header)")]
    NotWasm,
    #[error("the file is a core WebAssembly module, not a component; build for wasm32-wasip2 or wrap it with `wasm-tools component new`")]
    CoreModule,
    #[error("the component is {size} bytes; plugin_component_bytes_max is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("the component is invalid: {0}")]
    Invalid(String),
    #[error("the component imports {0}, which MSMQ does not grant plugins ({1})")]
    ForbiddenImport(String, &'static str),
    #[error(
        "the component does not target the msmq:plugin/consumer (or packed-consumer) world: {0}"
    )]
    WrongWorld(String),
    #[error("the plugin's init failed: {0}")]
    InitFailed(String),
}

/// A compiled, checked component, ready to instantiate.
#[derive(Clone)]
pub struct Prepared {
    pub sha256: String,
    pub bytes_len: usize,
    pub pre: PluginPre,
    /// Time spent compiling (zero when loaded from the cache).
    pub compile_time: Duration,
}

/// A linked component of either world, ready to instantiate.
#[derive(Clone)]
pub enum PluginPre {
    /// Exports `handle-batch`.
    Records(ConsumerPre<HostState>),
    /// Exports `handle-packed`.
    Packed(PackedConsumerPre<HostState>),
}

/// The broker's wasmtime engine and component cache.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    cache_dir: PathBuf,
    engine_hash: String,
}

impl PluginEngine {
    pub fn new(data_dir: &Path) -> anyhow::Result<PluginEngine> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine =
            Engine::new(&config).map_err(|e| anyhow::anyhow!("starting wasmtime: {e:#}"))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("msmq-plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                }
            })?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let cache_dir = data_dir.join("plugin-cache");
        std::fs::create_dir_all(&cache_dir)?;
        Ok(PluginEngine {
            engine,
            cache_dir,
            engine_hash: format!("{:016x}", hasher.finish()),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Check, compile (or load compiled) and link a component. Blocking.
    pub fn prepare(&self, bytes: &[u8], size_max: usize) -> Result<Prepared, RefusedComponent> {
        let outline = super::check::check(bytes, size_max)?;
        let sha256 = sha256_hex(bytes);
        let started = Instant::now();
        let (component, compiled) = self.load_or_compile(&sha256, bytes)?;
        let compile_time = if compiled {
            started.elapsed()
        } else {
            Duration::ZERO
        };
        let linker = self.linker_for(&component)?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| RefusedComponent::WrongWorld(format!("{e:#}")))?;
        let wrong_world = |e: wasmtime::Error| RefusedComponent::WrongWorld(format!("{e:#}"));
        let pre = match outline.batch_shape() {
            Some(BatchShape::Packed) => {
                PluginPre::Packed(PackedConsumerPre::new(instance_pre).map_err(wrong_world)?)
            }
            _ => PluginPre::Records(ConsumerPre::new(instance_pre).map_err(wrong_world)?),
        };
        Ok(Prepared {
            sha256,
            bytes_len: bytes.len(),
            pre,
            compile_time,
        })
    }

    /// The compiled component and whether it had to be compiled now.
    fn load_or_compile(
        &self,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(Component, bool), RefusedComponent> {
        let cached = self
            .cache_dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash));
        if cached.exists() {
            // SAFETY: the file was written by `Component::serialize` of this
            // engine build (its compatibility hash is in the name) into the
            // broker's own data directory.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok((component, false)),
                Err(e) => {
                    tracing::warn!(file = %cached.display(), error = %e, "compiled plugin cache unusable; recompiling");
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| RefusedComponent::Invalid(format!("{e:#}")))?;
        match component.serialize() {
            Ok(code) => {
                let tmp = cached.with_extension("tmp");
                if let Err(e) =
                    std::fs::write(&tmp, code).and_then(|_| std::fs::rename(&tmp, &cached))
                {
                    tracing::warn!(file = %cached.display(), error = %e, "could not cache compiled plugin");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialise compiled plugin"),
        }
        Ok((component, true))
    }

    /// A linker with the host interface, the empty WASI, and traps for
    /// `wasi:http` (the only other imports [`super::check`] lets through).
    fn linker_for(&self, component: &Component) -> Result<Linker<HostState>, RefusedComponent> {
        let invalid = |e: wasmtime::Error| RefusedComponent::Invalid(format!("{e:#}"));
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        super::host::Consumer::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(invalid)?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(invalid)?;
        self.link_http_as_traps(&mut linker, component)
            .map_err(invalid)?;
        Ok(linker)
    }

    /// `wasi:http` imports get functions that trap and placeholder
    /// resources: a component whose toolchain imports HTTP deploys, and a
    /// plugin that actually calls it fails that call.
    fn link_http_as_traps(
        &self,
        linker: &mut Linker<HostState>,
        component: &Component,
    ) -> wasmtime::Result<()> {
        use wasmtime::component::types::ComponentItem;
        /// The host side of a `wasi:http` resource no plugin can create.
        struct NoHttp;
        let component_type = component.component_type();
        let imports = || component_type.imports(&self.engine);
        let is_http =
            |name: &str| super::check::import_rule(name) == super::check::ImportRule::Traps;
        // Resources `wasi:http` takes from other interfaces (its streams are
        // wasi:io's) are linked there already and must stay those types.
        let mut elsewhere = Vec::new();
        for (name, item) in imports() {
            if let ComponentItem::ComponentInstance(instance) = item.ty {
                if !is_http(name) {
                    elsewhere.extend(instance.exports(&self.engine).filter_map(
                        |(_, e)| match e.ty {
                            ComponentItem::Resource(r) => Some(r),
                            _ => None,
                        },
                    ));
                }
            }
        }
        for (name, item) in imports() {
            if !is_http(name) {
                continue;
            }
            let ComponentItem::ComponentInstance(instance) = item.ty else {
                continue;
            };
            let mut linked = linker.instance(name)?;
            for (export, item) in instance.exports(&self.engine) {
                match item.ty {
                    ComponentItem::ComponentFunc(_) => {
                        let what = format!("{name}#{export}");
                        linked.func_new(export, move |_, _, _, _| {
                            wasmtime::bail!("{what} was called: plugins get no network")
                        })?;
                    }
                    ComponentItem::Resource(r) if elsewhere.contains(&r) => {}
                    ComponentItem::Resource(_) => {
                        linked.resource(
                            export,
                            wasmtime::component::ResourceType::host::<NoHttp>(),
                            |_, _| Ok(()),
                        )?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Shared by the manager and its runners.
pub type SharedEngine = Arc<PluginEngine>;
