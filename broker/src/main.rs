fn main() -> std::process::ExitCode {
    msmq_broker::cli::main()
}
