// Command panicker is a test plugin: it acks every message, except that a
// payload `panic` makes it panic, to show how a Go panic reaches the broker
// (an error log line with the message and stack, then a failed batch).
package main

import "msmqplugins/msmq"

func init() {
	msmq.Register(func(msmq.Config) (msmq.Plugin, error) { return msmq.PluginFunc(handle), nil })
}

func main() {}

func handle(b *msmq.Batch) []msmq.Outcome {
	out := make([]msmq.Outcome, len(b.Messages))
	for i, m := range b.Messages {
		if string(m.Payload) == "panic" {
			explode(m.Offset)
		}
		out[i] = msmq.Ack()
	}
	return out
}

func explode(offset uint64) {
	var balances map[string]int64 // nil: the write below panics
	balances["offset"] = int64(offset)
}
