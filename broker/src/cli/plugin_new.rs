//! `msmq plugin new NAME --lang LANG`: a plugin folder that builds with one
//! command and deploys as it is.
//!
//! Every scaffold carries its own copy of the WIT contract (`wit/`), so it
//! builds outside this repository. The templates are the repository's own
//! files where one exists (the WIT, each language's build script and guest
//! SDK), compiled into the binary, so a scaffold is what the tests build.

use std::path::{Path, PathBuf};

/// Languages `plugin new` scaffolds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    C,
    Python,
    Js,
    Go,
}

const WIT: &str = include_str!("../../../wit/plugin.wit");
const C_BUILD: &str = include_str!("../../../plugins/c/build.sh");
const C_INSTALL: &str = include_str!("../../../plugins/c/install-tools.sh");
const PYTHON_BUILD: &str = include_str!("../../../plugins/python/build.sh");
const PYTHON_SDK: &str = include_str!("../../../plugins/python/msmq_plugin.py");
const PYTHON_GITIGNORE: &str = include_str!("../../../plugins/python/.gitignore");
const JS_BUILD: &str = include_str!("../../../plugins/js/build.sh");
const JS_SDK: &str = include_str!("../../../plugins/js/msmq-plugin.js");
const JS_PACKAGE: &str = include_str!("../../../plugins/js/package.json");
const JS_PACKAGE_LOCK: &str = include_str!("../../../plugins/js/package-lock.json");
const JS_GITIGNORE: &str = include_str!("../../../plugins/js/.gitignore");
const GO_BUILD: &str = include_str!("../../../plugins/go/build.sh");
const GO_MOD: &str = include_str!("../../../plugins/go/go.mod");
const GO_GITIGNORE: &str = include_str!("../../../plugins/go/.gitignore");
/// The Go binding package and the componentize tool: (path, contents).
const GO_FILES: [(&str, &str); 10] = [
    (
        "msmq/abi_wasip1.go",
        include_str!("../../../plugins/go/msmq/abi_wasip1.go"),
    ),
    (
        "msmq/host.go",
        include_str!("../../../plugins/go/msmq/host.go"),
    ),
    (
        "msmq/host_native.go",
        include_str!("../../../plugins/go/msmq/host_native.go"),
    ),
    (
        "msmq/memoryhost_native.go",
        include_str!("../../../plugins/go/msmq/memoryhost_native.go"),
    ),
    (
        "msmq/types.go",
        include_str!("../../../plugins/go/msmq/types.go"),
    ),
    (
        "componentize/Cargo.toml",
        include_str!("../../../plugins/go/componentize/Cargo.toml"),
    ),
    (
        "componentize/Cargo.lock",
        include_str!("../../../plugins/go/componentize/Cargo.lock"),
    ),
    (
        "componentize/src/main.rs",
        include_str!("../../../plugins/go/componentize/src/main.rs"),
    ),
    (
        "componentize/src/adapter.wat",
        include_str!("../../../plugins/go/componentize/src/adapter.wat"),
    ),
    (
        "componentize/src/adapter.wit",
        include_str!("../../../plugins/go/componentize/src/adapter.wit"),
    ),
];

/// The wit-bindgen the Rust scaffold uses: the one the repository's Rust
/// plugins are built with.
const RUST_WIT_BINDGEN: &str = "0.57";

/// One file of a scaffold: path relative to its folder, contents, and
/// whether it is executable.
struct File {
    path: String,
    contents: String,
    executable: bool,
}

fn file(path: impl Into<String>, contents: impl Into<String>) -> File {
    File {
        path: path.into(),
        contents: contents.into(),
        executable: false,
    }
}

fn script(path: impl Into<String>, contents: impl Into<String>) -> File {
    File {
        executable: true,
        ..file(path, contents)
    }
}

/// What was made: the folder, the build command and the built component.
pub struct Scaffold {
    pub dir: PathBuf,
    pub build: String,
    pub component: String,
}

/// Write the scaffold of plugin `name` in `lang` into `dir/name`.
pub fn create(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<Scaffold> {
    msmq_client::protocol::names::validate_name("plugin", name).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && name.starts_with(|c: char| c.is_ascii_alphabetic()),
        "plugin name {name:?}: for a scaffold, use a letter then letters, digits, '-' or '_' (it names a crate, a module and a file)"
    );
    let root = dir.join(name);
    anyhow::ensure!(
        !root.exists(),
        "{} already exists; choose another name or folder",
        root.display()
    );
    let (files, build, component) = match lang {
        Lang::Rust => rust(name),
        Lang::C => c(name),
        Lang::Python => python(name),
        Lang::Go => go(name),
        Lang::Js => js(name),
    };
    for f in files {
        let path = root.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, &f.contents)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        if f.executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(Scaffold {
        dir: root,
        build,
        component,
    })
}

fn rust(name: &str) -> (Vec<File>, String, String) {
    let crate_name = name.replace('-', "_");
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
wit-bindgen = {{ version = "{RUST_WIT_BINDGEN}", default-features = false, features = ["macros", "realloc"] }}

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true

# Its own workspace, so it builds wherever it is put.
[workspace]
"#
    );
    let lib = format!(
        r#"//! `{name}`: an MSMQ consumer plugin. Build it with
//! `cargo build --release --target wasm32-wasip2 --target-dir target`.
//!
//! The contract is `wit/plugin.wit`; `plugins/README.md` of MSMQ explains it.
//! Effects (state writes, publishes) commit with the batch's outcomes, all or
//! nothing; be idempotent by message id.

wit_bindgen::generate!({{ path: "wit", world: "consumer" }});

use msmq::plugin::host::{{self, LogLevel}};

struct Plugin;

impl Guest for Plugin {{
    fn init(config: Vec<(String, String)>) -> Result<(), String> {{
        host::log(LogLevel::Info, &format!("{name} starting with {{}} config entries", config.len()));
        Ok(())
    }}

    fn handle_batch(batch: Batch) -> Vec<Outcome> {{
        let mut outcomes = Vec::with_capacity(batch.messages.len());
        for message in &batch.messages {{
            // Count messages per partition in the plugin's state.
            let key = format!("count/{{}}", message.partition);
            let count: u64 = host::state_get(key.as_bytes())
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            match host::state_put(key.as_bytes(), (count + 1).to_string().as_bytes()) {{
                Ok(()) => outcomes.push(Outcome::Ack),
                Err(_) => outcomes.push(Outcome::Retry(1_000)),
            }}
        }}
        outcomes
    }}
}}

export!(Plugin);
"#
    );
    (
        vec![
            file("Cargo.toml", cargo),
            file("src/lib.rs", lib),
            file("wit/plugin.wit", WIT),
            file(".gitignore", "/target\n"),
        ],
        // --target-dir: the component lands where `deploy` says, even if
        // CARGO_TARGET_DIR points elsewhere.
        "cargo build --release --target wasm32-wasip2 --target-dir target".into(),
        format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
    )
}

fn c(name: &str) -> (Vec<File>, String, String) {
    let module = name.replace('-', "_");
    let source = format!(
        r#"/*
 * {name}: an MSMQ consumer plugin in C. Build it with `bash build.sh`
 * (`bash install-tools.sh` first installs the tools, on Debian 12).
 *
 * Counts messages per partition in its state (`count/<partition>`) and
 * logs how many each batch had. Memory follows
 * wit-bindgen's C rules: the batch is ours to free; the outcome list we
 * return is malloc'd and freed after the call.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "consumer.h"

bool exports_consumer_init(consumer_list_tuple2_string_string_t *config,
                           consumer_string_t *err) {{
  (void)err;
  consumer_list_tuple2_string_string_free(config);
  return true;
}}

/* Writes `n` in decimal at `out`; returns the number of digits. */
static size_t put_decimal(char *out, uint64_t n) {{
  char digits[24];
  size_t d = 0;
  do {{
    digits[d++] = (char)('0' + n % 10);
    n /= 10;
  }} while (n > 0);
  for (size_t i = 0; i < d; i++) {{
    out[i] = digits[d - 1 - i];
  }}
  return d;
}}

/* Adds one to state `count/<partition>`; false if the write was refused. */
static bool count_message(uint32_t partition) {{
  char key[32] = "count/";
  size_t key_len = 6 + put_decimal(key + 6, partition);
  consumer_list_u8_t key_bytes = {{(uint8_t *)key, key_len}};
  uint64_t count = 0;
  consumer_list_u8_t stored;
  if (msmq_plugin_host_state_get(&key_bytes, &stored)) {{
    for (size_t i = 0; i < stored.len && stored.ptr[i] >= '0' && stored.ptr[i] <= '9'; i++) {{
      count = count * 10 + (uint64_t)(stored.ptr[i] - '0');
    }}
    consumer_list_u8_free(&stored);
  }}
  char value[24];
  consumer_list_u8_t value_bytes = {{(uint8_t *)value, put_decimal(value, count + 1)}};
  msmq_plugin_host_host_error_t err;
  if (!msmq_plugin_host_state_put(&key_bytes, &value_bytes, &err)) {{
    msmq_plugin_host_host_error_free(&err);
    return false;
  }}
  return true;
}}

void exports_consumer_handle_batch(consumer_batch_t *batch, consumer_list_outcome_t *ret) {{
  size_t n = batch->messages.len;
  ret->ptr = NULL;
  ret->len = 0;
  if (n > 0) {{
    ret->ptr = calloc(n, sizeof *ret->ptr);
    if (ret->ptr == NULL) {{
      abort();
    }}
    ret->len = n;
  }}
  for (size_t i = 0; i < n; i++) {{
    if (count_message(batch->messages.ptr[i].partition)) {{
      ret->ptr[i].tag = MSMQ_PLUGIN_TYPES_OUTCOME_ACK;
    }} else {{
      ret->ptr[i].tag = MSMQ_PLUGIN_TYPES_OUTCOME_RETRY;
      ret->ptr[i].val.retry = 1000;
    }}
  }}
  /* No stdio here: the C build links no WASI, so the line is made by hand. */
  char line[64] = "{module}: handled ";
  size_t len = strlen(line);
  len += put_decimal(line + len, n);
  consumer_string_t message = {{(uint8_t *)line, len}};
  msmq_plugin_host_log(MSMQ_PLUGIN_TYPES_LOG_LEVEL_INFO, &message);
  consumer_batch_free(batch);
}}
"#
    );
    (
        vec![
            file(format!("{name}/{module}.c"), source),
            script("build.sh", C_BUILD),
            script("install-tools.sh", install_tools_standalone()),
            file("wit/plugin.wit", WIT),
            file(".gitignore", "/target\n"),
        ],
        "bash build.sh".into(),
        format!("target/{name}.wasm"),
    )
}

/// The C tools installer, minus the repository's apt helper it calls.
fn install_tools_standalone() -> String {
    C_INSTALL.replace(
        r#"bash "$(dirname "$0")/../../scripts/apt-install.sh" "${APT_PACKAGES[@]}""#,
        r#"missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi"#,
    )
}

fn python(name: &str) -> (Vec<File>, String, String) {
    let app = format!(
        r#""""{name}: an MSMQ consumer plugin in Python. Build it with `bash build.sh`.

Counts messages per partition in the plugin's state, with one state read
and one state write per batch (each call into the broker has a cost).
Import every module at the top: the standard library is not reachable once
the component runs.
"""

import msmq_plugin as mp


@mp.plugin
class Plugin:
    def init(self, config):
        mp.info(f"{name} starting with {{len(config)}} config entries")

    def handle(self, batch):
        keys = sorted({{f"count/{{m.partition}}" for m in batch}})
        counts = {{k: int(v or b"0") for k, v in zip(keys, mp.get_many(keys))}}
        for m in batch:
            counts[f"count/{{m.partition}}"] += 1
        try:
            mp.put_many({{k: str(v) for k, v in counts.items()}})
        except mp.HostError as e:
            mp.warn(f"state write refused, retrying the batch: {{e}}")
            return [mp.Retry(1000)] * len(batch)
        return [mp.Ack()] * len(batch)
"#
    );
    (
        vec![
            file(format!("{name}/app.py"), app),
            script("build.sh", PYTHON_BUILD),
            file("msmq_plugin.py", PYTHON_SDK),
            file("wit/plugin.wit", WIT),
            file(".gitignore", PYTHON_GITIGNORE),
        ],
        "bash build.sh".into(),
        format!("target/{name}.wasm"),
    )
}

fn go(name: &str) -> (Vec<File>, String, String) {
    let main = format!(
        r#"// Command {name} is an MSMQ consumer plugin in Go. Build it with
// `bash build.sh`.
//
// It counts messages per partition in the plugin's state, with one state
// read and one state write per batch.
package main

import (
	"strconv"

	"msmqplugins/msmq"
)

func init() {{ msmq.Register(newPlugin) }}

// main is never called: the module is a reactor, driven by its exports.
func main() {{}}

type plugin struct{{}}

func newPlugin(msmq.Config) (msmq.Plugin, error) {{
	msmq.Info("{name} starting")
	return plugin{{}}, nil
}}

func (plugin) HandleBatch(batch *msmq.Batch) []msmq.Outcome {{
	var keys []string
	index := map[string]int{{}}
	for _, m := range batch.Messages {{
		key := "count/" + strconv.FormatUint(uint64(m.Partition), 10)
		if _, ok := index[key]; !ok {{
			index[key] = len(keys)
			keys = append(keys, key)
		}}
	}}
	counts := make([]uint64, len(keys))
	for i, v := range msmq.StateGetMany(keys) {{
		counts[i], _ = strconv.ParseUint(string(v), 10, 64)
	}}
	for _, m := range batch.Messages {{
		counts[index["count/"+strconv.FormatUint(uint64(m.Partition), 10)]]++
	}}
	entries := make([]msmq.Entry, len(keys))
	for i, key := range keys {{
		entries[i] = msmq.Entry{{Key: key, Value: []byte(strconv.FormatUint(counts[i], 10))}}
	}}
	outcome := msmq.Ack()
	if err := msmq.StatePutMany(entries); err != nil {{
		msmq.Warn("state write refused, retrying the batch: " + err.Error())
		outcome = msmq.Retry(1000)
	}}
	outcomes := make([]msmq.Outcome, len(batch.Messages))
	for i := range outcomes {{
		outcomes[i] = outcome
	}}
	return outcomes
}}
"#
    );
    let mut files = vec![
        file(format!("{name}/main.go"), main),
        script("build.sh", GO_BUILD),
        file("go.mod", GO_MOD),
        file("wit/plugin.wit", WIT),
        file(".gitignore", GO_GITIGNORE),
    ];
    files.extend(
        GO_FILES
            .iter()
            .map(|(path, contents)| file(*path, *contents)),
    );
    (files, "bash build.sh".into(), format!("target/{name}.wasm"))
}

fn js(name: &str) -> (Vec<File>, String, String) {
    let index = format!(
        r#"// {name}: an MSMQ consumer plugin in JavaScript. Build it with
// `bash build.sh`.
//
// Counts messages per partition in the plugin's state, with one state read
// and one state write per batch (each call into the broker has a cost).

import {{ definePlugin, ack, retry, state, log, HostError }} from '../msmq-plugin.js';

class Plugin {{
  init(config) {{
    log.info(`{name} starting with ${{[...config.entries()].length}} config entries`);
  }}

  handle(batch) {{
    const keys = [...new Set(batch.messages.map((m) => `count/${{m.partition}}`))];
    const counts = new Map();
    state.getManyText(keys).forEach((v, i) => counts.set(keys[i], Number(v ?? 0)));
    for (const m of batch.messages) {{
      const key = `count/${{m.partition}}`;
      counts.set(key, counts.get(key) + 1);
    }}
    try {{
      state.putMany([...counts].map(([k, v]) => [k, String(v)]));
    }} catch (e) {{
      if (!(e instanceof HostError)) throw e;
      log.warn(`state write refused, retrying the batch: ${{e.message}}`);
      return batch.messages.map(() => retry(1000));
    }}
    return batch.messages.map(() => ack());
  }}
}}

export const {{ init, handlePacked }} = definePlugin(Plugin);
"#
    );
    (
        vec![
            file(format!("{name}/index.js"), index),
            script("build.sh", JS_BUILD),
            file("msmq-plugin.js", JS_SDK),
            file("package.json", JS_PACKAGE),
            file("package-lock.json", JS_PACKAGE_LOCK),
            file("wit/plugin.wit", WIT),
            file(".gitignore", JS_GITIGNORE),
        ],
        "bash build.sh".into(),
        format!("target/{name}.wasm"),
    )
}
