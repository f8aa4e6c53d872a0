// Package msmq is a hand-written binding of the MSMQ consumer world
// (msmq:plugin@1.3.0, wit/plugin.wit) for Go's wasip1 port.
//
// A plugin's main package registers its constructor in an init function and
// leaves main empty:
//
//	func init() { msmq.Register(newMyPlugin) }
//	func main() {}
//
// The module must be built as a reactor (GOOS=wasip1 GOARCH=wasm
// -buildmode=c-shared) and made a component with the preview1 reactor
// adapter; see the README next to this package.
package msmq

// MessageID is the broker-assigned id: stable across retries and
// redeliveries, so it is the key for idempotency.
type MessageID struct {
	Hi, Lo uint64
}

// Hex is the id as 32 lowercase hex digits, Hi then Lo, big-endian.
func (id MessageID) Hex() string {
	// By hand: encoding/hex pulls in fmt and os, and with them WASI
	// filesystem imports.
	const digits = "0123456789abcdef"
	var b [32]byte
	for i := 0; i < 16; i++ {
		b[15-i] = digits[id.Hi>>(4*i)&0xf]
		b[31-i] = digits[id.Lo>>(4*i)&0xf]
	}
	return string(b[:])
}

func (id MessageID) String() string { return id.Hex() }

// Header is a string header of a message.
type Header struct {
	Name, Value string
}

// Message is one message of a batch. Its byte slices and strings point into
// memory the host filled; they stay valid for as long as they are used.
type Message struct {
	ID          MessageID
	Partition   uint32
	Offset      uint64
	TimestampMs uint64 // broker append time, ms since the Unix epoch
	Attempt     uint32 // 1 on first delivery
	Key         []byte // nil when the message has no key
	Tag         string
	HasTag      bool
	Headers     []Header
	Payload     []byte
}

// Header returns the value of the first header called name.
func (m *Message) Header(name string) (string, bool) {
	for _, h := range m.Headers {
		if h.Name == name {
			return h.Value, true
		}
	}
	return "", false
}

// Batch is what one handle-batch call gets.
type Batch struct {
	Topic    string
	Messages []Message
}

type outcomeKind uint8

// The variant's case numbers, in WIT order.
const (
	outcomeAck outcomeKind = iota
	outcomeRetry
	outcomeDeadLetter
)

// Outcome says what to do with one message.
type Outcome struct {
	kind    outcomeKind
	retryMs uint32
	reason  string
}

// Ack: done, never delivered again.
func Ack() Outcome { return Outcome{kind: outcomeAck} }

// Retry delivers the message again after ms milliseconds.
func Retry(ms uint32) Outcome { return Outcome{kind: outcomeRetry, retryMs: ms} }

// DeadLetter moves the message to the plugin's dead-letter topic.
func DeadLetter(reason string) Outcome { return Outcome{kind: outcomeDeadLetter, reason: reason} }

// IsAck, RetryMs and DeadLetterReason tell an outcome apart (for tests).
func (o Outcome) IsAck() bool { return o.kind == outcomeAck }

func (o Outcome) RetryMs() (uint32, bool) { return o.retryMs, o.kind == outcomeRetry }

func (o Outcome) DeadLetterReason() (string, bool) { return o.reason, o.kind == outcomeDeadLetter }

func (o Outcome) String() string {
	switch o.kind {
	case outcomeRetry:
		return "retry(" + itoa(uint64(o.retryMs)) + ")"
	case outcomeDeadLetter:
		return "dead-letter(" + o.reason + ")"
	}
	return "ack"
}

func itoa(n uint64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// ConfigEntry is one `--config key=value` of the deploy.
type ConfigEntry struct {
	Key, Value string
}

// Config is the deploy-time configuration handed to the constructor.
type Config []ConfigEntry

// Get returns the last value given for key.
func (c Config) Get(key string) (string, bool) {
	for i := len(c) - 1; i >= 0; i-- {
		if c[i].Key == key {
			return c[i].Value, true
		}
	}
	return "", false
}

// Plugin handles batches; one value lives per instance, between batches.
type Plugin interface {
	// HandleBatch returns exactly one outcome per message, in order.
	HandleBatch(batch *Batch) []Outcome
}

// PluginFunc adapts a function to Plugin.
type PluginFunc func(batch *Batch) []Outcome

func (f PluginFunc) HandleBatch(batch *Batch) []Outcome { return f(batch) }

// Constructor builds the plugin from the deploy's configuration; an error
// refuses the deploy.
type Constructor func(config Config) (Plugin, error)

var (
	constructor Constructor
	plugin      Plugin
)

// Register sets the plugin's constructor; call it from an init function.
func Register(c Constructor) { constructor = c }

// Level is a log level.
type Level uint8

// In WIT order: the enum's case numbers.
const (
	LevelTrace Level = iota
	LevelDebug
	LevelInfo
	LevelWarn
	LevelError
)

// HostErrorKind is the case of a host-error.
type HostErrorKind uint8

// In WIT order.
const (
	NotAllowed HostErrorKind = iota
	UnknownTopic
	TooLarge
	Other
)

var hostErrorNames = [...]string{"not allowed", "unknown topic", "too large", "other"}

// HostError is why the host refused a publish or a state write.
type HostError struct {
	Kind    HostErrorKind
	Message string
}

func (e *HostError) Error() string {
	name := "host error"
	if int(e.Kind) < len(hostErrorNames) {
		name = hostErrorNames[e.Kind]
	}
	return name + ": " + e.Message
}

// NewMessage is a message to publish.
type NewMessage struct {
	Topic   string
	Payload []byte
	Key     []byte // nil: no key
	Tag     string
	HasTag  bool
	Headers []Header
}

// Entry is one key and value of the plugin's state.
type Entry struct {
	Key   string
	Value []byte
}
