//go:build !wasip1

package msmq

// Outside wasip1 there is no broker: the host functions call TestHost, so a
// plugin's logic can be unit-tested with `go test` (see MemoryHost).

// Host is the host interface as Go methods.
type Host interface {
	Log(level Level, message string)
	Publish(m *NewMessage) *HostError
	StateGet(key string) ([]byte, bool)
	StatePut(key string, value []byte) *HostError
	StateDelete(key string)
	StateScan(prefix string, startAfter *string, limit uint32) []Entry
	StateGetMany(keys []string) [][]byte
	StatePutMany(entries []Entry) *HostError
	NowMs() uint64
}

// TestHost receives the host calls outside wasip1.
var TestHost Host

func testHost() Host {
	if TestHost == nil {
		panic("msmq: no broker outside wasip1; set msmq.TestHost in tests")
	}
	return TestHost
}

func hostLog(l Level, m string)                  { testHost().Log(l, m) }
func hostPublish(m *NewMessage) *HostError       { return testHost().Publish(m) }
func hostStateGet(k string) ([]byte, bool)       { return testHost().StateGet(k) }
func hostStatePut(k string, v []byte) *HostError { return testHost().StatePut(k, v) }
func hostStateDelete(k string)                   { testHost().StateDelete(k) }
func hostStateGetMany(ks []string) [][]byte      { return testHost().StateGetMany(ks) }
func hostStatePutMany(es []Entry) *HostError     { return testHost().StatePutMany(es) }
func hostNowMs() uint64                          { return testHost().NowMs() }
func hostStateScan(p string, s *string, n uint32) []Entry {
	return testHost().StateScan(p, s, n)
}

// Instantiate runs the registered constructor, as the broker's init does.
func Instantiate(config Config) (Plugin, error) {
	if constructor == nil {
		panic("msmq: no plugin registered")
	}
	return constructor(config)
}
