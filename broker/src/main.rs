// mimalloc: the broker allocates and frees many small buffers per request
// (frames, records, stream state); glibc malloc showed up at ~12% of CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    msmq_broker::cli::main()
}
