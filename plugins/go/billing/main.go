// Command billing keeps a balance per account from the `transfers` topic:
// the Go twin of the Rust example plugins/examples/billing.
//
// Payload: UTF-8 `transfer_id|from|to|amount_cents` with a positive integer
// amount. State: `bill/<account>` holds the balance in cents as a signed
// decimal (missing = 0); `seen/<message id hex>` marks a processed message,
// which is acked without effect when it comes again. A malformed payload is
// dead-lettered with a reason starting `malformed transfer: `.
//
// Each host call costs a crossing, so a batch does one state-get-many for
// every key it may need, computes in memory in order (the same account or
// the same message id may appear twice), then one state-put-many. That write
// is all or nothing; when it is refused, see settle.
package main

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"

	"msmqplugins/msmq"
)

func init() { msmq.Register(newBilling) }

// main is never called: the module is a reactor, driven by its exports.
func main() {}

type billing struct{}

func newBilling(msmq.Config) (msmq.Plugin, error) { return billing{}, nil }

type transfer struct {
	id, from, to string
	amount       uint64
}

// parse reads `transfer_id|from|to|amount_cents`; the error says what is wrong.
func parse(payload []byte) (transfer, error) {
	if !utf8.Valid(payload) {
		return transfer{}, errors.New("payload is not UTF-8 text")
	}
	fields := strings.Split(string(payload), "|")
	if len(fields) != 4 {
		return transfer{}, errors.New("expected 4 `|`-separated fields transfer_id|from|to|amount_cents, got " +
			strconv.Itoa(len(fields)))
	}
	for i, name := range [...]string{"transfer_id", "from", "to"} {
		if strings.TrimSpace(fields[i]) == "" {
			return transfer{}, errors.New("field `" + name + "` is empty")
		}
	}
	amount, err := strconv.ParseUint(fields[3], 10, 64)
	if err != nil || amount == 0 || strings.TrimLeft(fields[3], "0123456789") != "" {
		return transfer{}, errors.New("amount_cents `" + fields[3] + "` is not a positive integer")
	}
	return transfer{fields[0], fields[1], fields[2], amount}, nil
}

func seenKey(id msmq.MessageID) string { return "seen/" + id.Hex() }
func billKey(account string) string    { return "bill/" + account }

// step is what the first pass learned about one message.
type step struct {
	id   msmq.MessageID
	seen string
	t    transfer
	err  error
}

func (billing) HandleBatch(batch *msmq.Batch) []msmq.Outcome {
	n := len(batch.Messages)
	steps := make([]step, n)

	// Every key the batch may read, each once, in first-use order.
	wanted := make(map[string]bool, 3*n)
	var keys []string
	want := func(k string) {
		if !wanted[k] {
			wanted[k] = true
			keys = append(keys, k)
		}
	}
	for i := range batch.Messages {
		s := &steps[i]
		s.id = batch.Messages[i].ID
		s.seen = seenKey(s.id)
		want(s.seen)
		s.t, s.err = parse(batch.Messages[i].Payload)
		if s.err == nil && s.t.from != s.t.to {
			want(billKey(s.t.from))
			want(billKey(s.t.to))
		}
	}
	values := msmq.StateGetMany(keys)

	// The committed state as this call knows it: what was read, then what
	// its successful writes changed.
	view := make(map[string][]byte, len(keys))
	for i, k := range keys {
		if values[i] != nil {
			view[k] = values[i]
		}
	}
	outcomes := make([]msmq.Outcome, n)
	settle(steps, outcomes, view)
	return outcomes
}

// settle decides steps against view and writes their changes with one
// state-put-many. The write is all or none; if it is refused, the range is
// split in halves, settled one after the other, down to single messages,
// which are retried a second later: a message whose write the broker refuses
// (say an account name too long for a key) delays only itself, as in the
// Rust billing, at the cost of a few more calls in that one batch.
func settle(steps []step, outcomes []msmq.Outcome, view map[string][]byte) {
	if len(steps) == 0 {
		return
	}
	// Changes go to an overlay on view, kept only if the write succeeds.
	overlay := make(map[string][]byte)
	var dirty []string // written keys, in first-write order
	get := func(k string) ([]byte, bool) {
		if v, ok := overlay[k]; ok {
			return v, true
		}
		v, ok := view[k]
		return v, ok
	}
	put := func(k string, v []byte) {
		if _, ok := overlay[k]; !ok {
			dirty = append(dirty, k)
		}
		overlay[k] = v
	}
	for i := range steps {
		outcomes[i] = process(&steps[i], get, put)
	}
	if len(dirty) == 0 {
		return
	}
	entries := make([]msmq.Entry, len(dirty))
	for i, k := range dirty {
		entries[i] = msmq.Entry{Key: k, Value: overlay[k]}
	}
	err := msmq.StatePutMany(entries)
	if err == nil {
		for k, v := range overlay {
			view[k] = v
		}
		return
	}
	if len(steps) == 1 {
		msmq.Warn("message " + steps[0].id.Hex() + ": state write refused: " + err.Error())
		outcomes[0] = msmq.Retry(1000)
		return
	}
	mid := len(steps) / 2
	settle(steps[:mid], outcomes[:mid], view)
	settle(steps[mid:], outcomes[mid:], view)
}

// process decides one message against the batch's view of state.
func process(s *step, get func(string) ([]byte, bool), put func(string, []byte)) msmq.Outcome {
	if _, done := get(s.seen); done {
		return msmq.Ack()
	}
	if s.err != nil {
		return msmq.DeadLetter("malformed transfer: " + s.err.Error())
	}
	if s.t.amount > math.MaxInt64 {
		return msmq.DeadLetter("malformed transfer: amount_cents is too large")
	}
	amount := int64(s.t.amount)
	// A transfer to the same account leaves its balance unchanged.
	if s.t.from != s.t.to {
		fromKey, toKey := billKey(s.t.from), billKey(s.t.to)
		from, err := balance(get, fromKey)
		if err != nil {
			return msmq.DeadLetter(err.Error())
		}
		to, err := balance(get, toKey)
		if err != nil {
			return msmq.DeadLetter(err.Error())
		}
		if (amount > 0 && from < math.MinInt64+amount) || to > math.MaxInt64-amount {
			return msmq.DeadLetter("balance would overflow a 64-bit integer")
		}
		put(fromKey, strconv.AppendInt(nil, from-amount, 10))
		put(toKey, strconv.AppendInt(nil, to+amount, 10))
	}
	put(s.seen, []byte("1"))
	return msmq.Ack()
}

// balance is the balance stored under key (missing = 0).
func balance(get func(string) ([]byte, bool), key string) (int64, error) {
	raw, ok := get(key)
	if !ok {
		return 0, nil
	}
	if !utf8.Valid(raw) {
		return 0, errors.New("state key `" + key + "` does not hold UTF-8 text")
	}
	v, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil {
		return 0, errors.New("state key `" + key + "` holds `" + string(raw) + "`, which does not parse: " + err.Error())
	}
	return v, nil
}
