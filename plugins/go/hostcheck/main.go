// Command hostcheck is a test plugin that calls every host function of the
// binding and checks what comes back, for each message:
//
//   - the message's key, tag and headers are echoed in a published message
//     to the topic of config key `out` (key, tag and headers kept, payload
//     prefixed with `echo:`); publishing to the topic of config key
//     `forbidden` must be refused with not-allowed;
//   - state put, get, get-many (with a missing key and an empty value),
//     scan with paging, delete and put-many round-trip under `check/`;
//   - now-ms is after the message's timestamp.
//
// A message whose checks all pass is acked; otherwise it is dead-lettered
// with the reason `hostcheck: ` and what failed.
package main

import (
	"errors"
	"strconv"

	"msmqplugins/msmq"
)

func init() { msmq.Register(newCheck) }

func main() {}

type check struct{ out, forbidden string }

func newCheck(c msmq.Config) (msmq.Plugin, error) {
	out, ok := c.Get("out")
	if !ok {
		return nil, errors.New("config `out` is required")
	}
	forbidden, _ := c.Get("forbidden")
	return &check{out, forbidden}, nil
}

func (c *check) HandleBatch(b *msmq.Batch) []msmq.Outcome {
	outs := make([]msmq.Outcome, len(b.Messages))
	for i := range b.Messages {
		if err := c.one(b.Topic, &b.Messages[i]); err != nil {
			outs[i] = msmq.DeadLetter("hostcheck: " + err.Error())
		} else {
			outs[i] = msmq.Ack()
		}
	}
	return outs
}

func (c *check) one(topic string, m *msmq.Message) error {
	echo := &msmq.NewMessage{
		Topic:   c.out,
		Payload: append([]byte("echo:"), m.Payload...),
		Key:     m.Key,
		Tag:     m.Tag,
		HasTag:  m.HasTag,
		Headers: append(m.Headers, msmq.Header{Name: "from-topic", Value: topic}),
	}
	if err := msmq.Publish(echo); err != nil {
		return errors.New("publish: " + err.Error())
	}
	if c.forbidden != "" {
		err := msmq.Publish(&msmq.NewMessage{Topic: c.forbidden, Payload: []byte("x")})
		var he *msmq.HostError
		if !errors.As(err, &he) || he.Kind != msmq.NotAllowed || he.Message == "" {
			return errors.New("publish to a forbidden topic: want not-allowed, got " + errString(err))
		}
	}

	id := m.ID.Hex()
	base := "check/" + id + "/"
	if err := msmq.StatePut(base+"a", []byte("alpha")); err != nil {
		return errors.New("state-put: " + err.Error())
	}
	if v, ok := msmq.StateGet(base + "a"); !ok || string(v) != "alpha" {
		return errors.New("state-get after put: " + strconv.Quote(string(v)))
	}
	if _, ok := msmq.StateGet(base + "missing"); ok {
		return errors.New("state-get of a missing key found it")
	}
	err := msmq.StatePutMany([]msmq.Entry{
		{Key: base + "b", Value: []byte("beta")},
		{Key: base + "empty", Value: []byte{}},
		{Key: base + "c", Value: []byte("first")},
		{Key: base + "c", Value: []byte("gamma")}, // later entries win
	})
	if err != nil {
		return errors.New("state-put-many: " + err.Error())
	}
	got := msmq.StateGetMany([]string{base + "a", base + "missing", base + "empty", base + "c"})
	if len(got) != 4 || string(got[0]) != "alpha" || got[1] != nil || got[2] == nil || len(got[2]) != 0 || string(got[3]) != "gamma" {
		return errors.New("state-get-many: unexpected answer")
	}
	page := msmq.StateScan(base, nil, 2)
	if len(page) != 2 || page[0].Key != base+"a" || page[1].Key != base+"b" || string(page[1].Value) != "beta" {
		return errors.New("state-scan first page")
	}
	after := page[1].Key
	page = msmq.StateScan(base, &after, 10)
	if len(page) != 2 || page[0].Key != base+"c" || page[1].Key != base+"empty" {
		return errors.New("state-scan after " + after)
	}
	msmq.StateDelete(base + "a")
	if _, ok := msmq.StateGet(base + "a"); ok {
		return errors.New("state-delete left the key")
	}
	if now := msmq.NowMs(); now < m.TimestampMs {
		return errors.New("now-ms " + strconv.FormatUint(now, 10) + " before the message's timestamp")
	}
	msmq.Debug("hostcheck: message " + id + " passed")
	return nil
}

func errString(err error) string {
	if err == nil {
		return "success"
	}
	return err.Error()
}
