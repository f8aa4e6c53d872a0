//go:build wasip1

package msmq

// The canonical ABI glue of the consumer world for wasm32, written by hand
// from the component model's canonical ABI: the core signatures below are
// the flattened WIT signatures, and every offset is that of the WIT type's
// memory layout (fields in order, each at its alignment; a variant is its
// discriminant then its payload at the payload's largest alignment).
//
// Memory the host reads or fills is Go heap memory. Go's collector does not
// move heap objects, but it frees what nothing references, and an address
// held by the host as an i32 is no reference. So every block handed out by
// cabi_realloc and every block passed back from an export is kept in pins
// until the export's post-return; what Go code lifts from those blocks points
// into them and keeps them alive from then on by itself.

// No fmt or os here: a plugin that does without them is a few hundred KB
// smaller.
import (
	"runtime"
	"runtime/metrics"
	"unsafe"
)

var pins []unsafe.Pointer

// The host calls cabi_realloc while it lowers values into the instance, and
// then the instance may not call any import. Go's allocator starts a
// collection when the heap has grown enough, and a collection reads the
// clock, an import: the call traps ("cannot leave component instance"). So
// the collector never starts by itself here: it is switched off at start-up
// and run by collect() at the start of each export, where imports are fine.
// Profiling samples are off too; they would also run inside the allocator.

//go:linkname setGCPercent runtime/debug.setGCPercent
func setGCPercent(int32) int32

func init() {
	setGCPercent(-1)
	runtime.MemProfileRate = 0
	lendLogBuffer(ptrOf(unsafe.Pointer(&logLine)), uint32(len(logLine)))
}

// logLine is where the adapter (componentize/src/adapter.wat) gathers what
// Go writes to stdout and stderr into log lines. A package array: it never
// moves and is never freed.
var logLine [2048]byte

//go:wasmimport wasi_snapshot_preview1 msmq_log_buffer
func lendLogBuffer(ptr, len uint32)

// heapMinBytes is the least allocation between two collections.
const heapMinBytes = 4 << 20

var (
	gcSamples   = []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}, {Name: "/gc/heap/live:bytes"}}
	allocsAtGC  uint64
	liveAfterGC uint64
)

// collect runs a collection once the heap has grown by the live heap after
// the last one (at least heapMinBytes): the pace of the default GOGC=100.
func collect() {
	metrics.Read(gcSamples)
	allocs := gcSamples[0].Value.Uint64()
	if allocs-allocsAtGC < max(liveAfterGC, heapMinBytes) {
		return
	}
	runtime.GC()
	metrics.Read(gcSamples)
	allocsAtGC, liveAfterGC = gcSamples[0].Value.Uint64(), gcSamples[1].Value.Uint64()
}

// zeroSized is the address returned for zero-byte allocations: 8-aligned,
// never written through.
var zeroSized [1]uint64

func alloc(size, align uint32) unsafe.Pointer {
	if size == 0 {
		return unsafe.Pointer(&zeroSized)
	}
	var p unsafe.Pointer
	if align <= 8 {
		// A []uint64 is 8-aligned, the largest alignment of any WIT type,
		// and holds no pointers, so the collector never scans it.
		buf := make([]uint64, (size+7)/8)
		p = unsafe.Pointer(unsafe.SliceData(buf))
	} else {
		buf := make([]byte, size+align)
		base := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
		p = unsafe.Add(unsafe.Pointer(unsafe.SliceData(buf)), (align-uint32(base%uintptr(align)))%align)
	}
	pins = append(pins, p)
	return p
}

// pin keeps a Go string's or slice's data alive until post-return.
func pin(p unsafe.Pointer) {
	if p != nil {
		pins = append(pins, p)
	}
}

// unpinAll runs at post-return: the host has read everything by then.
func unpinAll() {
	clear(pins)
	pins = pins[:0]
}

//go:wasmexport cabi_realloc
func cabiRealloc(old, oldSize, align, newSize uint32) uint32 {
	p := alloc(newSize, align)
	if old != 0 && oldSize != 0 && newSize != 0 {
		copy(unsafe.Slice((*byte)(p), min(oldSize, newSize)), unsafe.Slice((*byte)(addr(old)), min(oldSize, newSize)))
	}
	return uint32(uintptr(p))
}

// ---------------------------------------------------------------- memory ---

func addr(a uint32) unsafe.Pointer  { return unsafe.Pointer(uintptr(a)) }
func ptrOf(p unsafe.Pointer) uint32 { return uint32(uintptr(p)) }

func load8(a uint32) uint8   { return *(*uint8)(addr(a)) }
func load32(a uint32) uint32 { return *(*uint32)(addr(a)) }
func load64(a uint32) uint64 { return *(*uint64)(addr(a)) }

func store8(a uint32, v uint8)   { *(*uint8)(addr(a)) = v }
func store32(a uint32, v uint32) { *(*uint32)(addr(a)) = v }

// liftString and liftBytes alias the host-filled memory instead of copying:
// the block is never written again, and the alias keeps it alive.
func liftString(p, n uint32) string {
	if n == 0 {
		return ""
	}
	return unsafe.String((*byte)(addr(p)), n)
}

func liftBytes(p, n uint32) []byte {
	if n == 0 {
		return []byte{}
	}
	return unsafe.Slice((*byte)(addr(p)), n)
}

func stringPtr(s string) uint32 { return ptrOf(unsafe.Pointer(unsafe.StringData(s))) }
func bytesPtr(b []byte) uint32  { return ptrOf(unsafe.Pointer(unsafe.SliceData(b))) }

// retArea receives results of imports that do not fit one flat value (at
// most 16 bytes here). One buffer serves all: imports never nest, and each
// result is lifted before the next call. A package variable never moves,
// unlike a goroutine stack.
var retArea [2]uint64

func ret() uint32 { return ptrOf(unsafe.Pointer(&retArea)) }

// exportRet is the return area of the exports; the host reads it after the
// export returns, and it is not reused before the next export call.
var exportRet [2]uint64

// ----------------------------------------------------------------- types ---

// message: id {hi u64 @0, lo u64 @8}, partition u32 @16, offset u64 @24,
// timestamp-ms u64 @32, attempt u32 @40, key option<list<u8>> @44 (12),
// tag option<string> @56 (12), headers list<header> @68, payload list<u8>
// @76; size 88 (84 rounded up to align 8).
const messageSize = 88

func liftMessage(a uint32, m *Message) {
	m.ID = MessageID{Hi: load64(a), Lo: load64(a + 8)}
	m.Partition = load32(a + 16)
	m.Offset = load64(a + 24)
	m.TimestampMs = load64(a + 32)
	m.Attempt = load32(a + 40)
	if load8(a+44) != 0 {
		m.Key = liftBytes(load32(a+48), load32(a+52))
	}
	if load8(a+56) != 0 {
		m.Tag = liftString(load32(a+60), load32(a+64))
		m.HasTag = true
	}
	if n := load32(a + 72); n > 0 {
		base := load32(a + 68)
		m.Headers = make([]Header, n)
		for i := uint32(0); i < n; i++ {
			h := base + i*16 // header: name string @0, value string @8
			m.Headers[i] = Header{liftString(load32(h), load32(h+4)), liftString(load32(h+8), load32(h+12))}
		}
	}
	m.Payload = liftBytes(load32(a+76), load32(a+80))
}

// liftHostError reads a host-error (case u8 @0, string @4) at a.
func liftHostError(a uint32) *HostError {
	return &HostError{Kind: HostErrorKind(load8(a)), Message: liftString(load32(a+4), load32(a+8))}
}

// liftUnitResult reads result<_, host-error> (case u8 @0, error @4) at a.
func liftUnitResult(a uint32) *HostError {
	if load8(a) == 0 {
		return nil
	}
	return liftHostError(a + 4)
}

// lowerByteLists writes a list<list<u8>> (or the keys of a list of tuples)
// as consecutive (ptr, len) pairs: returns the array and keeps it pinned.
func lowerStrings(ss []string) uint32 {
	if len(ss) == 0 {
		return 0
	}
	arr := alloc(uint32(len(ss))*8, 4)
	a := ptrOf(arr)
	for i, s := range ss {
		store32(a+uint32(i)*8, stringPtr(s))
		store32(a+uint32(i)*8+4, uint32(len(s)))
	}
	return a
}

// --------------------------------------------------------------- imports ---

//go:wasmimport msmq:plugin/host@1.3.0 log
func importLog(level, msgPtr, msgLen uint32)

// publish: new-message flattens to 12 values (topic 2, payload 2, key 3,
// tag 3, headers 2), at most 16, so it goes flat; the result does not fit
// one value, so the last parameter is its return area.
//
//go:wasmimport msmq:plugin/host@1.3.0 publish
func importPublish(topicPtr, topicLen, payloadPtr, payloadLen, keyIs, keyPtr, keyLen, tagIs, tagPtr, tagLen, headersPtr, headersLen, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-get
func importStateGet(keyPtr, keyLen, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-put
func importStatePut(keyPtr, keyLen, valuePtr, valueLen, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-delete
func importStateDelete(keyPtr, keyLen uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-scan
func importStateScan(prefixPtr, prefixLen, afterIs, afterPtr, afterLen, limit, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-get-many
func importStateGetMany(keysPtr, keysLen, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 state-put-many
func importStatePutMany(entriesPtr, entriesLen, ret uint32)

//go:wasmimport msmq:plugin/host@1.3.0 now-ms
func importNowMs() uint64

// Each wrapper keeps its arguments alive across the call with KeepAlive:
// the host may call cabi_realloc, and so the collector, before it returns.

func hostLog(level Level, m string) {
	importLog(uint32(level), stringPtr(m), uint32(len(m)))
	runtime.KeepAlive(m)
}

func hostPublish(m *NewMessage) *HostError {
	var keyIs, tagIs uint32
	if m.Key != nil {
		keyIs = 1
	}
	if m.HasTag {
		tagIs = 1
	}
	var headers uint32
	if len(m.Headers) > 0 {
		arr := alloc(uint32(len(m.Headers))*16, 4)
		headers = ptrOf(arr)
		for i, h := range m.Headers {
			a := headers + uint32(i)*16
			store32(a, stringPtr(h.Name))
			store32(a+4, uint32(len(h.Name)))
			store32(a+8, stringPtr(h.Value))
			store32(a+12, uint32(len(h.Value)))
		}
	}
	importPublish(stringPtr(m.Topic), uint32(len(m.Topic)), bytesPtr(m.Payload), uint32(len(m.Payload)),
		keyIs, bytesPtr(m.Key), uint32(len(m.Key)), tagIs, stringPtr(m.Tag), uint32(len(m.Tag)),
		headers, uint32(len(m.Headers)), ret())
	runtime.KeepAlive(m)
	return liftUnitResult(ret())
}

// option<list<u8>>: case u8 @0, list @4.
func hostStateGet(key string) ([]byte, bool) {
	importStateGet(stringPtr(key), uint32(len(key)), ret())
	runtime.KeepAlive(key)
	if load8(ret()) == 0 {
		return nil, false
	}
	return liftBytes(load32(ret()+4), load32(ret()+8)), true
}

func hostStatePut(key string, value []byte) *HostError {
	importStatePut(stringPtr(key), uint32(len(key)), bytesPtr(value), uint32(len(value)), ret())
	runtime.KeepAlive(key)
	runtime.KeepAlive(value)
	return liftUnitResult(ret())
}

func hostStateDelete(key string) {
	importStateDelete(stringPtr(key), uint32(len(key)))
	runtime.KeepAlive(key)
}

// list<tuple<list<u8>, list<u8>>>: elements of 16 bytes, key @0, value @8.
func hostStateScan(prefix string, after *string, limit uint32) []Entry {
	var afterIs, afterPtr, afterLen uint32
	if after != nil {
		afterIs, afterPtr, afterLen = 1, stringPtr(*after), uint32(len(*after))
	}
	importStateScan(stringPtr(prefix), uint32(len(prefix)), afterIs, afterPtr, afterLen, limit, ret())
	runtime.KeepAlive(prefix)
	runtime.KeepAlive(after)
	base, n := load32(ret()), load32(ret()+4)
	out := make([]Entry, n)
	for i := uint32(0); i < n; i++ {
		e := base + i*16
		out[i] = Entry{liftString(load32(e), load32(e+4)), liftBytes(load32(e+8), load32(e+12))}
	}
	return out
}

// list<option<list<u8>>>: elements of 12 bytes, case @0, list @4.
func hostStateGetMany(keys []string) [][]byte {
	arr := lowerStrings(keys)
	importStateGetMany(arr, uint32(len(keys)), ret())
	runtime.KeepAlive(keys)
	base, n := load32(ret()), load32(ret()+4)
	out := make([][]byte, n)
	for i := uint32(0); i < n; i++ {
		e := base + i*12
		if load8(e) != 0 {
			out[i] = liftBytes(load32(e+4), load32(e+8))
		}
	}
	return out
}

func hostStatePutMany(entries []Entry) *HostError {
	var arr uint32
	if len(entries) > 0 {
		arr = ptrOf(alloc(uint32(len(entries))*16, 4))
		for i, e := range entries {
			a := arr + uint32(i)*16
			store32(a, stringPtr(e.Key))
			store32(a+4, uint32(len(e.Key)))
			store32(a+8, bytesPtr(e.Value))
			store32(a+12, uint32(len(e.Value)))
		}
	}
	importStatePutMany(arr, uint32(len(entries)), ret())
	runtime.KeepAlive(entries)
	return liftUnitResult(ret())
}

func hostNowMs() uint64 { return importNowMs() }

// --------------------------------------------------------------- exports ---

// guard runs f and turns a panic into a log line at error level with the
// message and the stack, then fails the call: the batch rolls back and the
// broker replaces the instance.
func guard(export string, f func()) {
	defer func() {
		if r := recover(); r != nil {
			hostLog(LevelError, "panic in "+export+": "+panicText(r)+"\n"+stack())
			// proc_exit traps the call in the host (what os.Exit does).
			// Unlike a second panic it does not print the stack again.
			procExit(2)
		}
	}()
	f()
}

//go:wasmimport wasi_snapshot_preview1 proc_exit
func procExit(code uint32)

// stack is the panicking goroutine's stack, from the panic on down.
func stack() string {
	buf := make([]byte, 4096) // the broker cuts a log line at 4 KiB anyway
	return string(buf[:runtime.Stack(buf, false)])
}

func panicText(r any) string {
	switch v := r.(type) {
	case error:
		return v.Error()
	case string:
		return v
	case interface{ String() string }:
		return v.String()
	}
	return "non-string panic value"
}

// init: func(config: list<tuple<string, string>>) -> result<_, string>.
// Returns the address of result<_, string>: case u8 @0, string @4.
//
//go:wasmexport init
func exportInit(configPtr, configLen uint32) uint32 {
	collect()
	config := make(Config, configLen)
	for i := uint32(0); i < configLen; i++ {
		e := configPtr + i*16
		config[i] = ConfigEntry{liftString(load32(e), load32(e+4)), liftString(load32(e+8), load32(e+12))}
	}
	var failure string
	failed := false
	guard("init", func() {
		if constructor == nil {
			failed, failure = true, "msmq: the plugin registered no constructor (msmq.Register)"
			return
		}
		p, err := constructor(config)
		switch {
		case err != nil:
			failed, failure = true, err.Error()
		case p == nil:
			failed, failure = true, "msmq: the constructor returned no plugin"
		default:
			plugin = p
		}
	})
	r := ptrOf(unsafe.Pointer(&exportRet))
	if !failed {
		store8(r, 0)
		return r
	}
	pin(unsafe.Pointer(unsafe.StringData(failure)))
	store8(r, 1)
	store32(r+4, stringPtr(failure))
	store32(r+8, uint32(len(failure)))
	return r
}

//go:wasmexport cabi_post_init
func postInit(uint32) { unpinAll() }

// handle-batch: func(batch: batch) -> list<outcome>. batch flattens to
// (topic ptr, len, messages ptr, len); the result is the address of
// (ptr, len) of outcomes, 12 bytes each: case u8 @0, u32 or string @4.
//
//go:wasmexport handle-batch
func exportHandleBatch(topicPtr, topicLen, messagesPtr, messagesLen uint32) uint32 {
	collect()
	batch := &Batch{Topic: liftString(topicPtr, topicLen), Messages: make([]Message, messagesLen)}
	for i := range batch.Messages {
		liftMessage(messagesPtr+uint32(i)*messageSize, &batch.Messages[i])
	}
	var outs []Outcome
	guard("handle-batch", func() {
		if plugin == nil {
			panic("msmq: handle-batch before a successful init")
		}
		outs = plugin.HandleBatch(batch)
	})
	arr := ptrOf(alloc(uint32(len(outs))*12, 4))
	for i, o := range outs {
		a := arr + uint32(i)*12
		store8(a, uint8(o.kind))
		switch o.kind {
		case outcomeRetry:
			store32(a+4, o.retryMs)
		case outcomeDeadLetter:
			pin(unsafe.Pointer(unsafe.StringData(o.reason)))
			store32(a+4, stringPtr(o.reason))
			store32(a+8, uint32(len(o.reason)))
		}
	}
	r := ptrOf(unsafe.Pointer(&exportRet))
	store32(r, arr)
	store32(r+4, uint32(len(outs)))
	return r
}

//go:wasmexport cabi_post_handle-batch
func postHandleBatch(uint32) { unpinAll() }
