package msmq

// The host interface, msmq:plugin/host@1.3.0. On wasip1 these call the
// broker (abi_wasip1.go); elsewhere they call TestHost (host_native.go).

// Log writes a line to the broker's log, tagged with the plugin's name.
func Log(level Level, message string) { hostLog(level, message) }

func Trace(message string) { hostLog(LevelTrace, message) }
func Debug(message string) { hostLog(LevelDebug, message) }
func Info(message string)  { hostLog(LevelInfo, message) }
func Warn(message string)  { hostLog(LevelWarn, message) }
func Error(message string) { hostLog(LevelError, message) }

// Publish publishes a message; it becomes visible only if the batch commits.
// A refusal is a *HostError.
func Publish(m *NewMessage) error { return errOrNil(hostPublish(m)) }

// StateGet reads a key of the plugin's state, seeing this batch's writes.
func StateGet(key string) ([]byte, bool) { return hostStateGet(key) }

// StatePut writes a key; committed with the batch. A refusal is a *HostError.
func StatePut(key string, value []byte) error { return errOrNil(hostStatePut(key, value)) }

// StateDelete deletes a key; committed with the batch.
func StateDelete(key string) { hostStateDelete(key) }

// StateScan returns up to limit entries whose key starts with prefix, in key
// order, after startAfter when it is not nil.
func StateScan(prefix string, startAfter *string, limit uint32) []Entry {
	return hostStateScan(prefix, startAfter, limit)
}

// StateGetMany reads several keys in one host call: one answer per key, in
// order; a missing key gives nil, an empty value a non-nil empty slice.
func StateGetMany(keys []string) [][]byte { return hostStateGetMany(keys) }

// StatePutMany writes several keys all or none; later entries win.
// A refusal is a *HostError naming the entry.
func StatePutMany(entries []Entry) error { return errOrNil(hostStatePutMany(entries)) }

// NowMs is the broker's wall-clock time, ms since the Unix epoch.
func NowMs() uint64 { return hostNowMs() }

// A nil *HostError must become a nil error, not a non-nil interface.
func errOrNil(e *HostError) error {
	if e == nil {
		return nil
	}
	return e
}
