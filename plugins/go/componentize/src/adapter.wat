;; The `wasi_snapshot_preview1` functions Go's wasip1 runtime imports, for a
;; plugin: a stateless adapter that allocates nothing.
;;
;; Why not the wasmtime preview1 adapter: it takes 64 KiB of stack and a page
;; of state from the main module, either through its cabi_realloc (which
;; enters Go from inside Go's runtime, e.g. a clock read while the runtime
;; holds locks: Go aborts) or with memory.grow (Go's heap assumes every page
;; past its own break is its own, and overwrites the adapter's state as soon
;; as it grows). This one keeps four globals and uses memory only where the
;; caller says.
;;
;; - stdout and stderr become host `log` lines (info, warn), split at '\n'
;;   in a buffer the Go side lends with msmq_log_buffer;
;; - clocks: realtime from the host's `now-ms`, monotonic from
;;   wasi:clocks/monotonic-clock; random from wasi:random/random;
;; - no arguments, no environment, no files (EBADF), sched_yield does
;;   nothing, poll_oneoff reports its first subscription as ready at once (a
;;   sleep spins until it is over, on the batch's time budget);
;; - proc_exit traps.
(module
  (import "env" "memory" (memory 0))
  (import "msmq:plugin/host@1.1.0" "log" (func $log (param i32 i32 i32)))
  (import "msmq:plugin/host@1.1.0" "now-ms" (func $now_ms (result i64)))
  (import "wasi:clocks/monotonic-clock@0.2.0" "now" (func $monotonic_now (result i64)))
  (import "wasi:random/random@0.2.0" "get-random-u64" (func $random_u64 (result i64)))

  ;; The line buffer: address and size lent by Go, bytes held, their level.
  (global $buf (mut i32) (i32.const 0))
  (global $cap (mut i32) (i32.const 0))
  (global $fill (mut i32) (i32.const 0))
  (global $level (mut i32) (i32.const 2))

  (func (export "msmq_log_buffer") (param $ptr i32) (param $len i32)
    (global.set $buf (local.get $ptr))
    (global.set $cap (local.get $len))
    (global.set $fill (i32.const 0)))

  (func $flush
    (if (global.get $fill)
      (then
        (call $log (global.get $level) (global.get $buf) (global.get $fill))
        (global.set $fill (i32.const 0)))))

  (func (export "fd_write") (param $fd i32) (param $iovs i32) (param $n i32) (param $written i32) (result i32)
    (local $level i32) (local $total i32) (local $ptr i32) (local $len i32) (local $i i32) (local $byte i32)
    ;; log-level: info (2) for stdout, warn (3) for stderr; no other fd is open.
    (if (i32.eq (local.get $fd) (i32.const 1))
      (then (local.set $level (i32.const 2)))
      (else
        (if (i32.eq (local.get $fd) (i32.const 2))
          (then (local.set $level (i32.const 3)))
          (else (return (i32.const 8)))))) ;; EBADF
    (if (i32.ne (local.get $level) (global.get $level))
      (then (call $flush) (global.set $level (local.get $level))))
    (block $done
      (loop $next_iov
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $ptr (i32.load (local.get $iovs)))
        (local.set $len (i32.load offset=4 (local.get $iovs)))
        (local.set $total (i32.add (local.get $total) (local.get $len)))
        (if (i32.eqz (global.get $cap))
          (then
            ;; No buffer yet (Go's runtime start-up): a line per piece.
            (if (local.get $len)
              (then (call $log (local.get $level) (local.get $ptr) (local.get $len)))))
          (else
            (local.set $i (i32.const 0))
            (block $end
              (loop $next_byte
                (br_if $end (i32.ge_u (local.get $i) (local.get $len)))
                (local.set $byte (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
                (if (i32.eq (local.get $byte) (i32.const 10))
                  (then (call $flush))
                  (else
                    (if (i32.ge_u (global.get $fill) (global.get $cap)) (then (call $flush)))
                    (i32.store8 (i32.add (global.get $buf) (global.get $fill)) (local.get $byte))
                    (global.set $fill (i32.add (global.get $fill) (i32.const 1)))))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $next_byte)))))
        (local.set $iovs (i32.add (local.get $iovs) (i32.const 8)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next_iov)))
    (i32.store (local.get $written) (local.get $total))
    (i32.const 0))

  (func (export "clock_time_get") (param $id i32) (param $precision i64) (param $out i32) (result i32)
    (if (i32.eqz (local.get $id)) ;; realtime
      (then (i64.store (local.get $out) (i64.mul (call $now_ms) (i64.const 1000000))))
      (else (i64.store (local.get $out) (call $monotonic_now))))
    (i32.const 0))

  (func (export "random_get") (param $ptr i32) (param $len i32) (result i32)
    (local $r i64)
    (block $done
      (loop $word
        (br_if $done (i32.lt_u (local.get $len) (i32.const 8)))
        (i64.store (local.get $ptr) (call $random_u64))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 8)))
        (local.set $len (i32.sub (local.get $len) (i32.const 8)))
        (br $word)))
    (if (local.get $len)
      (then
        (local.set $r (call $random_u64))
        (block $end
          (loop $byte
            (br_if $end (i32.eqz (local.get $len)))
            (i64.store8 (local.get $ptr) (local.get $r))
            (local.set $r (i64.shr_u (local.get $r) (i64.const 8)))
            (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
            (local.set $len (i32.sub (local.get $len) (i32.const 1)))
            (br $byte)))))
    (i32.const 0))

  ;; subscription: userdata u64 @0, tag u8 @8; event (32 bytes): userdata @0,
  ;; error u16 @8, type u8 @10, fd_readwrite @16.
  (func (export "poll_oneoff") (param $in i32) (param $out i32) (param $nsubs i32) (param $nevents i32) (result i32)
    (if (i32.eqz (local.get $nsubs))
      (then (i32.store (local.get $nevents) (i32.const 0)) (return (i32.const 0))))
    (i64.store (local.get $out) (i64.load (local.get $in)))
    (i32.store16 offset=8 (local.get $out) (i32.const 0))
    (i32.store8 offset=10 (local.get $out) (i32.load8_u offset=8 (local.get $in)))
    (i64.store offset=16 (local.get $out) (i64.const 0))
    (i64.store offset=24 (local.get $out) (i64.const 0))
    (i32.store (local.get $nevents) (i32.const 1))
    (i32.const 0))

  (func (export "proc_exit") (param i32)
    (call $flush)
    (unreachable))

  (func (export "sched_yield") (result i32) (i32.const 0))

  (func $no_strings (param $count i32) (param $size i32) (result i32)
    (i32.store (local.get $count) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))
  (func (export "args_sizes_get") (param i32 i32) (result i32)
    (call $no_strings (local.get 0) (local.get 1)))
  (func (export "environ_sizes_get") (param i32 i32) (result i32)
    (call $no_strings (local.get 0) (local.get 1)))
  (func (export "args_get") (param i32 i32) (result i32) (i32.const 0))
  (func (export "environ_get") (param i32 i32) (result i32) (i32.const 0))

  ;; Files, for package os: there are none (no preopened directory), so
  ;; every call answers EBADF. Only those a module imports are kept.
  (func (export "fd_close") (param i32) (result i32) (i32.const 8))
  (func (export "fd_sync") (param i32) (result i32) (i32.const 8))
  (func (export "fd_datasync") (param i32) (result i32) (i32.const 8))
  (func (export "fd_fdstat_get") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_fdstat_set_flags") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_fdstat_set_rights") (param i32 i64 i64) (result i32) (i32.const 8))
  (func (export "fd_prestat_get") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_prestat_dir_name") (param i32 i32 i32) (result i32) (i32.const 8))
  (func (export "fd_read") (param i32 i32 i32 i32) (result i32) (i32.const 8))
  (func (export "fd_pread") (param i32 i32 i32 i64 i32) (result i32) (i32.const 8))
  (func (export "fd_pwrite") (param i32 i32 i32 i64 i32) (result i32) (i32.const 8))
  (func (export "fd_seek") (param i32 i64 i32 i32) (result i32) (i32.const 8))
  (func (export "fd_tell") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_filestat_get") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_filestat_set_size") (param i32 i64) (result i32) (i32.const 8))
  (func (export "fd_filestat_set_times") (param i32 i64 i64 i32) (result i32) (i32.const 8))
  (func (export "fd_readdir") (param i32 i32 i32 i64 i32) (result i32) (i32.const 8))
  (func (export "fd_renumber") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_advise") (param i32 i64 i64 i32) (result i32) (i32.const 8))
  (func (export "fd_allocate") (param i32 i64 i64) (result i32) (i32.const 8))
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32) (i32.const 8))
  (func (export "path_filestat_get") (param i32 i32 i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_filestat_set_times") (param i32 i32 i32 i32 i64 i64 i32) (result i32) (i32.const 8))
  (func (export "path_create_directory") (param i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_remove_directory") (param i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_unlink_file") (param i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_link") (param i32 i32 i32 i32 i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_readlink") (param i32 i32 i32 i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_rename") (param i32 i32 i32 i32 i32 i32) (result i32) (i32.const 8))
  (func (export "path_symlink") (param i32 i32 i32 i32 i32) (result i32) (i32.const 8))
)
