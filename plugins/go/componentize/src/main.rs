//! go-componentize WIT_DIR WORLD CORE.wasm OUT.wasm
//!
//! Embeds the world's component type into a core module built by Go for
//! wasip1 (what `wasm-tools component embed` does), then makes it a
//! component (what `wasm-tools component new --adapt` does) with the adapter
//! of `adapter.wat` for the `wasi_snapshot_preview1` functions Go's runtime
//! imports. Why not wasmtime's preview1 adapter: see `adapter.wat`.

use anyhow::{bail, Context, Result};
use wit_component::{embed_component_metadata, ComponentEncoder, StringEncoding};
use wit_parser::Resolve;

const ADAPTER_WAT: &str = include_str!("adapter.wat");
const ADAPTER_WIT: &str = include_str!("adapter.wit");
/// How both files name the host interface; replaced by the WIT's version.
const HOST_AS_WRITTEN: &str = "msmq:plugin/host@1.3.0";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [wit_dir, world, input, output] = &args[..] else {
        bail!("usage: go-componentize WIT_DIR WORLD CORE.wasm OUT.wasm");
    };

    let mut resolve = Resolve::default();
    let (pkg, _) = resolve
        .push_dir(wit_dir)
        .with_context(|| format!("reading WIT package {wit_dir}"))?;
    let world = resolve.select_world(&[pkg], Some(world))?;

    // The adapter imports the host interface of whatever version wit/ has.
    let host = match &resolve.packages[pkg].name.version {
        Some(v) => format!("msmq:plugin/host@{v}"),
        None => "msmq:plugin/host".to_string(),
    };
    let adapter_wit = ADAPTER_WIT.replace(HOST_AS_WRITTEN, &host);
    let adapter_pkg = resolve
        .push_str("adapter.wit", &adapter_wit)
        .context("the adapter's WIT (does wit/ still define msmq:plugin/host?)")?;
    let adapter_world = resolve.select_world(&[adapter_pkg], Some("adapter"))?;
    let mut adapter = wat::parse_str(ADAPTER_WAT.replace(HOST_AS_WRITTEN, &host))
        .context("assembling adapter.wat")?;
    embed_component_metadata(&mut adapter, &resolve, adapter_world, StringEncoding::UTF8)?;

    let mut module = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)?;

    let component = ComponentEncoder::default()
        .validate(true)
        .module(&module)?
        .adapter("wasi_snapshot_preview1", &adapter)?
        .encode()
        .context(
            "making the component (an `adapter module did not export` error names a \
             preview1 function the Go code pulled in, e.g. through os, time or net: \
             plugins get no files, sleeping or network)",
        )?;

    // Write beside the target, then rename: no half-written component.
    let tmp = format!("{output}.tmp");
    std::fs::write(&tmp, &component).with_context(|| format!("writing {tmp}"))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {output}"))?;
    Ok(())
}
